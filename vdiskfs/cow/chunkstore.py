"""Chunk data: fixed-size slots in one sparse data file.

The maps layer (pool.py) talks to this interface only in slots and offsets within a chunk:
read into a buffer, write, sync, release. A later backend (objects in RADOS or S3) can
implement the same calls with immutable objects and never-reused ids.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class ChunkStore:
    def __init__(self, path: str, chunk_size: int, *, readonly: bool = False):
        self.chunk_size = chunk_size
        self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT), 0o600)
        # Bytes past the end of the file read as zeros: a slot that starts there is known to
        # be zero and may be written partially. Anything below may hold stale bytes.
        self.eof = os.fstat(self.fd).st_size
        self.can_punch = True

    def fresh(self, slot: int) -> bool:
        return slot * self.chunk_size >= self.eof

    def readinto(self, slot: int, off: int, buf: memoryview) -> None:
        """Fill ``buf`` from the slot (may run over into following slots); past EOF stays 0."""
        os.preadv(self.fd, [buf], slot * self.chunk_size + off)

    def read(self, slot: int) -> bytearray:
        buf = bytearray(self.chunk_size)
        self.readinto(slot, 0, memoryview(buf))
        return buf

    def write(self, slot: int, off: int, data) -> None:
        pos = slot * self.chunk_size + off
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, pos)
            pos += n
            view = view[n:]
        if pos > self.eof:
            self.eof = pos

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def release(self, slots: list[int]) -> None:
        """Give the space of durably freed slots back to the backing filesystem."""
        if not self.can_punch or not slots:
            return
        cs = self.chunk_size
        slots = sorted(slots)
        start = prev = slots[0]
        for s in slots[1:] + [None]:
            if s is not None and s == prev + 1:
                prev = s
                continue
            if _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                               start * cs, (prev - start + 1) * cs) != 0:
                err = ctypes.get_errno()
                if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                    log.warning("backing filesystem cannot punch holes: freed chunks keep "
                                "their space until reused")
                    self.can_punch = False
                    return
                log.warning("punching freed slots %d-%d failed: %s", start, prev,
                            os.strerror(err))
            if s is not None:
                start = prev = s

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
