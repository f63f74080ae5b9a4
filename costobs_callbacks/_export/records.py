"""The spool file's records: self-delimiting and checksummed, so that a torn or corrupt one costs only itself.

A record is ``MAGIC, payload length, item count, CRC32`` (big-endian), then the payload (opaque here: see
``fallback`` for what it holds). A torn or corrupt record is read as a bad one, its items counted as lost;
reading goes on at the next record (found by its magic), so a crash mid-write loses that one record, never the
rest.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

__all__ = ["MAGIC", "SpoolRecord", "encode", "read_records"]

MAGIC = b"CSP1"
_HEAD = struct.Struct(">4sIII")
_MAX_PAYLOAD = 1 << 30


class SpoolRecord:
    __slots__ = ("count", "end", "payload", "start")

    def __init__(self, start: int, end: int, count: int, payload: bytes | None) -> None:
        self.start = start
        self.end = end
        self.count = count
        self.payload = payload
        """``None``: the record is torn or corrupt (``count`` then is its header's, if that could be read)."""


def encode(payload: bytes, count: int) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(struct.pack(">II", len(payload), count)))
    return _HEAD.pack(MAGIC, len(payload), count, crc) + payload


def read_records(data: bytes, start: int = 0) -> Iterator[SpoolRecord]:
    """The records of ``data`` from offset ``start``: good ones with their payload, bad ones (torn, corrupt)
    with ``payload=None`` spanning the bytes skipped up to the next record's magic (or the end)."""
    pos, n = start, len(data)
    while pos < n:
        bad = _bad_at(data, pos)
        if bad is None:
            length, count = struct.unpack_from(">II", data, pos + 4)
            end = pos + _HEAD.size + length
            yield SpoolRecord(pos, end, count, data[pos + _HEAD.size:end])
            pos = end
            continue
        nxt = data.find(MAGIC, pos + 1)
        end = n if nxt < 0 else nxt
        yield SpoolRecord(pos, end, bad, None)
        pos = end


def _bad_at(data: bytes, pos: int) -> int | None:
    """``None`` if a whole, intact record starts at ``pos``; else the items it claims to hold (0 if unknown)."""
    if len(data) - pos < _HEAD.size:
        return 0
    magic, length, count, crc = _HEAD.unpack_from(data, pos)
    if magic != MAGIC:
        return 0
    if length > _MAX_PAYLOAD or pos + _HEAD.size + length > len(data):
        return int(count) if length <= _MAX_PAYLOAD else 0
    payload = memoryview(data)[pos + _HEAD.size:pos + _HEAD.size + length]
    if zlib.crc32(payload, zlib.crc32(struct.pack(">II", length, count))) != crc:
        return int(count)
    return None
