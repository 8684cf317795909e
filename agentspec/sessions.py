"""Session id -> its drafts, loaded lazily from a store; finished calls written back.

The engine calls :meth:`SessionManager.ensure_loaded` before a call and :meth:`record` after it.
On first use in a process the manager loads the recent global history (outputs of every session
written by the same tokenizer); a session's own calls are loaded the first time that session is
used. So a new process drafts from a session's earlier calls and from everyone's outputs at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from agentspec.stats import SpecStats

logger = logging.getLogger(__name__)

GLOBAL_HISTORY_TOKENS = 1_000_000  # output tokens of recent calls loaded into the global tree


class SessionManager:
    """Keeps the drafter's session trees in step with a persistent store."""

    def __init__(self, store: Any, drafter: Any, fingerprint: str,
                 global_tokens: int = GLOBAL_HISTORY_TOKENS) -> None:
        self.store = store
        self.drafter = drafter
        self.fingerprint = fingerprint
        self.global_tokens = global_tokens
        self._loaded: set[str] = set()
        self._global_loaded = False
        self.skipped_records = 0  # corrupt records met while loading (skipped, never fatal)

    @classmethod
    def open(cls, store: Any, drafter: Any, fingerprint: str) -> SessionManager:
        """``store``: a URL (``sqlite:///...``, ``postgresql+psycopg://...``) or a store object."""
        if isinstance(store, str):
            from agentspec.stores import open_store

            store = open_store(store)
        return cls(store, drafter, fingerprint)

    def ensure_loaded(self, session_id: str) -> None:
        """Feed the drafter what the store knows (global history once, this session once)."""
        if not self._global_loaded:
            self._global_loaded = True
            outputs, skipped = self.store.recent_outputs(self.fingerprint, self.global_tokens)
            self.skipped_records += skipped
            for output in outputs:
                self.drafter.add_history(None, [], output)
        if session_id in self._loaded:
            return
        self._loaded.add(session_id)
        loaded = self.store.load_session(session_id)
        if loaded.info is not None and loaded.info.fingerprint != self.fingerprint:
            logger.warning("session %r was written by another tokenizer; not drafting from it", session_id)
            return
        self.skipped_records += loaded.skipped
        for error in loaded.errors:
            logger.warning("session %r: skipped %s", session_id, error)
        for call in self._newest_that_fit(loaded.calls):
            self.drafter.add_history(session_id, call.prompt_ids, call.output_ids, to_global=False)

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
               stats: SpecStats) -> int:
        """Append a finished call in one transaction."""
        self._loaded.add(session_id)
        return self.store.append(session_id, list(prompt_ids), list(output_ids), stats.to_dict(),
                                 fingerprint=self.fingerprint)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
