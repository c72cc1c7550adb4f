"""Chunk data and its checksums: fixed-size slots, and the sum of every 4 KiB block.

``Chunks`` is the interface the engine talks to (datapath.py, commit.py, scrub.py, fsck):
positions are *data-file positions* (slot * chunk_size + offset in the chunk, so a run of
consecutive slots is one range), block *g* is bytes [g * 4096, (g + 1) * 4096) and its sum
is sums(g). Writes are durable after ``sync`` (invariant 1: before the journal batch that
points at them); ``release`` gives the space of durably freed slots back.

Implementations: ``ChunkStore`` here, the embedded default: one sparse data file and the
sums file (docs/FORMAT.md); ``vdiskfs.rados.chunks.RadosChunks``: an object per slot in
a Ceph RADOS pool.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
from array import array
from sys import byteorder

from . import checksum
from .checksum import SUM_SIZE
from .errors import fatal

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2    # start writeback, wait for nothing


IOV_MAX = 1024               # buffers per writev(2) (Linux's limit)


def write_all(fd: int, views: list, pos: int | None = None) -> int:
    """Write the buffers back to back at ``pos`` (None: at the file's offset), however
    short each writev is; returns the bytes written. OSError as the call raised it."""
    total = 0
    while views:
        head = views if len(views) <= IOV_MAX else views[:IOV_MAX]
        n = os.writev(fd, head) if pos is None else os.pwritev(fd, head, pos + total)
        total += n
        i = 0
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        views = views[i:]
        if n:
            views[0] = views[0][n:]
    return total


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError on failure (EOPNOTSUPP where the filesystem has none)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _runs(slots: list[int]):
    """(first, count) for each run of consecutive numbers in an ascending list."""
    i = 0
    while i < len(slots):
        j = i + 1
        while j < len(slots) and slots[j] == slots[j - 1] + 1:
            j += 1
        yield slots[i], j - i
        i = j


class Chunks:
    """What every chunk store keeps and does the same way; the I/O is the subclass's."""

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        # Bytes past ``eof`` read as zeros, and so do slots punched by this process: such
        # a slot may be written partially. Others may hold stale bytes.
        self.eof = 0
        self.punched: set[int] = set()
        self.can_punch = True
        self.can_allocate = True
        self.unsynced = False   # written since the last data sync began
        # Slots reserved (to be written whole) since the last take_fresh; None: not kept
        # (only a daemon paces writeback).
        self.fresh: list[int] | None = None

    def known_zero(self, slot: int) -> bool:
        """Does the slot read as zeros (so a partial write needs no zero fill)?"""
        return slot * self.chunk_size >= self.eof or slot in self.punched

    def read(self, slot: int) -> bytearray:
        buf = bytearray(self.chunk_size)
        self.readinto_at(slot * self.chunk_size, memoryview(buf))
        return buf

    def write(self, slot: int, off: int, data) -> None:
        self.writev_at(slot * self.chunk_size + off, [memoryview(data)])

    def rehash(self, g: int, view: memoryview) -> None:
        """Take the block-aligned bytes ``view`` from data-file block ``g`` on as they are:
        write their sums (a format upgrade, a lost sums file, a torn block accepted)."""
        self.write_sums(g, checksum.sums_of(view))

    def take_fresh(self) -> list[int]:
        """The slots reserved since the last call (and from now on keep them)."""
        fresh, self.fresh = self.fresh or [], []
        return fresh

    def take_unsynced(self) -> bool:
        """Was anything written since the last call? (A commit asks, on the loop thread,
        before its data sync: a write after that sets the flag for the next commit.)"""
        was, self.unsynced = self.unsynced, False
        return was

    def sums(self, g: int, n: int):
        """The sums of blocks [g, g + n): indexable u64s (a view or an array)."""
        return self.read_sums(g, n)

    def drop_cache(self, pos: int, size: int) -> None:
        """Forget cached bytes of the range, so that the next read is of the medium
        (scrub). Nothing to do where nothing is cached."""

    # The I/O, each store its own (ChunkStore below has them documented).
    def reserve(self, slots: list[int]) -> None: raise NotImplementedError
    def read_at(self, pos: int, size: int) -> bytes: raise NotImplementedError
    def readinto_at(self, pos: int, buf: memoryview) -> None: raise NotImplementedError
    def writev_at(self, pos: int, views: list) -> None: raise NotImplementedError
    def read_sums(self, g: int, n: int) -> array: raise NotImplementedError
    def write_sums(self, g: int, sums: array) -> None: raise NotImplementedError
    def sums_size(self) -> int: raise NotImplementedError
    def start_writeback(self, slots: list[int]) -> None: raise NotImplementedError
    def sync(self, data: bool = True) -> None: raise NotImplementedError
    def release(self, slots: list[int]) -> None: raise NotImplementedError
    def release_tail(self, first: int) -> None: raise NotImplementedError
    def file_size(self) -> int: raise NotImplementedError
    def allocated_bytes(self) -> int: raise NotImplementedError
    def close(self) -> None: raise NotImplementedError


class ChunkStore(Chunks):
    def __init__(self, path: str, chunk_size: int, *, readonly: bool = False,
                 sums_path: str | None = None):
        super().__init__(chunk_size)
        flags = os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT
        self.fd = os.open(path, flags, 0o600)
        try:
            self.sfd = os.open(sums_path or path + ".sums", flags, 0o600)
        except FileNotFoundError:
            if not readonly:
                raise
            self.sfd = -1          # read-only, none yet (format 2): every sum reads as 0
        self.eof = os.fstat(self.fd).st_size
        self._smap = None
        self._sq = memoryview(b"").cast("Q")

    def reserve(self, slots: list[int]) -> None:
        """Reserve the space of slots about to be written (ascending, consecutive ones
        in one call), so that a full backing filesystem fails the write now (ENOSPC)
        instead of at writeback."""
        cs = self.chunk_size
        for first, count in _runs(slots):
            if self.can_allocate:
                try:
                    fallocate(self.fd, 0, first * cs, count * cs)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                        # All or nothing: a failed fallocate may have allocated part of
                        # its range; the caller frees these slots, so give it back.
                        try:
                            self.release(slots)
                        except OSError as again:
                            log.warning("giving back the space of slots that could not be "
                                        "reserved: %s", again)
                        raise
                    self.can_allocate = False
                else:
                    self.eof = max(self.eof, (first + count) * cs)
        self.punched.difference_update(slots)
        if self.fresh is not None:
            self.fresh += slots

    def read_at(self, pos: int, size: int) -> bytes:
        """``size`` bytes at data-file position ``pos`` (zeros past its end)."""
        data = os.pread(self.fd, size, pos)
        return data if len(data) == size else data + bytes(size - len(data))

    def readinto_at(self, pos: int, buf: memoryview) -> None:
        """Fill ``buf`` from data-file position ``pos``; past its end ``buf`` is zeroed."""
        n = os.preadv(self.fd, [buf], pos)
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    def writev_at(self, pos: int, views: list[memoryview]) -> None:
        """Write the buffers back to back from data-file position ``pos`` (one pwritev for
        a run of consecutive slots)."""
        self.unsynced = True
        try:
            pos += write_all(self.fd, views, pos)
        except OSError as e:
            # Even a failed write may have grown the file: bytes below EOF are not zeros.
            self.eof = max(self.eof, os.fstat(self.fd).st_size)
            raise fatal(e, "writing the data file") from None
        if pos > self.eof:
            self.eof = pos

    # ------------------------------------------------------------ checksums
    def sums(self, g: int, n: int):
        """The sums of blocks [g, g + n), read through a read-only map of the sums file
        (no system call per read; pwrite keeps the page cache, and so the map, current).
        A u64 memoryview, or an array where the map cannot serve."""
        q = self._sq
        if g + n > len(q):
            q = self._remap()
            if g + n > len(q):
                return self.read_sums(g, n)
        return q[g:g + n]

    def _remap(self) -> memoryview:
        size = os.fstat(self.sfd).st_size // SUM_SIZE * SUM_SIZE if self.sfd >= 0 else 0
        if byteorder != "little" or not size:
            return self._sq
        self._smap = mmap.mmap(self.sfd, size, prot=mmap.PROT_READ)
        self._sq = memoryview(self._smap).cast("Q")
        return self._sq

    def read_sums(self, g: int, n: int) -> array:
        """The sums of data-file blocks [g, g + n) (0 where the sums file ends)."""
        data = os.pread(self.sfd, n * SUM_SIZE, g * SUM_SIZE) if self.sfd >= 0 else b""
        a = array("Q")
        a.frombytes(data[:len(data) // SUM_SIZE * SUM_SIZE])
        if byteorder != "little":
            a.byteswap()
        if len(a) < n:
            a.extend(array("Q", bytes(8 * (n - len(a)))))
        return a

    def write_sums(self, g: int, sums: array) -> None:
        if byteorder != "little":
            sums = array("Q", sums)
            sums.byteswap()
        self.unsynced = True
        view = memoryview(sums).cast("B")
        pos = g * SUM_SIZE
        try:
            while view:
                n = os.pwrite(self.sfd, view, pos)
                pos += n
                view = view[n:]
        except OSError as e:
            raise fatal(e, "writing the sums file") from None

    def sums_size(self) -> int:
        """How many blocks the sums file covers."""
        return os.fstat(self.sfd).st_size // SUM_SIZE if self.sfd >= 0 else 0

    def start_writeback(self, slots: list[int]) -> None:
        """Have the kernel start writing these slots' dirty pages now, without waiting
        (sync_file_range WRITE, which reports no writeback error: fdatasync still does).
        For slots written whole and once (copies, new data): paced, this keeps a commit's
        fdatasync from flushing seconds of them in one burst that every read then queues
        behind. In-place rewrites are left to the kernel, which merges them."""
        cs = self.chunk_size
        for first, count in _runs(sorted(set(slots))):
            if _libc.sync_file_range(self.fd, first * cs, count * cs,
                                     SYNC_FILE_RANGE_WRITE) != 0:
                e = ctypes.get_errno()
                raise fatal(OSError(e, os.strerror(e)), "starting writeback of the data file",
                            sync=True)

    def drop_cache(self, pos: int, size: int) -> None:
        try:
            os.posix_fadvise(self.fd, pos, size, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass

    def sync(self, data: bool = True) -> None:
        for fd, what in ((self.fd, "data"), (self.sfd, "sums"))[0 if data else 1:]:
            try:
                os.fdatasync(fd)
            except OSError as e:
                raise fatal(e, f"fdatasync of the {what} file", sync=True) from None

    def release(self, slots: list[int]) -> None:
        """Give the space of durably freed slots back to the backing filesystem."""
        if not self.can_punch or not slots:
            return
        cs = self.chunk_size
        for first, count in _runs(sorted(slots)):
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          first * cs, count * cs)
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                    log.warning("backing filesystem cannot punch holes: freed chunks keep "
                                "their space until reused")
                    self.can_punch = False
                    return
                raise fatal(e, f"punching freed slots {first}-{first + count - 1}",
                            sync=True) from None
            self.punched.update(range(first, first + count))

    def release_tail(self, first: int) -> None:
        """Give back the space of the data file from slot ``first`` (the high-water mark:
        no slot there is in use) to its end. A failure costs space, not data: logged."""
        start = first * self.chunk_size
        if not self.can_punch or self.eof <= start:
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start,
                      self.eof - start)
        except OSError as e:
            log.warning("could not give back the data file's space past slot %d: %s",
                        first, e)

    def file_size(self) -> int:
        return os.fstat(self.fd).st_size

    def allocated_bytes(self) -> int:
        sums = os.fstat(self.sfd).st_blocks if self.sfd >= 0 else 0
        return (os.fstat(self.fd).st_blocks + sums) * 512

    def close(self) -> None:
        self._sq = memoryview(b"").cast("Q")
        if self._smap is not None:
            try:
                self._smap.close()
            except BufferError:     # a view still in use: the map goes with it
                pass
            self._smap = None
        for name in ("fd", "sfd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
