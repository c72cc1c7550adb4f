"""The one place where bytes on disk are made and read: msgpack with fixed options, CRC32
frames, format versions, array blobs.

What the frames and records mean is documented once, in docs/FORMAT.md. Everything that
decodes metadata goes through ``unpackb`` here, which turns every decoding failure into
``FormatError`` (msgpack raises several exception types), so callers catch one thing.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from typing import Any, Iterator

import msgpack

#: Version of every record this code writes; the history is in docs/FORMAT.md. Bump it
#: (and teach ``check_version`` a migration) whenever a record's meaning changes.
FORMAT_VERSION = 4

FRAME_MAGIC = b"VDF1"
FRAME_HEADER = struct.Struct("<4sII")
BIN32 = struct.Struct(">BI")
MAX_FRAME = 1 << 31


class FormatError(Exception):
    """Metadata that cannot be trusted: corrupt, torn or from an unknown format."""


class NewerFormat(FormatError):
    """Written by a newer vdiskfs: refused, never replaced by an older copy."""


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes, what: str = "record") -> Any:
    """Decode msgpack; any failure is a ``FormatError`` naming ``what``."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as e:   # ExtraData, FormatError, StackError, ValueError, ...
        raise FormatError(f"{what}: undecodable ({type(e).__name__}: {e})") from None


def unpack_map(data: bytes, what: str) -> dict:
    """Decode a record that must be a msgpack map."""
    rec = unpackb(data, what)
    if not isinstance(rec, dict):
        raise FormatError(f"{what}: record is not a map")
    return rec


def frame(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(FRAME_MAGIC, len(payload), zlib.crc32(payload)) + payload


def frame_record(obj: Any) -> bytes:
    return frame(packb(obj))


BY_REFERENCE = 64 << 10   # bin values at least this long are framed without a copy


def frame_record_pieces(rec: dict) -> list:
    """``frame_record(rec)`` as buffers whose concatenation is the same bytes, with the
    map's large ``bytes`` values by reference (a checkpoint's arrays): packing them would
    copy megabytes in one call that holds the GIL, and the loop thread waits for the GIL.
    The CRC over the pieces and their write (os.writev) let it go."""
    packer = msgpack.Packer(use_bin_type=True)
    pieces: list = [b"", packer.pack_map_header(len(rec))]
    for k, v in rec.items():
        pieces.append(packer.pack(k))
        if isinstance(v, bytes) and len(v) >= BY_REFERENCE:
            pieces.append(BIN32.pack(0xC6, len(v)))   # msgpack's bin 32, as packb makes it
            pieces.append(v)
        else:
            pieces.append(packer.pack(v))
    crc, length = 0, 0
    for p in pieces:
        crc = zlib.crc32(p, crc)
        length += len(p)
    pieces[0] = FRAME_HEADER.pack(FRAME_MAGIC, length, crc)
    return pieces


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
        return unpack_map(payload, what)
    raise FormatError(f"{what}: torn or corrupt (CRC mismatch or truncated)")


def check_version(rec: dict, kind: str, what: str) -> None:
    if rec.get("kind") != kind:
        raise FormatError(f"{what}: not a {kind} record (kind={rec.get('kind')!r})")
    v = rec.get("v")
    if not isinstance(v, int) or v < 1:
        raise FormatError(f"{what}: missing format version")
    if v > FORMAT_VERSION:
        raise NewerFormat(
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
