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

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError on failure (EOPNOTSUPP where the filesystem has none)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class ChunkStore:
    def __init__(self, path: str, chunk_size: int, *, readonly: bool = False):
        self.chunk_size = chunk_size
        self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT), 0o600)
        # Bytes past the end of the file read as zeros, and so do slots punched by this
        # process: such a slot may be written partially. Others may hold stale bytes.
        self.eof = os.fstat(self.fd).st_size
        self.punched: set[int] = set()
        self.can_punch = True
        self.can_allocate = True

    def allocate(self, slot: int) -> bool:
        """Reserve the space of a slot about to be written, so that a full backing
        filesystem fails the write now (ENOSPC) instead of at writeback. Returns whether
        the slot is known to read as zeros."""
        cs = self.chunk_size
        zero = slot * cs >= self.eof or slot in self.punched
        if self.can_allocate:
            try:
                fallocate(self.fd, 0, slot * cs, cs)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self.can_allocate = False
            else:
                self.eof = max(self.eof, (slot + 1) * cs)
        self.punched.discard(slot)
        return zero

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
        try:
            while view:
                n = os.pwrite(self.fd, view, pos)
                pos += n
                view = view[n:]
        except OSError:
            # Even a failed write may have grown the file: bytes below EOF are not zeros.
            self.eof = max(self.eof, os.fstat(self.fd).st_size)
            raise
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
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          start * cs, (prev - start + 1) * cs)
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                    log.warning("backing filesystem cannot punch holes: freed chunks keep "
                                "their space until reused")
                    self.can_punch = False
                    return
                log.warning("punching freed slots %d-%d failed: %s", start, prev, e)
            else:
                self.punched.update(range(start, prev + 1))
            if s is not None:
                start = prev = s

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
