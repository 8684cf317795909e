"""What a session store keeps and the errors it raises (no database code here).

A store keeps, per agent session, every finished call: prompt token ids, output token ids and
the speculation statistics of that call. The engine rebuilds a session's suffix tree from it
lazily, and the global tree from the most recent outputs of all sessions.

Tokenizers: every session records the fingerprint of the tokenizer that wrote it. Appending to
a session with another fingerprint raises :class:`TokenizerMismatchError`; the global history
is read per fingerprint, so token ids of another tokenizer never reach a tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class StoreError(RuntimeError):
    """A store cannot be opened or written; the message names the cause."""


class SchemaVersionError(StoreError):
    """The database was written by a newer agentspec (or is not an agentspec store)."""


class TokenizerMismatchError(StoreError):
    """A session's tokens came from another tokenizer than the caller's."""


class CorruptRecordError(StoreError):
    """A stored payload does not decode (truncated, altered)."""


@dataclass
class CallRecord:
    """One finished call of a session, in append order."""

    record_id: int
    session_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    stats: dict = field(default_factory=dict)
    created_at: float = 0.0


@dataclass
class SessionInfo:
    """A session's header and running totals."""

    session_id: str
    fingerprint: str
    created_at: float
    updated_at: float
    calls: int
    prompt_tokens: int
    output_tokens: int


@dataclass
class LoadedSession:
    """What :meth:`SqlStore.load_session` returns: the readable calls and how many were skipped."""

    info: SessionInfo | None
    calls: list[CallRecord]
    skipped: int = 0  # corrupt records left out (counted, never fatal)
    errors: list[str] = field(default_factory=list)
    newest_id: int = 0  # highest record id read, corrupt ones included (``after`` for the next look)


@dataclass
class OutputHistory:
    """What :meth:`SqlStore.recent_outputs` returns: outputs oldest first, with their record and
    session ids; ``newest_id`` is the highest record id seen (pass it as ``after`` next time)."""

    outputs: list[list[int]]
    record_ids: list[int]
    session_ids: list[str]
    skipped: int = 0  # corrupt records left out
    newest_id: int = 0
