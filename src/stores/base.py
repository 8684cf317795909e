"""What a session store keeps and the errors it raises (no database code here).

A store keeps, per agent session, every finished call: prompt token ids, output token ids and
the speculation statistics of that call. The engine rebuilds a session's suffix tree from it
lazily, and the global tree from the most recent outputs of all sessions.

Tokenizers: every session records the fingerprint of the tokenizer that wrote it. Appending to
a session with another fingerprint raises :class:`TokenizerMismatchError`; the global history
is read per fingerprint, so token ids of another tokenizer never reach a tree.

Names: session ids (at most :data:`SESSION_ID_LIMIT` characters) and namespaces (at most
:data:`NAMESPACE_LIMIT`) are checked before they reach a database: a name that is too long,
holds a NUL or a lone surrogate is a ``ValueError`` that says which, on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SESSION_ID_LIMIT = 512  # characters
NAMESPACE_LIMIT = 128


def check_name(value: str, what: str = "session id", limit: int = SESSION_ID_LIMIT, empty: bool = False) -> str:
    """``value`` if it can name a session (or a namespace); otherwise a ``ValueError`` naming the problem."""
    if not isinstance(value, str):
        raise ValueError(f"a {what} must be a string, got {type(value).__name__}")
    if not value and not empty:
        raise ValueError(f"a {what} must be a non-empty string")
    if len(value) > limit:
        raise ValueError(f"the {what} {value[:32]!r}... is {len(value)} characters long; the limit is {limit}")
    if "\x00" in value:
        raise ValueError(f"the {what} {value[:64]!r} holds a NUL character (at {value.index(chr(0))})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the {what} {value[:64]!r} holds a lone surrogate ({value[exc.start]!r} at {exc.start}); "
                         "it must be valid Unicode") from None
    return value


class StoreError(RuntimeError):
    """A store cannot be opened or written; the message names the cause."""


class SchemaVersionError(StoreError):
    """The database was written by a newer agentspec (or is not an agentspec store)."""


class TokenizerMismatchError(StoreError):
    """A session's tokens came from another tokenizer than the caller's."""


class StoreDamagedError(StoreError):
    """The database file is damaged; the message names the damage and how to save what is readable."""


class SessionDamagedError(StoreDamagedError):
    """A session's header (tokenizer, times) or running totals fail their checksum: reported as
    damage, never taken for a tokenizer mismatch; ``agentspec sessions check --repair`` restores them."""


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
