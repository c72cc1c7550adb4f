"""A pool: its files, its VDisks, and the engine's public face.

``Pool`` opens a pool (lock, header, checkpoint, journal replay, recovery) and wires the
parts that do the work, each the single owner of its state:

    meta      metadata.Metadata   the persistent state and the ops that change it
    space     space.Space         free slots and page ids, deferred frees, unstable sets
    store     chunkstore          chunk data (slots in the data file)
    data      datapath.DataPath   reads and writes of VDisk bytes (plans, I/O, ops)
    txn       commit.Transactions the live op log (``with pool.txn:``)
    commits   commit.Commits      group commits and checkpoints
    clones    clones.Clones       clone jobs

Here live the VDisk namespace (create, rename, unlink, properties) and the checks every
request needs (names, sizes, read-only, clone state). The engine is synchronous and
single-threaded by contract: the caller (the FUSE layer's trio loop, fsck, tests) makes
every call from one thread. The exception is ``Commit.run``, the blocking part of making
things durable (cow/commit.py), which may run in a worker thread.

What happens on a write: ``Pool.write`` checks it, lets running clones take the pages it
will change (``Clones.guard``), grows the VDisk, and applies the ops that
``DataPath.write`` returns once the data is written (datapath.py says how).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator

from . import checksum, codec, journal as journal_mod, layout, names, props
from .chunkstore import Chunks, ChunkStore
from .clones import Clones
from .commit import FAILED, Commit, Commits, FailStop, Transactions
from .datapath import DataPath
from .errors import FormatError, PoolBusy, StoreFailed, VDiskError
from .meta import Metadata, VDisk
from .space import Space

log = logging.getLogger(__name__)

MAX_VDISK_SIZE = 1 << 50          # 1 PiB of address space per VDisk

# fallocate(2) mode bits (linux/falloc.h) a VDisk takes; the kernel refuses the others.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_MODES = (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
SEEK_DATA, SEEK_HOLE = os.SEEK_DATA, os.SEEK_HOLE
PUNCH_BATCH = 16    # slots per deferred punch: each run holds the data file's inode lock


class JournalMissing(FormatError):
    """A sound checkpoint without its journal: refused, not papered over."""


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
        self._lock_fd = -1
        self.store: Chunks | None = None
        self.journal: journal_mod.Journal | None = None
        self.open_count: dict[int, int] = {}
        self.notes: list[str] = []        # damage the open found and worked around
        self.cut_checkpoint = False       # a crash cut a new generation short
        self.io_count = 0                 # data requests served (the puncher's idle test)
        try:
            self._lock()
            self._read_header()
            self._load()
            self.store = self._open_store(store_class)
            self.space = Space(self.meta)
            self.failstop = FailStop(self.path)
            self.txn = Transactions(self.meta, self.journal, readonly, self.failstop)
            self.commits = Commits(self.path, self.meta, self.space, self.store,
                                   self.journal, self.txn, self.uuid, sync_data)
            self.data = DataPath(self.meta, self.space, self.store)
            # Slots hot now may hold a block an in-place write was cutting when the pool
            # went down: a mismatch there is accepted once (datapath.py).
            self.data.suspect = set(self.meta.hot_slots())
            self.data.verify = self.version >= 3
            self.data.accept = not readonly
            self.clones = Clones(self.meta, self.space, self.txn, self.uuid)
            self._check_files()
            if not readonly:
                self._recover()
                # A crash between a commit and the punch of what it freed leaves free
                # slots holding space (a daemon defers punches until I/O pauses): the
                # data file past the highest slot in use is punched now, and every free
                # slot below it again (a hole costs little to punch twice), by the
                # daemon's puncher or at close.
                self.store.release_tail(self.space.next_slot)
                self.space.owe_punches()
        except BaseException:
            self.close(commit=False)
            raise

    # ------------------------------------------------------------ open
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

    def _open_store(self, store_class: type) -> Chunks:
        where = self.header.get("store")
        if where is None:
            return store_class(os.path.join(self.path, layout.DATA), self.chunk_size,
                               readonly=self.readonly,
                               sums_path=os.path.join(self.path, layout.SUMS))
        from ..rados.chunks import RadosChunks, Where     # only pools that use it
        return RadosChunks.open(Where.from_record(where), self.chunk_size,
                                readonly=self.readonly)

    def _read_header(self) -> None:
        """Either copy of the header will do; copies that disagree are from two pools and
        the checkpoint decides (``_load``)."""
        good, bad = layout.read_headers(self.path)
        if not good:
            raise FormatError("no readable pool header: " + "; ".join(bad))
        self.header = good[0][1]
        self._headers = good
        self.bad_headers = bad
        self.chunk_size = self.header["chunk_size"]
        self.page_entries = self.header["page_entries"]
        self.uuid = self.header["uuid"]

    def _load(self) -> None:
        """The newest readable checkpoint, then the journals of its generation and the
        next (docs/FORMAT.md, "Generations"): if the current checkpoint is damaged or
        missing, the previous one and its journal give the same state."""
        errors = []
        current_missing = False
        for name in (layout.CHECKPOINT, layout.CHECKPOINT_PREV):
            ck_path = os.path.join(self.path, name)
            try:
                self._load_from(ck_path)
            except FileNotFoundError:
                errors.append(f"{ck_path} is missing")
                current_missing |= name == layout.CHECKPOINT
            except (JournalMissing, codec.NewerFormat):
                raise      # the checkpoint is sound (or newer): no fallback papers over it
            except FormatError as e:
                errors.append(str(e))
                if self.journal is not None:
                    self.journal.close()
                    self.journal = None
            else:
                self.loaded_from = name
                if current_missing and os.path.exists(
                        os.path.join(self.path, layout.CHECKPOINT) + ".tmp"):
                    self.cut_checkpoint = True     # a crash between its renames: no damage
                    log.info("a crash cut a new checkpoint short; loaded the previous "
                             "generation (%s)", name)
                elif errors:
                    self.notes.append(f"{errors[0]}; loaded the previous generation instead")
                    log.warning("%s; loaded the previous generation (%s) instead",
                                errors[0], name)
                return
        raise FormatError("; ".join(errors) if len(errors) > 1 else errors[0])

    def _load_from(self, ck_path: str) -> None:
        with open(ck_path, "rb") as f:
            rec = codec.read_single_record(f.read(), ck_path)
        m = Metadata.from_record(rec, ck_path)
        if rec.get("uuid", self.uuid) != self.uuid:          # format 3 on
            for name, hdr in self._headers[1:]:              # a header copied in?
                if hdr["uuid"] == rec["uuid"]:
                    break
            else:
                raise FormatError(f"{ck_path}: belongs to another pool (uuid {rec['uuid']}, "
                                  f"the pool header says {self.uuid})")
            self.header, self.uuid = hdr, hdr["uuid"]
            self.bad_headers.append(f"{os.path.join(self.path, self._headers[0][0])} is "
                                    "from another pool")
        if (m.chunk_size, m.page_entries) != (self.chunk_size, self.page_entries):
            raise FormatError(f"{ck_path}: geometry differs from the pool header")
        self.meta = m
        self.version = rec["v"]
        self.gen = rec["gen"]
        self.replayed = 0
        self.salvage_error: str | None = None
        want = self.gen
        for name in (layout.JOURNAL_PREV, layout.JOURNAL):
            j = journal_mod.Journal(self.path, self.uuid, readonly=self.readonly, name=name)
            try:
                self._replay(j, want)
            except FileNotFoundError:
                continue
            except BaseException:
                j.close()
                raise
            if j.gen != want:       # an older generation's: not replayed
                j.close()
                continue
            if self.journal is not None:
                self.journal.close()
            self.journal = j
            want += 1
            if self.salvage_error:
                break
        if self.journal is None:
            what = (f"{os.path.join(self.path, layout.JOURNAL)}: no journal of generation "
                    f"{self.gen} (missing or replaced)")
            if not self.salvage:
                raise JournalMissing(f"{what}: changes made after the checkpoint would be "
                                     "lost; 'vdiskfs fsck --repair' starts a new, empty "
                                     "journal")
            self.salvage_error = f"{what}; changes after the checkpoint, if any, are lost"
        else:
            self.gen = want - 1

    def _replay(self, j: "journal_mod.Journal", gen: int) -> None:
        try:
            for batch in j.open_and_read(gen, salvage=self.salvage):
                for ops in batch:
                    for op in ops:
                        self.meta.apply(op)
                    self.replayed += 1
        except FormatError as e:
            if not self.salvage:
                raise
            # fsck --repair: keep what replayed; the rest of the journal is cut below.
            self.salvage_error = str(e)
            j.salvaged()

    def highest_mapped_slot(self) -> int:
        pages = self.meta.pages.values()
        return max((max(page) for page in pages), default=0)

    def _check_files(self) -> None:
        """Refuse a pool whose data or sums file lacks chunks its maps point at: those
        would read as zeros, or fail their checksums, in place of lost data. (Read-only,
        for fsck, whose checks report each such chunk.)"""
        if self.readonly or self.salvage:
            return
        highest = max(self.highest_mapped_slot(), *(b for b, _ in self.meta.partial.values()),
                      0)
        if not highest:
            return
        cs, nb = self.chunk_size, self.chunk_size // checksum.BLOCK
        data_path = os.path.join(self.path, layout.DATA)
        size = self.store.file_size()
        if highest * cs >= size:
            raise FormatError(f"{data_path} holds {size} bytes, but slot {highest} (bytes "
                              f"{highest * cs}-{(highest + 1) * cs - 1}) is in use: the data "
                              "file was truncated or replaced")
        if self.version >= 3 and self.store.sums_size() < (highest + 1) * nb:
            raise FormatError(f"{os.path.join(self.path, layout.SUMS)} covers "
                              f"{self.store.sums_size()} blocks, but slot {highest} needs "
                              f"{(highest + 1) * nb}: the sums file was truncated or replaced")

    def previous_failure(self) -> str | None:
        """Why the last session stopped writing (POOL/failed), if it did."""
        try:
            with open(os.path.join(self.path, FAILED)) as f:
                return f.read().strip() or "unknown"
        except FileNotFoundError:
            return None

    def _recover(self) -> None:
        """Make the files agree with what was loaded; free what a crash left behind."""
        why = self.previous_failure()
        if why:
            log.warning("the last session stopped writing after an I/O error (%s); this "
                        "open starts from what was durable before it", why)
            os.unlink(os.path.join(self.path, FAILED))
        if self.version < 3:
            self._add_sums()
        for bad in self.bad_headers:
            log.warning("pool header: %s; rewriting it from the good copy", bad)
            self.notes.append(f"pool header: {bad}; rewritten from the good copy")
        if self.bad_headers:
            layout.write_headers(self.path, self.header)
        j = self.journal
        if j is None or j.path != os.path.join(self.path, layout.JOURNAL):
            # No journal of this generation yet (a crash during a checkpoint), or only
            # the previous generation's: a checkpoint puts both generations in order.
            self._settle_generations()
            return
        if j.torn_bytes:
            log.warning("journal: cut a torn tail of %d bytes", j.torn_bytes)
            j.cut_torn_tail()
        for path in j.unhealthy():
            log.warning("journal copy %s was damaged or missing: rewritten from the other",
                        path)
        j.heal()
        j.reserve(j.end)
        if self.loaded_from != layout.CHECKPOINT:
            self._settle_generations()
        self._free_orphans()

    def _settle_generations(self) -> None:
        if self.journal is None:
            self.journal = journal_mod.Journal(self.path, self.uuid)
            self.journal.gen = self.gen
            self.txn.journal = self.commits.journal = self.journal
        # Twice: the first one moves whatever was damaged to the previous generation,
        # the second replaces it with a good one.
        self.checkpoint()
        self.checkpoint()
        self._free_orphans()

    def _free_orphans(self) -> None:
        # VDisks unlinked while open were waiting for their last close: nothing is open now.
        orphans = [vd.vid for vd in self.meta.vdisks.values() if vd.name is None]
        for vid in orphans:
            with self.txn:
                self.txn.apply(["vdel", vid])

    def _add_sums(self) -> None:
        """Upgrade from format 2: compute the sums of every slot in use (a scan of the
        data), make them durable, then checkpoint in this format."""
        log.info("format %d pool: computing the checksums of its data (once)", self.version)
        m, cs = self.meta, self.chunk_size
        nb = cs // checksum.BLOCK
        for s in range(1, len(m.slot_ref)):
            if m.slot_ref[s]:
                self.store.rehash(s * nb, memoryview(self.store.read(s)))
        self.store.sync()
        self.version = codec.FORMAT_VERSION
        self.data.verify = True
        self.checkpoint()

    # ------------------------------------------------------------ VDisks
    def vdisks(self) -> list[VDisk]:
        return [vd for vd in self.meta.vdisks.values() if vd.name is not None]

    def lookup(self, name: str) -> VDisk | None:
        return self.meta.by_name(name)

    def get(self, vid: int) -> VDisk | None:
        return self.meta.vdisks.get(vid)

    def _check_new_name(self, name: str) -> None:
        self.txn.check_writable()
        names.check(name)
        if name in self.meta.names:
            raise VDiskError(errno.EEXIST, f"{name} exists")

    def create(self, name: str, size: int = 0, *, mode: int = 0o600, uid: int = 0,
               gid: int = 0) -> VDisk:
        self._check_new_name(name)
        _check_size(size)
        vid = self.meta.next_vid
        with self.txn:
            self.txn.apply(["vnew", vid, name, size,
                            props.new(self.header["uuid"], vid, mode, uid, gid)])
        return self.meta.vdisks[vid]

    def clone(self, src: VDisk, dst_name: str) -> VDisk:
        """Make ``dst_name`` a copy of ``src`` sharing all its pages, in one transaction
        (the engine primitive; the mount's clones are resumable jobs: cow/clones.py)."""
        self._check_new_name(dst_name)
        vid = self.meta.next_vid
        with self.txn:
            self.txn.apply(["vnew", vid, dst_name, src.size,
                            props.for_clone(self.header["uuid"], vid, src.props)])
            self.txn.apply(["vshare", src.vid, vid, 0, src.npages])
        return self.meta.vdisks[vid]

    def rename(self, vd: VDisk, new: str, *, replace: bool = True,
               target_in_use: bool = False) -> None:
        self.txn.check_writable()
        names.check(new)
        if vd.name == new:
            return
        other = self.meta.by_name(new)
        if other is not None and not replace:
            raise VDiskError(errno.EEXIST, f"{new} exists")
        self.clones.check_not_cloning(vd)
        if other is not None:
            if self.clones.unfinished(other):
                raise VDiskError(errno.EEXIST, f"{new} is reserved by a clone in progress")
            self.clones.check_not_cloning(other)
            self._check_not_open(other)
        with self.txn:
            if other is not None:
                self._unlink_op(other, target_in_use)
            self.txn.apply(["vset", vd.vid, "name", new])

    def _check_not_open(self, vd: VDisk) -> None:
        """An open VDisk (a loop device, qemu, an NBD export, any process) is not deleted
        or replaced under its user, as ``rbd rm`` refuses an image with watchers."""
        if self.open_count.get(vd.vid):
            raise VDiskError(errno.EBUSY, f"{vd.name} is in use")

    def _unlink_op(self, vd: VDisk, in_use: bool) -> None:
        if in_use:
            self.txn.apply(["vset", vd.vid, "name", None])   # freed by forget()
        else:
            self.txn.apply(["vdel", vd.vid])

    def unlink(self, vd: VDisk, *, in_use: bool = False) -> None:
        """Remove the name; EBUSY while the VDisk is open. One the kernel still knows
        (``in_use``: it may still hold the inode) keeps its data until ``forget``; the
        next mount frees any left over."""
        self.txn.check_writable()
        self.clones.check_not_cloning(vd)
        self._check_not_open(vd)
        with self.txn:
            self._unlink_op(vd, in_use)

    def forget(self, vd: VDisk) -> None:
        """Nothing refers to this VDisk any more: free it if it was unlinked."""
        if vd.name is None and vd.vid in self.meta.vdisks and not self.open_count.get(vd.vid):
            with self.txn:
                self.txn.apply(["vdel", vd.vid])

    def opened(self, vd: VDisk) -> None:
        self.open_count[vd.vid] = self.open_count.get(vd.vid, 0) + 1

    def released(self, vd: VDisk) -> None:
        n = self.open_count[vd.vid] - 1
        if n:
            self.open_count[vd.vid] = n
        else:
            del self.open_count[vd.vid]

    def set_prop(self, vd: VDisk, key: str, value) -> None:
        self.txn.check_writable()
        props.check_settable(key, value)
        if self.open_count.get(vd.vid) or self.clones.unfinished(vd):
            raise VDiskError(errno.EBUSY, f"{vd.name} is in use")
        with self.txn:
            self.txn.apply(["vset", vd.vid, key, value])

    def touch(self, vd: VDisk, **attrs: int) -> None:
        """Set mtime_ns/ctime_ns/mode/uid/gid (journaled like any property)."""
        self.txn.check_writable()
        with self.txn:
            for k, v in attrs.items():
                if k not in ("mtime_ns", "ctime_ns", "mode", "uid", "gid"):
                    raise VDiskError(errno.EINVAL, f"{k} cannot be set")
                if vd.props.get(k) != v:
                    self.txn.apply(["vset", vd.vid, k, v])

    # ------------------------------------------------------------ data
    def read(self, vd: VDisk, off: int, size: int) -> bytes | bytearray:
        self.io_count += 1
        if off >= vd.size or size <= 0:
            return b""
        return self.data.read(vd, off, min(size, vd.size - off))

    def write(self, vd: VDisk, off: int, data) -> int:
        self.io_count += 1
        self.txn.check_writable()
        mv = memoryview(data)
        end = off + len(mv)
        if off < 0:
            raise VDiskError(errno.EINVAL, "negative offset")
        if end > MAX_VDISK_SIZE:
            raise VDiskError(errno.EFBIG, "write past the largest VDisk size")
        txn = self.txn
        try:
            with txn:
                if vd.vid in self.clones.sources:
                    span = self.chunk_size * self.page_entries
                    self.clones.guard(vd, min(off, vd.size) // span, (end - 1) // span + 1)
                if off > vd.size:
                    txn.apply_all(self.data.zero_tail(vd))
                if end > vd.size:
                    txn.apply(["vsize", vd.vid, end])
                txn.apply_all(self.data.write(vd, off, mv))
                txn.touch(vd)
        except StoreFailed as e:
            self._failed(e)
        return len(mv)

    def _failed(self, e: StoreFailed) -> None:
        """A data write that may have lost what it wrote stops the pool."""
        self.failstop.fail(e)
        raise VDiskError(errno.EIO, str(e)) from None

    @property
    def failed(self) -> str | None:
        """Why the pool stopped writing (fail-stop), or None."""
        return self.failstop.reason

    def truncate(self, vd: VDisk, size: int) -> None:
        self.txn.check_writable()
        _check_size(size)
        if size == vd.size:
            return
        if self.clones.unfinished(vd):
            raise VDiskError(errno.EBUSY, f"{vd.name} is an unfinished clone")
        try:
            self._truncate(vd, size)
        except StoreFailed as e:
            self._failed(e)

    def _truncate(self, vd: VDisk, size: int) -> None:
        pe, txn = self.page_entries, self.txn
        span = self.chunk_size * pe
        with txn:
            if size > vd.size:
                self._grow(vd, size)
                return
            if vd.vid in self.clones.sources:
                self.clones.guard(vd, size // span, vd.npages, holes=False)
            txn.apply_all(self.data.unmap(vd, self.meta.chunks_for(size), vd.npages * pe))
            txn.apply(["vsize", vd.vid, size])
            txn.apply_all(self.data.zero_tail(vd))  # frees the last chunk if only zeros remain
            txn.touch(vd)

    def _grow(self, vd: VDisk, size: int) -> None:
        """Grow the VDisk to ``size`` (in a transaction): the junk past its old end in
        its last chunk becomes zeros first."""
        if vd.vid in self.clones.sources:
            span = self.chunk_size * self.page_entries
            self.clones.guard(vd, vd.size // span, vd.size // span + 1)
        self.txn.apply_all(self.data.zero_tail(vd))
        self.txn.apply(["vsize", vd.vid, size])

    def fallocate(self, vd: VDisk, mode: int, off: int, length: int) -> None:
        """fallocate(2) on a VDisk: thin storage's meaning of each mode.

        - PUNCH_HOLE|KEEP_SIZE (discard from a loop device, ``fstrim``, ``blkdiscard``):
          the range reads zeros; the chunks wholly inside stop being mapped (a shared one
          loses only this VDisk's reference), the edges are zeroed in place or copied.
        - ZERO_RANGE (``blkdiscard -z``, write-zeroes): the same, and without KEEP_SIZE
          the VDisk grows to cover the range.
        - 0 or KEEP_SIZE (preallocation): nothing is reserved, since thin provisioning
          takes space when data is written (and copy-on-write needs fresh space for a
          shared chunk anyway); without KEEP_SIZE the VDisk grows. ENOSPC if the pool's
          filesystem has less room than the range's unmapped chunks would take: a
          preallocation that could not possibly be honoured fails at once.
        Any other mode: EOPNOTSUPP (never ENOSYS, which would turn fallocate off)."""
        self.io_count += 1
        self.txn.check_writable()
        if mode not in FALLOC_MODES:
            raise VDiskError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} is not supported")
        if off < 0 or length <= 0:
            raise VDiskError(errno.EINVAL, "fallocate: bad offset or length")
        end = off + length
        if end > MAX_VDISK_SIZE:
            raise VDiskError(errno.EFBIG, "fallocate past the largest VDisk size")
        if self.clones.unfinished(vd):
            raise VDiskError(errno.EBUSY, f"{vd.name} is an unfinished clone")
        punch = mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)
        grow = not mode & FALLOC_FL_KEEP_SIZE and end > vd.size
        if not punch:
            self._check_room(vd, off, end)
            if not grow:
                return
        try:
            with self.txn:
                if grow:
                    self._grow(vd, end)
                if punch and off < vd.size:
                    self._punch(vd, off, min(end, vd.size))
                self.txn.touch(vd)
        except StoreFailed as e:
            self._failed(e)

    def _punch(self, vd: VDisk, off: int, end: int) -> None:
        """Make [off, end) read zeros, unmapping what it can (in a transaction)."""
        cs = self.chunk_size
        span = cs * self.page_entries
        if end >= vd.size:               # the bytes past the end count as zeros too
            end = self.meta.chunks_for(vd.size) * cs
        if vd.vid in self.clones.sources:
            self.clones.guard(vd, off // span, (end - 1) // span + 1, holes=False)
        first, last = -(-off // cs), end // cs       # the chunks wholly inside
        zero = memoryview(self.data.zero)
        if first > last:                             # within one chunk
            self.txn.apply_all(self.data.write(vd, off, zero[:end - off]))
            return
        if off < first * cs:
            self.txn.apply_all(self.data.write(vd, off, zero[:first * cs - off]))
        if last * cs < end:
            self.txn.apply_all(self.data.write(vd, last * cs, zero[:end - last * cs]))
        self.txn.apply_all(self.data.unmap(vd, first, last))

    def _check_room(self, vd: VDisk, off: int, end: int) -> None:
        cs, pages = self.chunk_size, self.meta.pages
        first, stop = off // cs, -(-end // cs)
        mapped = sum(hi - lo - pages[pid][lo:hi].count(0)
                     for _, pid, lo, hi in vd.spans(first, stop, self.page_entries))
        need = (stop - first - mapped) * cs
        st = os.statvfs(self.path)
        if need > st.f_bavail * st.f_frsize:
            raise VDiskError(errno.ENOSPC, f"fallocate of {need} bytes: the pool's "
                             f"filesystem has {st.f_bavail * st.f_frsize} free")

    def seek(self, vd: VDisk, off: int, whence: int) -> int:
        """lseek(2) SEEK_DATA / SEEK_HOLE at chunk granularity: a mapped chunk is data
        (even if it holds zeros), an unmapped one a hole, and the end of the VDisk is
        a hole. ENXIO at or past the end, as for any file."""
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise VDiskError(errno.EINVAL, f"lseek whence {whence}")
        if not 0 <= off < vd.size:
            raise VDiskError(errno.ENXIO, "lseek past the end")
        cs = self.chunk_size
        if whence == SEEK_DATA:
            c = self.meta.next_mapped(vd, off // cs)
            if c is None or c * cs >= vd.size:
                raise VDiskError(errno.ENXIO, "no data past the offset")
            return max(off, c * cs)
        return min(max(off, self.meta.next_hole(vd, off // cs) * cs), vd.size)

    def seek_window(self, vd: VDisk, off: int, whence: int) -> tuple[int, int | None]:
        """The range [lo, hi) (hi None: to the end) where data the engine does not have yet
        (a page cache's dirty pages) would change what ``seek`` answers: the holes before
        the data SEEK_DATA finds, the hole SEEK_HOLE finds, all past the end. A writer
        that writes that range back first makes the answer exact; data already mapped
        cannot turn into a hole by being written."""
        cs = self.chunk_size
        if off >= vd.size:
            return vd.size, None
        if whence == SEEK_DATA:
            c = self.meta.next_mapped(vd, off // cs)
            return (off, None) if c is None or c * cs >= vd.size else (off, max(off, c * cs))
        hole = self.meta.next_hole(vd, off // cs) * cs
        if hole >= vd.size:
            return vd.size, None
        c = self.meta.next_mapped(vd, hole // cs)
        return max(off, hole), (None if c is None or c * cs >= vd.size else c * cs)

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

    def cool(self, everything: bool = False) -> int:
        """Hot slots not written since the last call (``everything``: all of them, when
        nothing writes any more) go cold: no more in-place writes, and a mismatch in them
        after a crash is damage (datapath.py). Suspects stay hot until verified."""
        slots = self.space.to_cool(self.meta, self.data.suspect, everything)
        if slots:
            with self.txn:
                self.txn.apply(["cold", codec.array_to_bin(slots)])
        return len(slots)

    # ------------------------------------------------------------ durability
    def prepare_commit(self, checkpoint: bool = False) -> Commit:
        return self.commits.prepare(checkpoint)

    def sync(self) -> None:
        """Blocking commit (for callers without an event loop)."""
        self.commits.run()

    # ------------------------------------------------------------ deferred punches
    def defer_punches(self) -> None:
        """From now on commits leave giving freed space back to the caller (commit.py):
        ``take_punch``, ``punch`` (any thread), ``punch_done``."""
        self.commits.defer_punch = True

    def take_punch(self, limit: int = PUNCH_BATCH) -> list[int]:
        return self.space.take_punch(limit)

    def punch(self, slots: list[int]) -> None:
        """Give the space of free ``slots`` (from ``take_punch``) back. Blocking; touches
        only the data file, so it may run in a worker thread."""
        self.store.release(slots)

    def punch_done(self, slots: list[int], ok: bool = True) -> None:
        self.space.punch_done(slots, ok)

    @contextlib.contextmanager
    def punch_batch(self, limit: int = PUNCH_BATCH) -> Iterator[list[int]]:
        """``with pool.punch_batch() as slots:`` lends up to ``limit`` slots that still
        owe a punch ([]: none) and gives them back when the block ends: punched, or
        owing it again if the block raised."""
        slots = self.take_punch(limit)
        ok = False
        try:
            yield slots
            ok = True
        finally:
            self.punch_done(slots, ok)

    def punch_all(self) -> None:
        """Blocking: punch every slot a deferred punch still owes."""
        while True:
            with self.punch_batch() as slots:
                if not slots:
                    return
                self.punch(slots)

    def checkpoint(self) -> None:
        self.commits.run(checkpoint=True)

    def close(self, *, commit: bool = True) -> None:
        """Checkpoint (if asked and writable), then release files and the lock. With
        ``commit=False`` nothing buffered is written: as after kill -9."""
        try:
            # After a fail-stop nothing more is written: the next open replays what was
            # durable before the failure.
            if commit and not self.readonly and self.store is not None and not self.failed:
                self.cool(everything=True)
                self.commits.defer_punch = False     # the checkpoint punches what it frees
                self.punch_all()
                self.checkpoint()
        finally:
            if self.store is not None:
                self.store.close()
            if self.journal is not None:
                self.journal.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


def create_pool(path: str, chunk_size: int = layout.DEFAULT_CHUNK_SIZE,
                page_entries: int = layout.DEFAULT_PAGE_ENTRIES,
                store: dict | None = None) -> None:
    """Make a new pool in ``path`` (missing or empty directory). ``store``: where its
    chunks live if not in the directory (a record of vdiskfs.rados.cluster.Where, whose
    namespace must hold no chunks yet)."""
    layout.check_chunk_size(chunk_size)
    os.makedirs(path, exist_ok=True)
    if os.listdir(path):
        raise FileExistsError(f"{path} is not empty and holds no vdiskfs pool")
    hdr = layout.header_record(chunk_size, page_entries, store)
    if store is not None:
        from ..rados.chunks import RadosChunks, Where
        chunks = RadosChunks.open(Where.from_record(store), chunk_size, readonly=True)
        try:
            if chunks.count:
                raise FileExistsError(f"RADOS namespace {store['namespace']!r} of pool "
                                      f"{store['pool']!r} already holds chunks")
        finally:
            chunks.close()
    m = Metadata(chunk_size, page_entries)
    layout.write_file_atomic(path, layout.CHECKPOINT,
                             codec.frame_record(m.to_record(0, hdr["uuid"])))
    journal_mod.create(path, 0, hdr["uuid"])
    for name in (layout.DATA, layout.SUMS) if store is None else ():
        os.close(os.open(os.path.join(path, name), os.O_CREAT | os.O_WRONLY, 0o600))
    # The headers come last: their presence is what makes the directory a pool.
    layout.write_headers(path, hdr)


def open_pool(path: str, *, create: bool = False, chunk_size: int | None = None,
              **kw) -> Pool:
    """Open the pool in ``path``; with ``create``, make it first if the directory is empty."""
    if not layout.is_pool(path):
        if not create:
            raise FileNotFoundError(f"{path} is not a vdiskfs pool (no {layout.HEADER})")
        create_pool(path, layout.DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size)
    elif chunk_size is not None:
        have = layout.read_header(path)["chunk_size"]
        if have != chunk_size:
            raise ValueError(f"pool {path} has chunk size {have}; it cannot be changed")
    return Pool(path, **kw)


def _check_size(size: int) -> None:
    if size < 0:
        raise VDiskError(errno.EINVAL, "negative size")
    if size > MAX_VDISK_SIZE:
        raise VDiskError(errno.EFBIG, f"size larger than {MAX_VDISK_SIZE} bytes")
