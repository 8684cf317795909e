"""Persistent per-session stores: SQLite by default, PostgreSQL when many processes share one cache."""

from .base import (
    NAMESPACE_LIMIT,
    SESSION_ID_LIMIT,
    CallRecord,
    CorruptRecordError,
    LoadedSession,
    OutputHistory,
    SchemaVersionError,
    SessionDamagedError,
    SessionInfo,
    StoreDamagedError,
    StoreError,
    TokenizerMismatchError,
    check_name,
)
from .schema import SCHEMA_VERSION
from .sql import SqlStore, default_url, open_store

__all__ = [
    "NAMESPACE_LIMIT", "SESSION_ID_LIMIT", "CallRecord", "CorruptRecordError", "LoadedSession", "OutputHistory",
    "SchemaVersionError", "SessionDamagedError", "SessionInfo", "StoreDamagedError", "StoreError",
    "TokenizerMismatchError", "check_name", "SCHEMA_VERSION", "SqlStore", "default_url", "open_store",
]
