"""The store, off vLLM's critical path: one background thread does every read and write.

``propose`` only puts jobs on a queue and takes finished results; it never waits on the database.
A session is read and its suffix tree built here, in a donor :class:`SuffixDrafter` that the proposer
adopts between steps (:meth:`SuffixDrafter.adopt`, O(1)). One thread owns the :class:`StoreSessions`,
so its bookkeeping (the ids of this process's own records) needs no lock.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agentspec.stores import StoreError, open_store

from agentspec.draft.builder import DrafterConfig, SuffixDrafter
from agentspec.sessions import StoreSessions
from agentspec.stats import SpecStats

logger = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A session read from the store: its tree in ``donor``, the store's cursor, its newest prompt."""

    session_id: str | None  # None: the global tree
    donor: SuffixDrafter
    cursor: int
    last_prompt: list[int] = field(default_factory=list)


@dataclass
class Increment:
    """Calls of a held session that other processes recorded after ``cursor``."""

    session_id: str
    calls: list[tuple[list[int], list[int]]]
    cursor: int


@dataclass
class Failed:
    """A session that could not be read (another tokenizer, a damaged store): it drafts without history."""

    session_id: str
    reason: str


class StoreLoader:
    """A daemon thread serving one store: ``load``, ``refresh`` and ``record`` return at once; results
    (:class:`Loaded`, :class:`Increment`, :class:`Failed`) are taken with :meth:`results`."""

    def __init__(self, store_url: str | None, fingerprint: Callable[[], str], config: DrafterConfig) -> None:
        self.config = config
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(store_url, fingerprint), daemon=True,
                                        name="agentspec-store")
        self._thread.start()

    # ------------------------------------------------------------------ the proposer's side (never blocks)
    def load(self, session_id: str | None) -> None:
        """Read ``session_id`` (``None``: the global outputs) and build its tree."""
        self._jobs.put(("load", session_id))

    def refresh(self, session_id: str, cursor: int) -> None:
        """Read what was recorded in ``session_id`` after ``cursor`` (by any process)."""
        self._jobs.put(("refresh", session_id, cursor))

    def record(self, session_id: str, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> None:
        """Append a finished call to ``session_id``."""
        self._jobs.put(("record", session_id, list(prompt_ids), list(output_ids)))

    def results(self) -> list[Loaded | Increment | Failed]:
        """What the thread finished since the last call."""
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every job queued so far is done (tests, shutdown); False on timeout."""
        done = threading.Event()
        self._jobs.put(("flush", done))
        return done.wait(timeout)

    # ------------------------------------------------------------------ the thread
    def _run(self, store_url: str | None, fingerprint: Callable[[], str]) -> None:
        try:
            sessions = StoreSessions(open_store(store_url), fingerprint())
        except Exception:  # the engine goes on drafting from live requests only
            logger.exception("agentspec: cannot open the store %s; drafting without history", store_url)
            sessions = None
        while True:
            job = self._jobs.get()
            if job[0] == "flush":
                job[1].set()
                continue
            if sessions is None:
                continue
            try:
                self._do(sessions, job)
            except StoreError as exc:
                logger.warning("agentspec: %s %r failed: %s", job[0], job[1], exc)
                if job[0] != "record" and job[1] is not None:
                    self._done.put(Failed(job[1], str(exc)))
            except Exception:  # never let the thread die: the engine would lose its store for good
                logger.exception("agentspec: %s %r failed", job[0], job[1])

    def _do(self, sessions: StoreSessions, job: tuple) -> None:
        kind, session_id = job[0], job[1]
        if kind == "record":
            sessions.record(session_id, job[2], job[3], SpecStats())
        elif kind == "refresh":
            news = sessions.calls(session_id, job[2], self.config.session_max_tokens)
            if news.replace:  # the cursor is too old to be told what is new: read it whole
                kind = "load"
            else:
                self._done.put(Increment(session_id, news.calls, news.cursor))
        if kind == "load":
            donor = SuffixDrafter(self.config)
            limit = self.config.global_max_tokens if session_id is None else self.config.session_max_tokens
            history = sessions.calls(session_id, None, limit)
            for prompt, output in history.calls:
                donor.add_history(session_id, prompt, output, to_global=session_id is None)
            last_prompt = history.calls[-1][0] if history.calls else []
            self._done.put(Loaded(session_id, donor, history.cursor, last_prompt))
