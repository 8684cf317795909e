"""The commit counter beside a SQLite store: lost commits are found when the store opens.

SQLite keeps the newest commits in the ``-wal`` file until a checkpoint copies them into the
database file. When that file is damaged (or removed) before the checkpoint, SQLite replays it up
to the first frame whose checksum fails and drops the rest without a word: the store opens, a
consistent but older version of itself.

So every write transaction also counts itself in the database (``agentspec_schema.commits``),
and once it has committed the count goes into a small file beside the store (``<file>-commits``,
16 bytes with their own CRC, raised under an exclusive ``flock``, never lowered). When the store
opens, the file is read first, the database second: a database that holds fewer commits than the
file says were made has lost the difference.

What this promises: a writer killed at any point (SIGKILL included) never causes a false alarm
(the count is written after the commit; a count that did not get written only makes the next
check weaker), and commits lost from a damaged or removed ``-wal`` are always reported, since
the file is in the OS's cache the moment ``write`` returns, like the ``-wal`` itself. What it does
not promise: after a power cut (the store syncs neither file at each commit, see ``synchronous=
NORMAL``), either file may lack its newest writes, so lost commits may go unreported.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import zlib
from pathlib import Path

_FORMAT = struct.Struct("<4sQI")  # magic, commits, crc32 of the first 12 bytes
_MAGIC = b"AGSC"


def counter_path(store_file: Path) -> Path:
    """Where the commit counter of the store at ``store_file`` lives."""
    return store_file.with_name(store_file.name + "-commits")


class CommitCounter:
    """The count of commits made to one SQLite store file, kept beside it."""

    def __init__(self, store_file: Path) -> None:
        self.path = counter_path(store_file)
        self._lock = threading.Lock()  # flock does not exclude the threads that share a descriptor
        self._fd: int | None = None
        self._pid = 0  # the process that opened ``_fd`` (a forked child opens its own)

    def read(self) -> int | None:
        """The commits made so far; None when there is no counter (or it is unreadable)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return _decode(os.pread(fd, _FORMAT.size, 0))
        finally:
            os.close(fd)

    def advance(self, commits: int) -> None:
        """Raise the count to ``commits`` (never lowers it: writers finish in any order)."""
        self._write(commits, lower=False)

    def reset(self, commits: int) -> None:
        """Set the count to ``commits`` (a new store file, or a loss accepted by a repair)."""
        self._write(commits, lower=True)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None

    def _write(self, commits: int, lower: bool) -> None:
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                self._fd, self._pid = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600), os.getpid()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                current = _decode(os.pread(self._fd, _FORMAT.size, 0))
                if lower or current is None or commits > current:
                    body = _FORMAT.pack(_MAGIC, commits, 0)[:12]
                    os.pwrite(self._fd, body + struct.pack("<I", zlib.crc32(body)), 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)


def _decode(data: bytes) -> int | None:
    if len(data) != _FORMAT.size:
        return None
    magic, commits, crc = _FORMAT.unpack(data)
    return commits if magic == _MAGIC and crc == zlib.crc32(data[:12]) else None
