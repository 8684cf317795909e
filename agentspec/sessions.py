"""Session id -> its drafts, loaded lazily from a store; finished calls written back.

The engine calls :meth:`SessionManager.ensure_loaded` before a call and :meth:`record` after it.
On first use in a process the manager loads the recent global history (outputs of every session
written by the same tokenizer); a session's own calls are loaded the first time that session is
used. So a new process drafts from a session's earlier calls and from everyone's outputs at once.
Before each later call it asks the store for calls other processes appended since (two small
indexed queries), so processes sharing one store also draft from each other's new calls. That
refresh is best effort: on PostgreSQL a call whose transaction commits after a newer record id
was already seen is missed until the next process start (drafts only; outputs never change).

With ``store=None`` nothing is persisted: the drafter keeps its trees in memory by itself and
both methods do nothing. A session written by another tokenizer raises
:class:`~agentspec.stores.TokenizerMismatchError` before any of its tokens reach a tree.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from agentspec.stats import SpecStats
from agentspec.tokens import common_prefix as _common_prefix

logger = logging.getLogger(__name__)

GLOBAL_HISTORY_TOKENS = 1_048_576  # output tokens of recent calls loaded into the global tree (at most)


class SessionManager:
    """Keeps the drafter's session trees in step with a persistent store (or with nothing)."""

    def __init__(self, store: Any | None, drafter: Any, fingerprint: str,
                 global_tokens: int = GLOBAL_HISTORY_TOKENS) -> None:
        self.store = store
        self.drafter = drafter
        self.fingerprint = fingerprint
        self.global_tokens = global_tokens
        self._loaded: dict[str, int] = {}  # session id -> newest record id fed to the drafter
        self._global_after = 0  # newest record id seen for the global history
        self._own: set[int] = set()  # record ids this process wrote (the drafter learnt them live)
        self.skipped_records = 0  # corrupt records met while loading (skipped, never fatal)

    @classmethod
    def open(cls, store: Any | None, drafter: Any, fingerprint: str) -> SessionManager:
        """``store``: a URL (``sqlite:///...``, ``postgresql+psycopg://...``), a store object, or None."""
        if isinstance(store, str):
            from agentspec.stores import open_store

            store = open_store(store)
        return cls(store, drafter, fingerprint)

    def ensure_loaded(self, session_id: str) -> None:
        """Feed the drafter what the store knows: the global history and this session's calls on
        first use, and after that what other processes appended since."""
        if self.store is None:
            return
        self._refresh_global()
        if session_id in self._loaded:
            self._refresh_session(session_id)
            return
        loaded = self.store.load_session(session_id)
        if loaded.info is not None and loaded.info.fingerprint != self.fingerprint:
            from agentspec.stores import TokenizerMismatchError

            raise TokenizerMismatchError(
                f"session {session_id!r} was written with tokenizer {loaded.info.fingerprint}, this model's is "
                f"{self.fingerprint}; token ids of different tokenizers are never mixed: use another session id"
            )
        self._loaded[session_id] = loaded.newest_id
        self._note_skipped(session_id, loaded)
        for call in self._newest_that_fit(loaded.calls):
            self.drafter.add_history(session_id, call.prompt_ids, call.output_ids, to_global=False)

    def _refresh_global(self) -> None:
        """First use: the newest outputs of all sessions of this tokenizer, as many as the global tree
        keeps; later: outputs other processes appended since."""
        budget = getattr(getattr(self.drafter, "config", None), "global_max_tokens", None) or self.global_tokens
        history = self.store.recent_outputs(self.fingerprint, min(budget, self.global_tokens), after=self._global_after)
        self._global_after = history.newest_id
        self.skipped_records += history.skipped
        for record_id, output in zip(history.record_ids, history.outputs):
            if record_id not in self._own:
                self.drafter.add_history(None, [], output)

    def _refresh_session(self, session_id: str) -> None:
        """Calls other processes appended to a loaded session since this process last looked."""
        loaded = self.store.calls_since(session_id, self._loaded[session_id])
        self._loaded[session_id] = loaded.newest_id
        self._note_skipped(session_id, loaded)
        for call in loaded.calls:
            if call.record_id not in self._own:
                self.drafter.add_history(session_id, call.prompt_ids, call.output_ids, to_global=False)

    def _note_skipped(self, session_id: str, loaded: Any) -> None:
        self.skipped_records += loaded.skipped
        for error in loaded.errors:
            logger.warning("session %r: skipped %s", session_id, error)

    def _newest_that_fit(self, calls: list) -> list:
        """The newest calls whose new tokens fit the drafter's session budget (older ones would be
        evicted right after being added): each call adds its prompt beyond the previous call's
        prompt and output, plus its output."""
        budget = getattr(getattr(self.drafter, "config", None), "session_max_tokens", None)
        if not budget:
            return calls
        sizes, previous = [], []
        for call in calls:
            shared = _common_prefix(call.prompt_ids, previous)
            sizes.append(len(call.prompt_ids) - shared + len(call.output_ids))
            previous = call.prompt_ids + call.output_ids
        total, start = 0, len(calls)
        while start > 0 and total + sizes[start - 1] <= budget:
            start -= 1
            total += sizes[start]
        return calls[start:]

    def record(self, session_id: str, prompt_ids: Sequence[int], output_ids: Sequence[int],
               stats: SpecStats) -> int | None:
        """Append a finished call in one transaction; returns its record id (None without a store)."""
        if self.store is None:
            return None
        record_id = self.store.append(session_id, list(prompt_ids), list(output_ids), stats.to_dict(),
                                      fingerprint=self.fingerprint)
        self._own.add(record_id)
        return record_id
