"""Session history in a persistent store: what the drafter loads, and where the engine records calls.

:class:`StoreSessions` serves one store and one tokenizer, for both sides of a call:

* to the drafter it is a :class:`~agentspec.draft.base.SessionHistory`. The drafter owns the
  session trees and a cursor into the store for each: when it does not hold a session (first use,
  or after it evicted the session) it loads the newest calls that fit its budget; before each
  request it asks for what other processes appended since. The global history (the outputs of
  every session of this tokenizer) is read the same way, with session id ``None``;
* to the engine it is a ``SessionRecorder``: :meth:`StoreSessions.record` appends a finished call.

Every read is filtered by tokenizer fingerprint (in the store's queries): a session written by
another tokenizer, also one dropped and re-created by another model while a cursor is held on it,
raises :class:`~agentspec.stores.TokenizerMismatchError` before any of its tokens reach a tree. The only
state kept here is the ids of this process's newest records (bounded), so that calls the drafter
learnt live are not fed to it twice; a reader whose cursor is older than the ids still remembered
gets a full reload instead (``History.replace``). Refreshing is best effort: on PostgreSQL a call
whose transaction commits after a newer record id was already seen is missed until the session is
loaded again (drafts only; outputs never change).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from agentspec.draft.base import History
from agentspec.stats import SpecStats
from agentspec.stores import CallRecord, LoadedSession, SqlStore
from agentspec.tokens import common_prefix

logger = logging.getLogger(__name__)

OWN_RECORDS_KEPT = 4096  # ids of this process's newest records remembered (not fed back to the drafter)


class StoreSessions:
    """A drafter's session history and the engine's call recorder over one store, for one tokenizer."""

    def __init__(self, store: SqlStore, fingerprint: str, own_records_kept: int = OWN_RECORDS_KEPT) -> None:
        if own_records_kept < 1:
            raise ValueError(f"own_records_kept must be >= 1, got {own_records_kept}")
        self.store = store
        self.fingerprint = fingerprint
        self.own_records_kept = own_records_kept
        self._own: dict[int, None] = {}  # ids of this process's newest records, oldest first
        self._forgotten = 0  # the newest own record id no longer in ``_own``
        self.skipped_records = 0  # corrupt records met while reading (skipped, never fatal)

    # ------------------------------------------------------------------ SessionHistory
    def calls(self, session_id: str | None, after: int | None, max_tokens: int) -> History:
        """Finished calls of ``session_id`` (``None``: the outputs of all sessions of this tokenizer,
        prompts left empty), oldest first; see :class:`~agentspec.draft.base.SessionHistory`."""
        replace = after is not None and after < self._forgotten  # an own call in range may be forgotten
        if after is None or replace:
            return self._load(session_id, max_tokens, replace)
        if session_id is None:
            history = self.store.recent_outputs(self.fingerprint, max_tokens, after=after)
            self.skipped_records += history.skipped
            outputs = [out for rid, out in zip(history.record_ids, history.outputs) if rid not in self._own]
            return History([([], out) for out in outputs], history.newest_id)
        loaded = self.store.calls_since(session_id, after, fingerprint=self.fingerprint)
        self._note_skipped(session_id, loaded)
        news = [c for c in loaded.calls if c.record_id not in self._own]
        return History([(c.prompt_ids, c.output_ids) for c in news], loaded.newest_id)

    def _load(self, session_id: str | None, max_tokens: int, replace: bool) -> History:
        if session_id is None:
            history = self.store.recent_outputs(self.fingerprint, max_tokens)
            self.skipped_records += history.skipped
            return History([([], out) for out in history.outputs], history.newest_id, replace)
        loaded = self.store.load_session(session_id, fingerprint=self.fingerprint)
        self._note_skipped(session_id, loaded)
        calls = newest_that_fit(loaded.calls, max_tokens)
        return History([(c.prompt_ids, c.output_ids) for c in calls], loaded.newest_id, replace)

    def _note_skipped(self, session_id: str, loaded: LoadedSession) -> None:
        self.skipped_records += loaded.skipped
        for error in loaded.errors:
            logger.warning("session %r: skipped %s", session_id, error)

    # ------------------------------------------------------------------ SessionRecorder
    def record(self, session_id: str, prompt_ids: Sequence[int], output_ids: Sequence[int],
               stats: SpecStats) -> int | None:
        """Append a finished call in one transaction; returns its record id."""
        record_id = self.store.append(session_id, list(prompt_ids), list(output_ids), stats.to_dict(),
                                      fingerprint=self.fingerprint)
        self._own[record_id] = None
        while len(self._own) > self.own_records_kept:
            oldest = next(iter(self._own))
            del self._own[oldest]
            self._forgotten = max(self._forgotten, oldest)
        return record_id


def newest_that_fit(calls: list[CallRecord], max_tokens: int) -> list[CallRecord]:
    """The newest calls whose new tokens fit a session tree of ``max_tokens`` (older ones would be
    evicted right after being added): each call adds its prompt beyond the previous call's prompt
    and output, plus its output."""
    sizes, previous = [], []
    for call in calls:
        shared = common_prefix(call.prompt_ids, previous)
        sizes.append(len(call.prompt_ids) - shared + len(call.output_ids))
        previous = call.prompt_ids + call.output_ids
    total, start = 0, len(calls)
    while start > 0 and total + sizes[start - 1] <= max_tokens:
        start -= 1
        total += sizes[start]
    return calls[start:]
