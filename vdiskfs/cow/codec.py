"""The one place where bytes on disk are made and read.

Every metadata file of a pool is built from *frames*:

    frame   = header payload
    header  = struct '<4sII': magic b"VDF1", payload length, CRC32 of the payload
    payload = msgpack, always packed and unpacked here with fixed options

A frame whose header is short or wrong, whose payload is short, or whose CRC does not match
is *bad*. At the end of the journal that is a torn append (see journal.py for how a torn
tail is told from corruption: the magic lets a reader find the frames after a bad one); a
checkpoint or pool header with a bad frame is corrupt.

Records are msgpack maps carrying their kind and format version, so a future format can
migrate them or refuse them by name instead of misreading them. Large integer arrays travel
as little-endian ``bin`` blobs (array.array.tobytes), never as msgpack lists.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from typing import Any, Iterator

import msgpack

#: Version of every record this code writes. Bump it (and teach ``check_version``
#: a migration) whenever a record's meaning changes.
#: 1: the first format. 2: partial slots (ops pset/pmask, the checkpoint's "partial");
#: a version 1 record reads as it is (no partial slots).
FORMAT_VERSION = 2

FRAME_MAGIC = b"VDF1"
FRAME_HEADER = struct.Struct("<4sII")
MAX_FRAME = 1 << 31


class FormatError(Exception):
    """Metadata that cannot be trusted: corrupt, torn or from an unknown format."""


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)


def frame(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(FRAME_MAGIC, len(payload), zlib.crc32(payload)) + payload


def frame_record(obj: Any) -> bytes:
    return frame(packb(obj))


def iter_frames(buf: bytes | memoryview, start: int = 0) -> Iterator[tuple[bytes, int]]:
    """Yield (payload, end offset) for each intact frame; stop silently at the first torn one.

    The caller compares the last end offset with len(buf) to learn whether a tail was torn.
    """
    pos = start
    while True:
        got = frame_at(buf, pos)
        if got is None:
            return
        payload, pos = got
        yield payload, pos


def frame_at(buf: bytes | memoryview, pos: int) -> tuple[bytes, int] | None:
    """(payload, end) of an intact frame starting at ``pos``, else None."""
    hs = FRAME_HEADER.size
    if pos + hs > len(buf):
        return None
    magic, length, crc = FRAME_HEADER.unpack_from(buf, pos)
    end = pos + hs + length
    if magic != FRAME_MAGIC or length > MAX_FRAME or end > len(buf):
        return None
    payload = bytes(memoryview(buf)[pos + hs:end])
    if zlib.crc32(payload) != crc:
        return None
    return payload, end


def frames_after(buf: bytes, pos: int) -> Iterator[tuple[bytes, int, int]]:
    """(payload, start, end) of every intact frame found at or after ``pos`` (a scan past
    damage: candidates are found by their magic)."""
    while True:
        pos = buf.find(FRAME_MAGIC, pos)
        if pos < 0:
            return
        got = frame_at(buf, pos)
        if got is None:
            pos += 1
            continue
        yield got[0], pos, got[1]
        pos = got[1]


def read_single_record(data: bytes, what: str) -> dict:
    """Decode a file that holds exactly one framed record (checkpoint, pool header)."""
    for payload, end in iter_frames(data):
        if end != len(data):
            raise FormatError(f"{what}: trailing bytes after the record")
        try:
            rec = unpackb(payload)
        except Exception as e:  # msgpack raises several types
            raise FormatError(f"{what}: undecodable record ({e})") from None
        if not isinstance(rec, dict):
            raise FormatError(f"{what}: record is not a map")
        return rec
    raise FormatError(f"{what}: torn or corrupt (CRC mismatch or truncated)")


def check_version(rec: dict, kind: str, what: str) -> None:
    if rec.get("kind") != kind:
        raise FormatError(f"{what}: not a {kind} record (kind={rec.get('kind')!r})")
    v = rec.get("v")
    if not isinstance(v, int) or v < 1:
        raise FormatError(f"{what}: missing format version")
    if v > FORMAT_VERSION:
        raise FormatError(
            f"{what}: format version {v} is newer than this vdiskfs supports "
            f"({FORMAT_VERSION}); upgrade vdiskfs")


def array_to_bin(a: array) -> bytes:
    if sys.byteorder != "little":
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def array_from_bin(typecode: str, data: bytes, what: str) -> array:
    a = array(typecode)
    if len(data) % a.itemsize:
        raise FormatError(f"{what}: array blob of {len(data)} bytes is not a multiple of "
                          f"{a.itemsize}")
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a
