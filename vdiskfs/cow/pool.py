"""A pool: VDisks as copy-on-write maps over refcounted chunks, with durable metadata.

This is the engine's public face. It is synchronous and single-threaded by contract: the
caller (the FUSE layer's trio loop, fsck, tests) makes every call from one thread. The one
exception is ``Commit.run`` / ``Checkpoint.run``, the blocking part of making things
durable, which touches only immutable snapshots, the data file's fd and the journal file,
so it may run in a worker thread while the loop keeps serving.

Write path (``write``): per chunk, overwrite in place when the chunk is exclusively and
stably owned (one pwrite, no metadata); otherwise copy-on-write into a fresh slot and record
the new mapping in the current transaction.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import logging
import os
import secrets
import time

from . import codec, journal as journal_mod, layout, names
from .chunkstore import ChunkStore
from .clones import Clones
from .errors import FormatError, PoolBusy, VDiskError
from .meta import Metadata, VDisk

log = logging.getLogger(__name__)

DEFAULT_LBA_SIZE = 512
LBA_SIZES = (512, 4096)
MAX_VDISK_SIZE = 1 << 50          # 1 PiB of address space per VDisk
CHECKPOINT_JOURNAL_BYTES = 64 << 20


class Commit:
    """One group commit: data sync, then the journal records, then release freed slots."""

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.data, self.ntxns = pool.journal.take()
        self.offset = pool.journal.end
        m = pool.meta
        self.freed_slots, m.freed_slots = m.freed_slots, []
        self.freed_pids, m.freed_pids = m.freed_pids, []
        self.unstable = (m.unstable_slots, m.unstable_pages)
        m.unstable_slots, m.unstable_pages = set(), set()
        m.inflight.append(self.unstable)
        # No data written since the last data sync (a clone, a rename): skip the fdatasync,
        # a disk cache flush on its own.
        self.sync_data = pool.store.take_unsynced() and pool.sync_data

    def run(self) -> None:
        p = self.pool
        if self.sync_data:
            p.store.sync()
        if self.data:
            p.journal.write_at(self.offset, self.data)
        p.store.release(self.freed_slots)

    def finish(self) -> None:
        p = self.pool
        p.journal.end = self.offset + len(self.data)
        for slot in self.freed_slots:
            heapq.heappush(p.free_slots, slot)
        p.free_pids.extend(self.freed_pids)
        p.meta.inflight.remove(self.unstable)

    def abort(self) -> None:
        """The run failed: keep everything for the next try."""
        p, m = self.pool, self.pool.meta
        p.store.unsynced |= self.sync_data
        p.journal.put_back(self.data, self.ntxns)
        m.freed_slots[:0] = self.freed_slots
        m.freed_pids[:0] = self.freed_pids
        m.unstable_slots |= self.unstable[0]
        m.unstable_pages |= self.unstable[1]
        m.inflight.remove(self.unstable)


class Checkpoint(Commit):
    """A commit that writes the whole state and starts a fresh journal generation."""

    def __init__(self, pool: "Pool"):
        super().__init__(pool)
        self.gen = pool.journal.gen + 1
        self.record = codec.frame_record(pool.meta.to_record(self.gen))

    def run(self) -> None:
        p = self.pool
        if self.sync_data:
            p.store.sync()
        layout.write_file_atomic(p.path, layout.CHECKPOINT, self.record)
        p.journal.replace(self.gen)
        p.store.release(self.freed_slots)

    def finish(self) -> None:
        self.offset = self.pool.journal.end
        self.data = b""
        super().finish()


class _Writes:
    """The data writes of one request, merged into one pwritev per run of consecutive
    slots. Fresh slots are reserved just before; the ops that make the written data
    visible (eset, pset, pmask) are applied only once it is written: nothing points at
    data that is not there, and a failed write gives its fresh slots back."""

    __slots__ = ("pool", "slot", "off", "end", "views", "fresh", "ops")

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.slot = self.off = 0
        self.end = -1                      # data-file position where the run ends
        self.views: list[memoryview] = []
        self.fresh: list[int] = []         # slots to reserve, given back on failure
        self.ops: list[list] = []          # applied after the write

    def add(self, slot: int, off: int, view, op: list | None = None,
            fresh: bool = False) -> None:
        pos = slot * self.pool.chunk_size + off
        if pos != self.end:
            try:
                self.flush()
            except OSError:
                if fresh:
                    heapq.heappush(self.pool.free_slots, slot)
                raise
            self.slot, self.off = slot, off
        self.views.append(view)
        self.end = pos + len(view)
        if fresh:
            self.fresh.append(slot)
        if op is not None:
            self.ops.append(op)

    def flush(self) -> None:
        if not self.views:
            return
        pool, store = self.pool, self.pool.store
        views, fresh, ops = self.views, self.fresh, self.ops
        self.views, self.fresh, self.ops, self.end = [], [], [], -1
        try:
            if fresh:
                store.reserve(fresh)
            store.writev(self.slot, self.off, views)
        except OSError:                    # ENOSPC, EIO: nothing points at them yet
            for s in fresh:
                heapq.heappush(pool.free_slots, s)
            raise
        for op in ops:
            pool._op(op)


class _Transaction:
    """``with pool.transaction:`` groups ops into one journal record. Whatever was applied
    is journaled even if the block fails, so memory and journal always agree."""

    __slots__ = ("pool",)

    def __init__(self, pool: "Pool"):
        self.pool = pool

    def __enter__(self) -> None:
        assert self.pool._txn is None, "nested transaction"
        self.pool._txn = []

    def __exit__(self, *exc) -> None:
        ops, self.pool._txn = self.pool._txn, None
        if ops:
            self.pool.journal.add(ops)


class Pool:
    def __init__(self, path: str, *, readonly: bool = False, sync_data: bool = True,
                 salvage: bool = False, store_class: type = ChunkStore):
        """Open an existing pool (see ``open_pool``/``create_pool``); takes the pool lock.
        ``salvage`` (fsck --repair only) replays the journal up to damage instead of
        refusing the pool. ``store_class`` makes the chunk store (a ChunkStore subclass:
        the benchmark's sparse pool builder)."""
        self.path = os.path.abspath(path)
        self.readonly = readonly
        self.salvage = salvage
        self.sync_data = sync_data  # False only for the test that proves the fsync test fails
        self._lock_fd = -1
        self.store: ChunkStore | None = None
        self.store_class = store_class
        self.journal = journal_mod.Journal(self.path, readonly=readonly)
        self._txn: list | None = None
        self.transaction = _Transaction(self)
        self.open_count: dict[int, int] = {}
        self._dirty_times: set[int] = set()
        try:
            self._lock()
            self.header = layout.read_header(self.path)
            self.chunk_size = self.header["chunk_size"]
            self.page_entries = self.header["page_entries"]
            self.zero = bytes(self.chunk_size)
            self._load()
        except BaseException:
            self.close(commit=False)
            raise

    def _lock(self) -> None:
        lock_path = os.path.join(self.path, layout.LOCK)
        flags = os.O_RDWR | os.O_CREAT
        self._lock_fd = os.open(lock_path, flags, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip()
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise PoolBusy(f"pool {self.path} is in use (by process {holder or '?'})") from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def _load(self) -> None:
        ck_path = os.path.join(self.path, layout.CHECKPOINT)
        with open(ck_path, "rb") as f:
            rec = codec.read_single_record(f.read(), ck_path)
        m = self.meta = Metadata.from_record(rec, ck_path)
        if (m.chunk_size, m.page_entries) != (self.chunk_size, self.page_entries):
            raise FormatError(f"{ck_path}: geometry differs from the pool header")
        gen = rec["gen"]
        self.replayed = 0
        self.salvage_error: str | None = None
        try:
            for batch in self.journal.open_and_read(gen, salvage=self.salvage):
                for ops in batch:
                    for op in ops:
                        m.apply(op)
                    self.replayed += 1
        except FormatError as e:
            if not self.salvage:
                raise
            # fsck --repair: keep what replayed; the rest of the journal is cut below.
            self.salvage_error = str(e)
            self.journal.torn_bytes = os.fstat(self.journal.fd).st_size - self.journal.end
        self.store = self.store_class(os.path.join(self.path, layout.DATA), self.chunk_size,
                                readonly=self.readonly)
        self._rebuild_free_lists()
        self.clones = Clones(self)
        m.freed_slots.clear()
        m.freed_pids.clear()
        m.unstable_slots.clear()
        m.unstable_pages.clear()
        if self.readonly:
            return
        if self.journal.gen != gen:
            log.info("journal generation %s is older than checkpoint %s: not replayed",
                     self.journal.gen, gen)
            self.journal.replace(gen)
        elif self.journal.torn_bytes:
            log.warning("journal: cut a torn tail of %d bytes", self.journal.torn_bytes)
            self.journal.cut_torn_tail()
        self.journal.reserve(self.journal.end)
        # VDisks unlinked while open were waiting for their last close: nothing is open now.
        orphans = [vd for vd in m.vdisks.values() if vd.name is None]
        for vd in orphans:
            with self.transaction:
                self._op(["vdel", vd.vid])

    def _rebuild_free_lists(self) -> None:
        m = self.meta
        self.next_slot = _used_len(m.slot_ref)
        # A min-heap: the lowest free slot goes first, so data freed and rewritten in order
        # lands in order in the data file (and reads back in long preadv runs).
        self.free_slots = [s for s in range(1, self.next_slot) if not m.slot_ref[s]]
        self.next_pid = _used_len(m.page_ref)
        self.free_pids = [p for p in range(self.next_pid - 1, 0, -1) if not m.page_ref[p]]

    # ------------------------------------------------------------ transactions
    def _op(self, op: list) -> None:
        """Apply one op inside ``with self.transaction:``."""
        self.meta.apply(op)
        self._txn.append(op)

    def _alloc_slot(self) -> int:
        if self.free_slots:
            return heapq.heappop(self.free_slots)
        s = self.next_slot
        self.next_slot += 1
        return s

    def _alloc_pid(self) -> int:
        if self.free_pids:
            return self.free_pids.pop()
        p = self.next_pid
        self.next_pid += 1
        return p

    def _private_page(self, vd: VDisk, pidx: int) -> int:
        pid = vd.ptab[pidx]
        if not pid or self.meta.page_ref[pid] != 1:
            self._op(["pcow", vd.vid, pidx, self._alloc_pid()])
            pid = vd.ptab[pidx]
        return pid

    def _check_writable(self) -> None:
        if self.readonly:
            raise VDiskError(errno.EROFS, "pool is open read-only")

    # ------------------------------------------------------------ VDisks
    def vdisks(self) -> list[VDisk]:
        return [vd for vd in self.meta.vdisks.values() if vd.name is not None]

    def lookup(self, name: str) -> VDisk | None:
        return self.meta.by_name(name)

    def get(self, vid: int) -> VDisk | None:
        return self.meta.vdisks.get(vid)

    def _new_props(self, mode: int, uid: int, gid: int, base: dict | None = None) -> dict:
        now = time.time_ns()
        props = {"lba_size": DEFAULT_LBA_SIZE}
        if base:
            props.update(base)
        props.update({"serial": f"{self.header['uuid'][:8]}{secrets.token_hex(4)}"
                                f"{self.meta.next_vid:06x}".upper(),
                      "mode": mode & 0o7777, "uid": uid, "gid": gid,
                      "mtime_ns": now, "ctime_ns": now})
        return props

    def create(self, name: str, size: int = 0, *, mode: int = 0o600, uid: int = 0,
               gid: int = 0) -> VDisk:
        self._check_writable()
        names.check(name)
        if name in self.meta.names:
            raise VDiskError(errno.EEXIST, f"{name} exists")
        _check_size(size)
        vid = self.meta.next_vid
        with self.transaction:
            self._op(["vnew", vid, name, size, self._new_props(mode, uid, gid)])
        return self.meta.vdisks[vid]

    def clone_props(self, src: VDisk) -> dict:
        """A clone inherits the source's properties and owner, and gets its own serial."""
        p = src.props
        return self._new_props(p["mode"], p["uid"], p["gid"], base={"lba_size": p["lba_size"]})

    def clone(self, src: VDisk, dst_name: str) -> VDisk:
        """Make ``dst_name`` a copy of ``src`` sharing all its pages, in one transaction
        (the engine primitive; the mount's clones are resumable jobs: cow/clones.py)."""
        self._check_writable()
        names.check(dst_name)
        if dst_name in self.meta.names:
            raise VDiskError(errno.EEXIST, f"{dst_name} exists")
        vid = self.meta.next_vid
        with self.transaction:
            self._op(["vnew", vid, dst_name, src.size, self.clone_props(src)])
            self._op(["vshare", src.vid, vid, 0, len(src.ptab)])
        return self.meta.vdisks[vid]

    def _check_not_cloning(self, vd: VDisk) -> None:
        """A clone source or an unfinished destination cannot go away or change shape."""
        if self.clones.busy_source(vd):
            raise VDiskError(errno.EBUSY, f"{vd.name} has a clone in progress")
        if self.clones.unfinished(vd):
            raise VDiskError(errno.EBUSY, f"{vd.name} is an unfinished clone")

    def rename(self, vd: VDisk, new: str, *, replace: bool = True,
               target_in_use: bool = False) -> None:
        self._check_writable()
        names.check(new)
        if vd.name == new:
            return
        other = self.meta.by_name(new)
        if other is not None and not replace:
            raise VDiskError(errno.EEXIST, f"{new} exists")
        self._check_not_cloning(vd)
        if other is not None:
            if self.clones.unfinished(other):
                raise VDiskError(errno.EEXIST, f"{new} is reserved by a clone in progress")
            self._check_not_cloning(other)
        with self.transaction:
            if other is not None:
                self._unlink_op(other, target_in_use)
            self._op(["vset", vd.vid, "name", new])

    def _unlink_op(self, vd: VDisk, in_use: bool) -> None:
        if in_use or self.open_count.get(vd.vid):
            self._op(["vset", vd.vid, "name", None])   # freed by forget()
        else:
            self._op(["vdel", vd.vid])

    def unlink(self, vd: VDisk, *, in_use: bool = False) -> None:
        """Remove the name. A VDisk still open or ``in_use`` (the kernel still knows the
        inode) keeps its data until ``forget``; the next mount frees any left over."""
        self._check_writable()
        self._check_not_cloning(vd)
        with self.transaction:
            self._unlink_op(vd, in_use)

    def forget(self, vd: VDisk) -> None:
        """Nothing refers to this VDisk any more: free it if it was unlinked."""
        if vd.name is None and vd.vid in self.meta.vdisks and not self.open_count.get(vd.vid):
            with self.transaction:
                self._op(["vdel", vd.vid])

    def opened(self, vd: VDisk) -> None:
        self.open_count[vd.vid] = self.open_count.get(vd.vid, 0) + 1

    def released(self, vd: VDisk) -> None:
        n = self.open_count[vd.vid] - 1
        if n:
            self.open_count[vd.vid] = n
        else:
            del self.open_count[vd.vid]

    def set_prop(self, vd: VDisk, key: str, value) -> None:
        self._check_writable()
        if key == "lba_size":
            if value not in LBA_SIZES:
                raise VDiskError(errno.EINVAL, f"lba_size must be one of {LBA_SIZES}")
            if self.open_count.get(vd.vid) or self.clones.unfinished(vd):
                raise VDiskError(errno.EBUSY, f"{vd.name} is in use")
        with self.transaction:
            self._op(["vset", vd.vid, key, value])

    def touch(self, vd: VDisk, **times: int) -> None:
        """Set mtime_ns/ctime_ns/mode/uid/gid (journaled like any property)."""
        self._check_writable()
        with self.transaction:
            for k, v in times.items():
                if vd.props.get(k) != v:
                    self._op(["vset", vd.vid, k, v])

    # ------------------------------------------------------------ data path
    def read(self, vd: VDisk, off: int, size: int) -> bytes | bytearray:
        if off >= vd.size or size <= 0:
            return b""
        size = min(size, vd.size - off)
        cs, pe = self.chunk_size, self.page_entries
        store = self.store
        partial = self.meta.partial
        cidx, coff = divmod(off, cs)
        if coff + size <= cs:                       # within one chunk (small reads)
            slot = self.meta.slot_of(vd, cidx)
            if not slot:
                return bytes(size)
            if slot not in partial:
                data = store.pread(slot, coff, size)
                return data if len(data) == size else data + bytes(size - len(data))
        ptab, pages = vd.ptab, self.meta.pages
        runs = []   # [buffer position, slot, offset in slot, length]: consecutive slots merged
        pos = 0
        while pos < size:
            cidx, coff = divmod(off + pos, cs)
            n = min(cs - coff, size - pos)
            pid = ptab[cidx // pe]
            slot = pages[pid][cidx % pe] if pid else 0
            if slot:
                for src, soff, ln in (self._sources(slot, coff, n) if slot in partial
                                      else ((slot, coff, n),)):
                    last = runs[-1] if runs else None
                    if (last and last[0] + last[3] == pos
                            and last[1] * cs + last[2] + last[3] == src * cs + soff):
                        last[3] += ln
                    else:
                        runs.append([pos, src, soff, ln])
                    pos += ln
            else:
                pos += n
        if len(runs) == 1 and runs[0][3] == size:
            # One run (most requests): one pread, no zero-filled buffer to fill.
            data = store.pread(runs[0][1], runs[0][2], size)
            return data if len(data) == size else data + bytes(size - len(data))
        out = bytearray(size)
        mv = memoryview(out)
        for pos, slot, coff, n in runs:
            store.readinto(slot, coff, mv[pos:pos + n])
        return out

    def write(self, vd: VDisk, off: int, data) -> int:
        self._check_writable()
        mv = memoryview(data)
        end = off + len(mv)
        if off < 0:
            raise VDiskError(errno.EINVAL, "negative offset")
        if end > MAX_VDISK_SIZE:
            raise VDiskError(errno.EFBIG, "write past the largest VDisk size")
        with self.transaction:
            if vd.vid in self.clones.sources:
                span = self.chunk_size * self.page_entries
                self.clones.guard(vd, min(off, vd.size) // span, (end - 1) // span + 1)
            if off > vd.size:
                self._zero_tail(vd)
            if end > vd.size:
                self._op(["vsize", vd.vid, end])
            cs = self.chunk_size
            out = _Writes(self)
            pos = 0
            while pos < len(mv):
                cidx, coff = divmod(off + pos, cs)
                n = min(cs - coff, len(mv) - pos)
                self._write_chunk(vd, cidx, coff, mv[pos:pos + n], out)
                pos += n
            out.flush()
        vd.props["mtime_ns"] = time.time_ns()
        self._dirty_times.add(vd.vid)
        return len(mv)

    def _write_chunk(self, vd: VDisk, cidx: int, coff: int, piece: memoryview,
                     out: _Writes) -> None:
        m, cs, store = self.meta, self.chunk_size, self.store
        pidx, i = divmod(cidx, self.page_entries)
        pid = vd.ptab[pidx]
        slot = m.pages[pid][i] if pid else 0
        n = len(piece)
        if slot and m.exclusive(pid, slot):
            p = m.partial.get(slot)
            if p is not None:                          # in place, filling in blocks
                if self.zero.startswith(piece):
                    chunk = self._read_chunk(slot)
                    chunk[coff:coff + n] = piece
                    if self.zero.startswith(chunk):
                        self._op(["eset", vd.vid, cidx, 0])   # zero detection, as below
                        return
                base, mask = p
                start, view, bits = self._span(coff, piece, lambda b: self._block(
                    slot if mask >> (b // m.block_size) & 1 else base, b))
                out.add(slot, start, view,
                        ["pmask", slot, mask | bits] if mask | bits != mask else None)
                return
            zero = self.zero.startswith(piece)
            if zero and (n == cs or self._zero_after(slot, coff, piece)):
                self._op(["eset", vd.vid, cidx, 0])   # zero detection frees the chunk
            else:
                out.add(slot, coff, piece)             # the fast path: in place
            return
        # The chunk is a hole or shared: its new contents go to a fresh slot.
        zero = self.zero.startswith(piece)
        if slot and n < cs and not zero and m.full_mask > 1 and slot not in m.partial:
            # A small write into a shared chunk: a partial slot with just the blocks
            # written; the rest stays in the old slot (no read, no copy of the chunk).
            self._private_page(vd, pidx)
            new = self._alloc_slot()
            start, view, bits = self._span(coff, piece, lambda b: self._block(slot, b))
            if bits == m.full_mask:
                out.add(new, 0, view, ["eset", vd.vid, cidx, new], fresh=True)
            else:
                out.add(new, start, view, ["pset", vd.vid, cidx, new, slot, bits], fresh=True)
            return
        if slot and n < cs:
            chunk = self._read_chunk(slot)              # copy-on-write of the whole chunk
            chunk[coff:coff + n] = piece
            piece, coff = memoryview(chunk), 0
            zero = self.zero.startswith(chunk)
        if zero:
            if slot:
                self._private_page(vd, pidx)
                self._op(["eset", vd.vid, cidx, 0])
            return                                      # zeros into a hole: nothing to do
        self._private_page(vd, pidx)
        new = self._alloc_slot()
        if len(piece) < cs and not store.known_zero(new):
            buf = bytearray(cs)                         # a reused slot may hold old bytes
            buf[coff:coff + len(piece)] = piece
            piece, coff = memoryview(buf), 0
        out.add(new, coff, piece, ["eset", vd.vid, cidx, new], fresh=True)

    def _span(self, coff: int, piece: memoryview, fill) -> tuple[int, memoryview, int]:
        """Widen a write of ``piece`` at ``coff`` to whole blocks: (start, data, block
        mask). ``fill(block_offset)`` gives the current bytes of a partly written block."""
        bs = self.meta.block_size
        end = coff + len(piece)
        start, stop = coff // bs * bs, -(-end // bs) * bs
        bits = ((1 << ((stop - start) // bs)) - 1) << (start // bs)
        if start == coff and stop == end:
            return start, piece, bits
        buf = bytearray(stop - start)
        if start < coff:
            buf[:bs] = fill(start)
        if stop > end and (stop - bs > start or start == coff):
            buf[-bs:] = fill(stop - bs)
        buf[coff - start:end - start] = piece
        return start, memoryview(buf), bits

    def _block(self, slot: int, off: int) -> bytes:
        bs = self.meta.block_size
        data = self.store.pread(slot, off, bs)
        return data if len(data) == bs else data + bytes(bs - len(data))

    def _sources(self, slot: int, coff: int, n: int) -> list[tuple[int, int, int]]:
        """Where bytes [coff, coff + n) of a partial slot's chunk are: (slot, offset,
        length) pieces, from the slot for the blocks it holds, else from its base."""
        base, mask = self.meta.partial[slot]
        bs = self.meta.block_size
        out = []
        pos, end = coff, coff + n
        while pos < end:
            held = mask >> (pos // bs) & 1
            stop = min(end, (pos // bs + 1) * bs)
            while stop < end and (mask >> (stop // bs) & 1) == held:
                stop = min(end, stop + bs)
            out.append((slot if held else base, pos, stop - pos))
            pos = stop
        return out

    def _read_chunk(self, slot: int) -> bytearray:
        """A chunk's whole contents (partial slots merged with their base)."""
        if slot not in self.meta.partial:
            return self.store.read(slot)
        buf = bytearray(self.chunk_size)
        mv = memoryview(buf)
        for src, off, n in self._sources(slot, 0, self.chunk_size):
            self.store.readinto(src, off, mv[off:off + n])
        return buf

    def _zero_tail(self, vd: VDisk) -> None:
        """Zero the last chunk past the end before the VDisk grows: those bytes are junk
        (left by a shrink, or by an in-place write whose size change a crash lost)."""
        cs = self.chunk_size
        tail = vd.size % cs
        if tail and self.meta.slot_of(vd, vd.size // cs):
            out = _Writes(self)
            self._write_chunk(vd, vd.size // cs, tail, memoryview(self.zero)[:cs - tail], out)
            out.flush()

    def _zero_after(self, slot: int, coff: int, piece: memoryview) -> bool:
        """After writing zeros ``piece`` at ``coff``, is the whole chunk zero?"""
        buf = self.store.read(slot)
        buf[coff:coff + len(piece)] = piece
        return self.zero.startswith(buf)

    def truncate(self, vd: VDisk, size: int) -> None:
        self._check_writable()
        _check_size(size)
        if size == vd.size:
            return
        if self.clones.unfinished(vd):
            raise VDiskError(errno.EBUSY, f"{vd.name} is an unfinished clone")
        pe = self.page_entries
        if size > vd.size:
            with self.transaction:
                if vd.vid in self.clones.sources:
                    span = self.chunk_size * pe
                    self.clones.guard(vd, vd.size // span, vd.size // span + 1)
                self._zero_tail(vd)
                self._op(["vsize", vd.vid, size])
            return
        with self.transaction:
            first_gone = self.meta.chunks_for(size)
            if vd.vid in self.clones.sources:
                self.clones.guard(vd, size // self.chunk_size // pe, len(vd.ptab))
            last_page_end = min(len(vd.ptab) * pe, self.meta.pages_for(size) * pe)
            for cidx in range(first_gone, last_page_end):
                if self.meta.slot_of(vd, cidx):
                    self._private_page(vd, cidx // pe)
                    self._op(["eset", vd.vid, cidx, 0])
            self._op(["vsize", vd.vid, size])
            self._zero_tail(vd)   # frees the last chunk if only zeros remain
        vd.props["mtime_ns"] = time.time_ns()
        self._dirty_times.add(vd.vid)

    # ------------------------------------------------------------ figures
    def usage(self, vd: VDisk) -> dict:
        allocated, unique = self.meta.usage(vd)
        return {"allocated": allocated, "unique": unique, "shared": allocated - unique}

    def used_bytes(self) -> int:
        """Backing space taken by the pool: chunk data plus metadata."""
        total = self.store.allocated_bytes()
        for name in (layout.CHECKPOINT, layout.JOURNAL):
            try:
                total += os.stat(os.path.join(self.path, name)).st_blocks * 512
            except FileNotFoundError:
                pass
        return total

    def frees_pending(self) -> bool:
        """Are slots waiting for a commit before they can be reused?"""
        return bool(self.meta.freed_slots or self.meta.inflight)

    def is_dirty(self) -> bool:
        return bool(self.journal.buffer or self.meta.freed_slots)

    # ------------------------------------------------------------ durability
    def prepare_commit(self) -> Commit:
        self._flush_times()
        return Commit(self)

    def prepare_checkpoint(self) -> Checkpoint:
        self._flush_times()
        return Checkpoint(self)

    def _flush_times(self) -> None:
        # mtimes change on every write; journal only the latest value, once per commit.
        dirty, self._dirty_times = self._dirty_times, set()
        with self.transaction:
            for vid in dirty:
                vd = self.meta.vdisks.get(vid)
                if vd is not None:
                    self._op(["vset", vid, "mtime_ns", vd.props["mtime_ns"]])

    def wants_checkpoint(self) -> bool:
        return self.journal.size() > CHECKPOINT_JOURNAL_BYTES

    def sync(self) -> None:
        """Blocking commit (for callers without an event loop)."""
        self._run(self.prepare_commit())

    def checkpoint(self) -> None:
        self._run(self.prepare_checkpoint())

    @staticmethod
    def _run(batch: Commit) -> None:
        try:
            batch.run()
        except BaseException:
            batch.abort()
            raise
        batch.finish()

    def close(self, *, commit: bool = True) -> None:
        """Checkpoint (if asked and writable), then release files and the lock."""
        try:
            if commit and not self.readonly and self.store is not None:
                self.checkpoint()
        finally:
            if self.store is not None:
                self.store.close()
            self.journal.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


def create_pool(path: str, chunk_size: int = layout.DEFAULT_CHUNK_SIZE,
                page_entries: int = layout.DEFAULT_PAGE_ENTRIES) -> None:
    """Make a new pool in ``path`` (missing or empty directory)."""
    layout.check_chunk_size(chunk_size)
    os.makedirs(path, exist_ok=True)
    if os.listdir(path):
        raise FileExistsError(f"{path} is not empty and holds no vdiskfs pool")
    hdr = layout.header_record(chunk_size, page_entries)
    m = Metadata(chunk_size, page_entries)
    layout.write_file_atomic(path, layout.CHECKPOINT, codec.frame_record(m.to_record(0)))
    journal_mod.create(path, 0)
    os.close(os.open(os.path.join(path, layout.DATA), os.O_CREAT | os.O_WRONLY, 0o600))
    # The header comes last: its presence is what makes the directory a pool.
    layout.write_file_atomic(path, layout.HEADER, codec.frame_record(hdr))


def open_pool(path: str, *, create: bool = False, chunk_size: int | None = None,
              **kw) -> Pool:
    """Open the pool in ``path``; with ``create``, make it first if the directory is empty."""
    if not os.path.exists(os.path.join(path, layout.HEADER)):
        if not create:
            raise FileNotFoundError(f"{path} is not a vdiskfs pool (no {layout.HEADER})")
        create_pool(path, layout.DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size)
    elif chunk_size is not None:
        have = layout.read_header(path)["chunk_size"]
        if have != chunk_size:
            raise ValueError(f"pool {path} has chunk size {have}; it cannot be changed")
    return Pool(path, **kw)


def _used_len(a) -> int:
    """1 + the highest index with a nonzero value (at least 1: index 0 is never used)."""
    n = len(a)
    while n > 1 and not a[n - 1]:
        n -= 1
    return max(n, 1)


def _check_size(size: int) -> None:
    if size < 0:
        raise VDiskError(errno.EINVAL, "negative size")
    if size > MAX_VDISK_SIZE:
        raise VDiskError(errno.EFBIG, f"size larger than {MAX_VDISK_SIZE} bytes")
