"""Persistent per-session stores: SQLite by default, PostgreSQL when many processes share one cache."""

from .base import (
    CallRecord,
    CorruptRecordError,
    LoadedSession,
    OutputHistory,
    SchemaVersionError,
    SessionInfo,
    StoreError,
    TokenizerMismatchError,
)
from .sql import SCHEMA_VERSION, SqlStore, default_url, open_store

__all__ = [
    "CallRecord", "CorruptRecordError", "LoadedSession", "OutputHistory", "SchemaVersionError", "SessionInfo",
    "StoreError", "TokenizerMismatchError", "SCHEMA_VERSION", "SqlStore", "default_url", "open_store",
]
