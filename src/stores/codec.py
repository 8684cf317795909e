"""Payloads: token ids as msgpack envelopes of zlib-compressed little-endian uint16/uint32 arrays.

Envelope: ``{"v": 1, "w": 2|4, "n": count, "z": zlib(bytes), "c": crc32(bytes)}``. Ids under
65536 take 2 bytes before compression (about 1-1.5 bytes per token after, on agent traffic).
A call's statistics: ``{"v": 1, "m": msgpack(map), "c": crc32(m)}``. The checksums turn a
truncated or altered payload into :class:`CorruptRecordError`. A table row's own values are
checked by :func:`checksum_of` (see :func:`.schema.row_checksum`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import msgpack
import numpy as np

from .base import CorruptRecordError

VERSION = 1


def encode_tokens(tokens: Sequence[int]) -> bytes:
    """Pack token ids (non-negative ints < 2**32)."""
    array = np.asarray(tokens, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() >= 2**32):
        raise ValueError(f"token ids must be in [0, 2**32), got min {array.min()} max {array.max()}")
    width = 2 if not array.size or array.max() < 2**16 else 4
    raw = array.astype("<u2" if width == 2 else "<u4").tobytes()
    return msgpack.packb({"v": VERSION, "w": width, "n": int(array.size), "z": zlib.compress(raw, 6),
                          "c": zlib.crc32(raw)})


def _envelope(payload: bytes, what: str) -> dict:
    """The msgpack map around a payload, or ``CorruptRecordError`` naming what is wrong."""
    try:
        env = msgpack.unpackb(payload)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptRecordError(f"undecodable {what} payload ({type(exc).__name__}: {exc})") from exc
    if not isinstance(env, dict) or env.get("v") != VERSION:
        raise CorruptRecordError(f"not a v{VERSION} {what} payload")
    return env


def decode_tokens(payload: bytes) -> list[int]:
    """Unpack :func:`encode_tokens` output; ``CorruptRecordError`` names what is wrong."""
    env = _envelope(payload, "token")
    try:
        raw = zlib.decompress(env["z"])
    except (KeyError, TypeError, zlib.error) as exc:
        raise CorruptRecordError(f"undecodable token payload ({type(exc).__name__}: {exc})") from exc
    if zlib.crc32(raw) != env.get("c") or env.get("w") not in (2, 4) or len(raw) != env.get("n", -1) * env["w"]:
        raise CorruptRecordError("token payload checksum or length mismatch")
    return np.frombuffer(raw, dtype="<u2" if env["w"] == 2 else "<u4").astype(np.int64).tolist()


def checksum_of(values: Sequence[int | float | str]) -> int:
    """The CRC-32 of a row's values, packed the one way msgpack packs them."""
    return zlib.crc32(msgpack.packb(list(values)))


def encode_stats(stats: dict) -> bytes:
    """Pack a call's statistics (a map of msgpack-able values) with a checksum."""
    raw = msgpack.packb(stats)
    return msgpack.packb({"v": VERSION, "m": raw, "c": zlib.crc32(raw)})


def decode_stats(payload: bytes) -> dict:
    """Unpack :func:`encode_stats` output; ``CorruptRecordError`` names what is wrong."""
    env = _envelope(payload, "stats")
    raw = env.get("m")
    if not isinstance(raw, bytes) or zlib.crc32(raw) != env.get("c"):
        raise CorruptRecordError("stats payload checksum mismatch")
    return decode_legacy_stats(raw)


def decode_legacy_stats(payload: bytes | None) -> dict:
    """A bare msgpack map (the statistics payload of schema v3 and older, without a checksum)."""
    if not payload:
        return {}
    try:
        value = msgpack.unpackb(payload)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptRecordError(f"undecodable stats payload ({type(exc).__name__}: {exc})") from exc
    if not isinstance(value, dict):
        raise CorruptRecordError("stats payload is not a map")
    return value
