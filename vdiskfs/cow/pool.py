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

import errno
import fcntl
import logging
import os

from . import codec, journal as journal_mod, layout, names, props
from .chunkstore import ChunkStore
from .clones import Clones
from .commit import Commit, Commits, Transactions
from .datapath import DataPath
from .errors import FormatError, PoolBusy, VDiskError
from .meta import Metadata, VDisk
from .space import Space

log = logging.getLogger(__name__)

MAX_VDISK_SIZE = 1 << 50          # 1 PiB of address space per VDisk


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
        self.store: ChunkStore | None = None
        self.journal = journal_mod.Journal(self.path, readonly=readonly)
        self.open_count: dict[int, int] = {}
        try:
            self._lock()
            self.header = layout.read_header(self.path)
            self.chunk_size = self.header["chunk_size"]
            self.page_entries = self.header["page_entries"]
            self._load()
            self.store = store_class(os.path.join(self.path, layout.DATA), self.chunk_size,
                                     readonly=readonly)
            self.space = Space(self.meta)
            self.txn = Transactions(self.meta, self.journal, readonly)
            self.commits = Commits(self.path, self.meta, self.space, self.store,
                                   self.journal, self.txn, sync_data)
            self.data = DataPath(self.meta, self.space, self.store)
            self.clones = Clones(self.meta, self.space, self.txn, self.header["uuid"])
            if not readonly:
                self._recover()
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

    def _load(self) -> None:
        """The checkpoint, then the journal's complete batches of its generation."""
        ck_path = os.path.join(self.path, layout.CHECKPOINT)
        with open(ck_path, "rb") as f:
            rec = codec.read_single_record(f.read(), ck_path)
        m = self.meta = Metadata.from_record(rec, ck_path)
        if (m.chunk_size, m.page_entries) != (self.chunk_size, self.page_entries):
            raise FormatError(f"{ck_path}: geometry differs from the pool header")
        self.gen = rec["gen"]
        self.replayed = 0
        self.salvage_error: str | None = None
        try:
            for batch in self.journal.open_and_read(self.gen, salvage=self.salvage):
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

    def _recover(self) -> None:
        """Make the files agree with what was loaded; free what a crash left behind."""
        j = self.journal
        if j.gen != self.gen:
            log.info("journal generation %s is older than checkpoint %s: not replayed",
                     j.gen, self.gen)
            j.replace(self.gen)
        elif j.torn_bytes:
            log.warning("journal: cut a torn tail of %d bytes", j.torn_bytes)
            j.cut_torn_tail()
        j.reserve(j.end)
        # VDisks unlinked while open were waiting for their last close: nothing is open now.
        orphans = [vd.vid for vd in self.meta.vdisks.values() if vd.name is None]
        for vid in orphans:
            with self.txn:
                self.txn.apply(["vdel", vid])

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
            self.txn.apply(["vshare", src.vid, vid, 0, len(src.ptab)])
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
        with self.txn:
            if other is not None:
                self._unlink_op(other, target_in_use)
            self.txn.apply(["vset", vd.vid, "name", new])

    def _unlink_op(self, vd: VDisk, in_use: bool) -> None:
        if in_use or self.open_count.get(vd.vid):
            self.txn.apply(["vset", vd.vid, "name", None])   # freed by forget()
        else:
            self.txn.apply(["vdel", vd.vid])

    def unlink(self, vd: VDisk, *, in_use: bool = False) -> None:
        """Remove the name. A VDisk still open or ``in_use`` (the kernel still knows the
        inode) keeps its data until ``forget``; the next mount frees any left over."""
        self.txn.check_writable()
        self.clones.check_not_cloning(vd)
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
        if off >= vd.size or size <= 0:
            return b""
        return self.data.read(vd, off, min(size, vd.size - off))

    def write(self, vd: VDisk, off: int, data) -> int:
        self.txn.check_writable()
        mv = memoryview(data)
        end = off + len(mv)
        if off < 0:
            raise VDiskError(errno.EINVAL, "negative offset")
        if end > MAX_VDISK_SIZE:
            raise VDiskError(errno.EFBIG, "write past the largest VDisk size")
        txn = self.txn
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
        return len(mv)

    def truncate(self, vd: VDisk, size: int) -> None:
        self.txn.check_writable()
        _check_size(size)
        if size == vd.size:
            return
        if self.clones.unfinished(vd):
            raise VDiskError(errno.EBUSY, f"{vd.name} is an unfinished clone")
        pe, txn = self.page_entries, self.txn
        span = self.chunk_size * pe
        with txn:
            if size > vd.size:
                if vd.vid in self.clones.sources:
                    self.clones.guard(vd, vd.size // span, vd.size // span + 1)
                txn.apply_all(self.data.zero_tail(vd))
                txn.apply(["vsize", vd.vid, size])
                return
            if vd.vid in self.clones.sources:
                self.clones.guard(vd, size // span, len(vd.ptab))
            last_page_end = min(len(vd.ptab) * pe, self.meta.pages_for(size) * pe)
            txn.apply_all(self.data.unmap(vd, self.meta.chunks_for(size), last_page_end))
            txn.apply(["vsize", vd.vid, size])
            txn.apply_all(self.data.zero_tail(vd))  # frees the last chunk if only zeros remain
            txn.touch(vd)

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

    # ------------------------------------------------------------ durability
    def prepare_commit(self, checkpoint: bool = False) -> Commit:
        return self.commits.prepare(checkpoint)

    def sync(self) -> None:
        """Blocking commit (for callers without an event loop)."""
        self.commits.run()

    def checkpoint(self) -> None:
        self.commits.run(checkpoint=True)

    def close(self, *, commit: bool = True) -> None:
        """Checkpoint (if asked and writable), then release files and the lock. With
        ``commit=False`` nothing buffered is written: as after kill -9."""
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


def _check_size(size: int) -> None:
    if size < 0:
        raise VDiskError(errno.EINVAL, "negative size")
    if size > MAX_VDISK_SIZE:
        raise VDiskError(errno.EFBIG, f"size larger than {MAX_VDISK_SIZE} bytes")
