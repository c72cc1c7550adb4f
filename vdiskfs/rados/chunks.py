"""Chunk data in Ceph RADOS: one object per slot, the slot's block sums at its end.

Object ``d.<slot, 16 hex digits>`` in the pool's RADOS namespace holds the chunk's bytes
at [0, chunk_size) and the u64 sum of each 4 KiB block at chunk_size + 8 * block (so a
slot's data and sums live, and go, together). A missing object reads as zeros and its
sums as 0 (which no 4 KiB block sums to: a slot in use whose object is gone is a checksum
error, never zeros served as data).

Writes are sent asynchronously (librados copies the buffer) and are durable once RADOS
acknowledges them; ``sync`` waits for every acknowledgement and reports the first
failure, which is a fail-stop as a failed fdatasync is. Ops on one object from one client
are applied in the order sent, so a read after a write sees it. At most ``MAX_UNACKED``
bytes wait for acknowledgement; beyond that a write waits for the oldest.

Reads wait for RADOS (those of several slots are sent together). The sums of recently
used slots are cached: this process is the pool's only writer (the pool lock).
"""

from __future__ import annotations

import errno
import logging
from array import array
from collections import OrderedDict, deque
from sys import byteorder

from ..cow.checksum import BLOCK, SUM_SIZE
from ..cow.chunkstore import Chunks
from ..cow.errors import StoreFailed, fatal
from .cluster import Where, connect, open_ioctx, rados_module

log = logging.getLogger(__name__)

MAX_UNACKED = 64 << 20         # bytes of writes in flight before a write waits
SUMS_CACHED = 8192             # slots whose sums are kept in memory


def oid(slot: int) -> str:
    return f"d.{slot:016x}"


def slot_of(name: str) -> int | None:
    if name.startswith("d.") and len(name) == 18:
        try:
            return int(name[2:], 16)
        except ValueError:
            return None
    return None


def _os_error(e: Exception, what: str) -> OSError:
    """A librados error as an OSError with its errno (EIO when it has none)."""
    err = getattr(e, "errno", None)
    err = abs(err) if isinstance(err, int) and err else errno.EIO
    return OSError(err, f"{what}: {e}")


class RadosChunks(Chunks):
    @classmethod
    def open(cls, where: Where, chunk_size: int, *, readonly: bool = False) -> "RadosChunks":
        cluster = connect(where)
        try:
            return cls(cluster, open_ioctx(cluster, where), chunk_size, readonly=readonly)
        except BaseException:
            cluster.shutdown()
            raise

    def __init__(self, cluster, ioctx, chunk_size: int, *, readonly: bool = False):
        """``ioctx``: on the pool's namespace; this store closes it and ``cluster``.
        (``readonly``: the engine writes nothing then; RADOS needs no other mode.)"""
        self._rados = rados_module()
        super().__init__(chunk_size)
        self.cluster = cluster
        self.io = ioctx
        self.nb = chunk_size // BLOCK
        self.can_allocate = False
        self._unacked: deque = deque()      # (completion, bytes, what) in send order
        self._unacked_bytes = 0
        self._sums: OrderedDict[int, array] = OrderedDict()
        self.present = bytearray()          # bit per slot: its object exists
        self.count = 0
        for obj in ioctx.list_objects():
            s = slot_of(obj.key)
            if s is not None:
                self._mark(s, True)
                self.eof = max(self.eof, (s + 1) * chunk_size)

    # ------------------------------------------------------------ bookkeeping
    def _mark(self, slot: int, there: bool) -> None:
        byte, bit = divmod(slot, 8)
        if byte >= len(self.present):
            if not there:
                return
            self.present.extend(bytes(byte + 1 - len(self.present) + len(self.present) // 4))
        was = self.present[byte] >> bit & 1
        if there and not was:
            self.present[byte] |= 1 << bit
            self.count += 1
        elif was and not there:
            self.present[byte] &= ~(1 << bit) & 0xFF
            self.count -= 1

    def _is_present(self, slot: int) -> bool:
        byte, bit = divmod(slot, 8)
        return byte < len(self.present) and bool(self.present[byte] >> bit & 1)

    def _pieces(self, pos: int, size: int):
        """(slot, offset in the chunk, length) of a data-file range."""
        cs = self.chunk_size
        while size > 0:
            slot, off = divmod(pos, cs)
            n = min(size, cs - off)
            yield slot, off, n
            pos += n
            size -= n

    # ------------------------------------------------------------ writes
    def _send(self, name: str, data: bytes, offset: int, what: str) -> None:
        try:
            c = self.io.aio_write(name, data, offset)
        except self._rados.Error as e:
            raise fatal(_os_error(e, "librados"), what) from None
        self._unacked.append((c, len(data), what))
        self._unacked_bytes += len(data)
        self.unsynced = True
        while self._unacked_bytes > MAX_UNACKED:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        c, n, what = self._unacked.popleft()
        self._unacked_bytes -= n
        c.wait_for_complete()
        ret = c.get_return_value()
        if ret < 0:
            raise StoreFailed(-ret, f"{what}: RADOS refused the write "
                                    f"({errno.errorcode.get(-ret, -ret)})")

    def reserve(self, slots: list[int]) -> None:
        # RADOS reserves nothing ahead; a full cluster fails the write (at sync).
        self.punched.difference_update(slots)
        if self.fresh is not None:
            self.fresh += slots

    def writev_at(self, pos: int, views: list) -> None:
        data = b"".join(views)     # one copy: librados takes bytes
        at = 0
        for slot, off, n in self._pieces(pos, len(data)):
            self._send(oid(slot), data[at:at + n], off, f"writing slot {slot}")
            self._mark(slot, True)
            at += n
        self.eof = max(self.eof, pos + len(data))

    def write_sums(self, g: int, sums: array) -> None:
        native = sums              # the cache holds values, the objects little-endian
        if byteorder != "little":
            sums = array("Q", sums)
            sums.byteswap()
        raw = memoryview(sums).cast("B")
        at = 0
        while at < len(raw):
            slot, b = divmod(g + at // SUM_SIZE, self.nb)
            n = min(len(raw) - at, (self.nb - b) * SUM_SIZE)
            self._send(oid(slot), bytes(raw[at:at + n]), self.chunk_size + b * SUM_SIZE,
                       f"writing the sums of slot {slot}")
            self._mark(slot, True)
            cached = self._sums.get(slot)
            if cached is not None:
                cached[b:b + n // SUM_SIZE] = native[at // SUM_SIZE:(at + n) // SUM_SIZE]
            at += n
        self.eof = max(self.eof, (g + len(sums)) * BLOCK)

    def sync(self, data: bool = True) -> None:
        """Every write sent so far is acknowledged (durable), or StoreFailed."""
        while self._unacked:
            self._wait_oldest()

    def start_writeback(self, slots: list[int]) -> None:
        """Writes are on their way from the start."""

    # ------------------------------------------------------------ reads
    def _read(self, slot: int, off: int, n: int) -> bytes:
        if not self._is_present(slot):
            return bytes(n)
        try:
            data = self.io.read(oid(slot), n, off)
        except self._rados.ObjectNotFound:
            return bytes(n)
        except self._rados.Error as e:
            raise _os_error(e, f"reading slot {slot}") from None
        return data if len(data) == n else data + bytes(n - len(data))

    def read_at(self, pos: int, size: int) -> bytes:
        pieces = list(self._pieces(pos, size))
        if len(pieces) == 1:
            return self._read(*pieces[0])
        return b"".join(self._read_many(pieces))

    def _read_many(self, pieces) -> list[bytes]:
        """Several slots' ranges, their reads in flight together."""
        got: dict[int, bytes] = {}
        comps = []
        for i, (slot, off, n) in enumerate(pieces):
            if not self._is_present(slot):
                got[i] = bytes(n)
                continue

            def done(c, data, i=i):
                got[i] = data
            try:
                comps.append((i, self.io.aio_read(oid(slot), n, off, done)))
            except self._rados.Error as e:
                raise _os_error(e, f"reading slot {slot}") from None
        for i, c in comps:
            c.wait_for_complete_and_cb()
            ret = c.get_return_value()
            slot, off, n = pieces[i]
            if ret == -errno.ENOENT:
                got[i] = bytes(n)
            elif ret < 0:
                raise OSError(-ret, f"reading slot {slot}: {errno.errorcode.get(-ret, ret)}")
        out = []
        for i, (slot, off, n) in enumerate(pieces):
            data = got.get(i) or b""
            out.append(data if len(data) == n else data + bytes(n - len(data)))
        return out

    def readinto_at(self, pos: int, buf: memoryview) -> None:
        buf[:] = self.read_at(pos, len(buf))

    def _slot_sums(self, slot: int) -> array:
        a = self._sums.get(slot)
        if a is not None:
            self._sums.move_to_end(slot)
            return a
        raw = self._read(slot, self.chunk_size, self.nb * SUM_SIZE)
        a = array("Q")
        a.frombytes(raw)
        if byteorder != "little":
            a.byteswap()
        self._sums[slot] = a
        if len(self._sums) > SUMS_CACHED:
            self._sums.popitem(last=False)
        return a

    def read_sums(self, g: int, n: int) -> array:
        out = array("Q")
        while n > 0:
            slot, b = divmod(g, self.nb)
            k = min(n, self.nb - b)
            out.extend(self._slot_sums(slot)[b:b + k])
            g += k
            n -= k
        return out

    def sums_size(self) -> int:
        return self.eof // BLOCK

    # ------------------------------------------------------------ space
    def release(self, slots: list[int]) -> None:
        """Remove the objects of durably freed slots (their sums go with them)."""
        if not slots:
            return
        comps = []
        for slot in sorted(set(slots)):
            self._sums.pop(slot, None)
            if self._is_present(slot):
                try:
                    comps.append((slot, self.io.aio_remove(oid(slot))))
                except self._rados.Error as e:
                    what = f"removing the object of freed slot {slot}"
                    raise fatal(_os_error(e, "librados"), what, sync=True) from None
            self.punched.add(slot)
        for slot, c in comps:
            c.wait_for_complete()
            ret = c.get_return_value()
            if ret < 0 and ret != -errno.ENOENT:
                raise StoreFailed(-ret, f"removing the object of freed slot {slot}: "
                                        f"{errno.errorcode.get(-ret, ret)}")
            self._mark(slot, False)

    def release_tail(self, first: int) -> None:
        """Remove the objects of every slot from ``first`` on (none is in use)."""
        last = len(self.present) * 8
        tail = [s for s in range(first, last) if self._is_present(s)]
        try:
            self.release(tail)
        except OSError as e:
            log.warning("could not remove the objects past slot %d: %s", first, e)

    def file_size(self) -> int:
        return self.eof

    def allocated_bytes(self) -> int:
        return self.count * (self.chunk_size + self.nb * SUM_SIZE)

    def close(self) -> None:
        try:
            self.sync()
        except OSError as e:
            log.error("closing the RADOS chunk store: %s", e)
        finally:
            if self.io is not None:
                self.io.close()
                self.io = None
                self.cluster.shutdown()
