"""pyfuse3 Operations: the mount's request handlers, thin by design.

Each handler maps inodes and names to VDisks and calls the engine (vdiskfs.cow.pool) for
the work, or the control plane (vdiskfs.ctl) for the files in ``.ctl/``. Inodes: 1 is the
root, 2 the ``.ctl`` directory, 3-5 its files, VDisk ``vid`` is ``vid + 16`` (vids are
never reused, so neither are inodes).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from typing import Any, Callable

import pyfuse3
import trio
from pyfuse3 import FUSEError

from ..cow import names
from ..cow.errors import NOT_FATAL, VDiskError
from ..cow.meta import VDisk
from ..cow.pool import Pool
from ..ctl import commands, listing
from ..ctl.capacity import Capacity
from ..ctl.jobs import JobRunner
from ..ctl.scrubber import Scrubber
from . import xattrs
from .syncer import Syncer

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
CTL = 2
VDISK_BASE = 16
CTL_NAME = ".ctl"
# The control files: name -> (inode, mode). Virtual: made when read, one command per write.
CTL_FILES = {b"clone": (3, 0o200), b"status": (4, 0o444), b"jobs": (5, 0o444),
             b"scrub": (6, 0o600), b"vdisks": (7, 0o444)}
CTL_WRITABLE = (b"clone", b"scrub")       # one command per write
CTL_READABLE = (b"status", b"jobs", b"scrub", b"vdisks")   # a snapshot made at open
CTL_INODES = {ino: (name, mode) for name, (ino, mode) in CTL_FILES.items()}
SETID = stat.S_ISUID | stat.S_ISGID   # never on a VDisk (see fs/killpriv.py)
ENTRY_TIMEOUT = 1.0
SEEK_WRITEBACK_ROUNDS = 8  # then the whole VDisk is written back (lseek)
RELEASE_GRACE = 1.0     # seconds an unlink waits for the release of a just-closed VDisk
ATTR_TIMEOUT = 1.0
FREE_INODES = 1 << 32    # statfs: VDisks are not limited by an inode table


def handler(fn: Callable) -> Callable:
    """Turn engine refusals into their errno and anything unexpected into a logged EIO:
    an exception escaping a handler would end pyfuse3.main() and with it the mount."""

    @functools.wraps(fn)
    async def wrapper(self, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except VDiskError as e:
            raise FUSEError(e.errno) from None
        except OSError as e:
            if e.errno in NOT_FATAL:       # the pool is full: logged once a minute
                self.capacity.full(fn.__name__, e)
            else:
                log.error("%s%r: %s", fn.__name__, args[:2], e)
            raise FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s%r", fn.__name__, args[:2])
            raise FUSEError(errno.EIO) from None

    return wrapper


class Handle:
    __slots__ = ("vd", "ctl", "data")

    def __init__(self, vd: VDisk | None, ctl: int = 0, data: bytes = b""):
        self.vd = vd          # None for a control file
        self.ctl = ctl        # control file inode
        self.data = data      # a status snapshot taken at open


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, pool: Pool, clone_speed: int = 0):
        super().__init__()
        self.pool = pool
        self.syncer = Syncer(pool)
        self.jobs = JobRunner(pool, self.syncer.sync, clone_speed)
        self.jobs.on_removed = self._name_removed
        self.scrubber = Scrubber(pool)
        self.capacity = Capacity(pool)
        self.nbd_exports: dict[int, int] = {}   # vid -> NBD connections (nbd/server.py)
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.lookups: dict[int, int] = {}   # vid -> kernel lookup count
        self.invalidate_range: Callable[[int, int, int], None] | None = None
        self.uid = os.getuid()
        self.gid = os.getgid()

    # ------------------------------------------------------------ helpers
    def vdisk(self, inode: int) -> VDisk:
        vd = self.pool.get(inode - VDISK_BASE) if inode >= VDISK_BASE else None
        if vd is None:
            raise FUSEError(errno.ENOENT)
        return vd

    def _name(self, parent: int, name: bytes) -> str:
        if parent != ROOT:
            raise FUSEError(errno.ENOENT if parent == CTL else errno.ENOTDIR)
        try:
            return name.decode()
        except UnicodeDecodeError:
            raise FUSEError(errno.EINVAL) from None

    def _dir_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = 4096
        ns = self.pool.header["created_ns"]
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        a.entry_timeout, a.attr_timeout = ENTRY_TIMEOUT, ATTR_TIMEOUT
        return a

    def vdisk_attr(self, vd: VDisk) -> pyfuse3.EntryAttributes:
        p = vd.props
        a = pyfuse3.EntryAttributes()
        a.st_ino = vd.vid + VDISK_BASE
        a.st_mode = stat.S_IFREG | (p["mode"] & ~SETID)
        a.st_nlink = 0 if vd.name is None else 1
        a.st_uid, a.st_gid = p["uid"], p["gid"]
        a.st_size = vd.size
        a.st_blocks = vd.nalloc * self.pool.chunk_size // 512
        a.st_blksize = self.pool.chunk_size
        a.st_atime_ns = a.st_mtime_ns = p["mtime_ns"]
        a.st_ctime_ns = p["ctime_ns"]
        a.entry_timeout, a.attr_timeout = ENTRY_TIMEOUT, ATTR_TIMEOUT
        return a

    def _ctl_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = self._dir_attr(inode)
        a.st_mode = stat.S_IFREG | CTL_INODES[inode][1]
        a.st_nlink = 1
        a.entry_timeout = a.attr_timeout = 0
        return a

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode in (ROOT, CTL):
            return self._dir_attr(inode)
        if inode in CTL_INODES:
            return self._ctl_attr(inode)
        return self.vdisk_attr(self.vdisk(inode))

    async def _name_removed(self, name: str, vid: int) -> None:
        """A VDisk vanished behind the kernel's back (clone cancelled): drop its dentry
        before the command returns. The kernel takes the directory lock, which a lookup
        waiting on this loop may hold: so from a worker thread."""
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_entry, ROOT, name.encode(),
                                          vid + VDISK_BASE)
        except Exception as e:   # ENOENT (never looked up), or not mounted (in-process)
            log.debug("invalidate_entry(%s): %s", name, e)

    async def _flush_vdisk(self, name: str) -> None:
        """Write the kernel's dirty pages of a VDisk back before a clone point."""
        vd = self.pool.lookup(name)
        if vd is not None:
            await self._writeback(vd)

    async def _writeback(self, vd: VDisk, off: int = 0, length: int = 0) -> None:
        """Make the kernel write back its dirty pages of a VDisk (writeback cache) and drop
        its cached ones, in [off, off + length) (0: to the end; a range needs
        fs/extra_ops.py's ``invalidate_range``, else the whole file). Blocks on writes
        this loop must serve, hence the worker thread."""
        ino = vd.vid + VDISK_BASE
        try:
            if self.invalidate_range is not None:
                await trio.to_thread.run_sync(self.invalidate_range, ino, off, length)
            else:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
        except OSError as e:
            if e.errno == errno.ENOENT:     # the kernel has no cache of it
                log.debug("invalidate_inode(%s): %s", vd.name, e)
            else:   # its dirty pages, if any, stay in the kernel: say so
                log.warning("could not make the kernel write back %s: %s", vd.name, e)

    async def released(self, vd: VDisk | None = None, grace: float = RELEASE_GRACE) -> None:
        """The kernel sends RELEASE in the background after close(2) returns, behind its
        queue of writeback: a ``cat X; rm X`` can have its UNLINK overtake it. Before an
        open VDisk (``None``: any) is taken to be in use, give such a release up to
        ``grace`` seconds to arrive."""
        open_count = self.pool.open_count
        deadline = trio.current_time() + grace
        while (open_count.get(vd.vid) if vd else open_count) and trio.current_time() < deadline:
            await trio.sleep(0.01)

    def _looked_up(self, vd: VDisk) -> pyfuse3.EntryAttributes:
        self.lookups[vd.vid] = self.lookups.get(vd.vid, 0) + 1
        return self.vdisk_attr(vd)

    def _in_use(self, vd: VDisk) -> bool:
        return bool(self.lookups.get(vd.vid)) or bool(self.pool.open_count.get(vd.vid))

    # ------------------------------------------------------------ names
    @handler
    async def lookup(self, parent, name, ctx=None):
        if parent == ROOT and name == b"..":
            return self._dir_attr(ROOT)
        if name == b".":
            return self._attr(parent)
        if parent == CTL and name == b"..":
            return self._dir_attr(ROOT)
        if parent == CTL and name in CTL_FILES:
            return self._ctl_attr(CTL_FILES[name][0])
        if parent == ROOT and name == CTL_NAME.encode():
            return self._dir_attr(CTL)
        vd = self.pool.lookup(self._name(parent, name))
        if vd is None:
            raise FUSEError(errno.ENOENT)
        return self._looked_up(vd)

    @handler
    async def forget(self, inode_list):
        for inode, n in inode_list:
            vid = inode - VDISK_BASE
            if vid <= 0 or vid not in self.lookups:
                continue
            left = self.lookups[vid] - n
            if left > 0:
                self.lookups[vid] = left
                continue
            del self.lookups[vid]
            vd = self.pool.get(vid)
            if vd is not None:
                self.pool.forget(vd)

    @handler
    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode in CTL_INODES:
            # `echo CMD > .ctl/clone` opens with O_TRUNC, and the kernel sends time updates
            # at close (writeback cache): accept both as no-ops, refuse anything else.
            if (fields.update_mode or fields.update_uid or fields.update_gid
                    or (fields.update_size and (attr.st_size != 0
                                                or CTL_INODES[inode][0] not in CTL_WRITABLE))):
                raise FUSEError(errno.EPERM)
            return self._ctl_attr(inode)
        if inode in (ROOT, CTL):
            raise FUSEError(errno.EPERM)
        vd = self.vdisk(inode)
        if fields.update_size:
            grows = attr.st_size > vd.size
            self.pool.truncate(vd, attr.st_size)
            if grows:
                self.capacity.grown(vd.name or str(vd.vid))
        changes = {}
        if fields.update_mode:
            if attr.st_mode & SETID:
                # No setuid/setgid on data: also what HANDLE_KILLPRIV_V2 relies on.
                raise FUSEError(errno.EPERM)
            changes["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if changes:
            self.pool.touch(vd, **changes)
        return self.vdisk_attr(vd)

    @handler
    async def opendir(self, inode, ctx):
        if inode not in (ROOT, CTL):
            raise FUSEError(errno.ENOTDIR)
        return inode

    @handler
    async def readdir(self, fh, start_id, token):
        # Entry ids: "." 1, ".." 2, then .ctl 3 and a VDisk vid + 3 in the root, the
        # control files from 3 in .ctl: stable while VDisks come and go. The kernel
        # takes no lookup reference for "." and ".." (fuse_direntplus_link).
        first = [(b".", self._dir_attr(fh)), (b"..", self._dir_attr(ROOT))]
        if fh == CTL:
            first += [(name, self._ctl_attr(ino)) for name, (ino, _) in CTL_FILES.items()]
        elif fh == ROOT:
            first.append((CTL_NAME.encode(), self._dir_attr(CTL)))
        else:
            return
        for n, (name, attr) in enumerate(first, 1):
            if n > start_id and not pyfuse3.readdir_reply(token, name, attr, n):
                return
        if fh != ROOT:
            return
        for vd in sorted(self.pool.vdisks(), key=lambda v: v.vid):
            if vd.vid + 3 <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, vd.name.encode(), self.vdisk_attr(vd),
                                         vd.vid + 3):
                return
            self.lookups[vd.vid] = self.lookups.get(vd.vid, 0) + 1

    @handler
    async def releasedir(self, fh):
        pass

    @handler
    async def fsyncdir(self, fh, datasync):
        await self.syncer.sync()

    @handler
    async def mkdir(self, parent, name, mode, ctx):
        raise FUSEError(errno.EPERM)

    @handler
    async def symlink(self, parent, name, target, ctx):
        raise FUSEError(errno.EPERM)

    @handler
    async def link(self, inode, new_parent, new_name, ctx):
        raise FUSEError(errno.EPERM)

    @handler
    async def rmdir(self, parent, name, ctx):
        if parent == ROOT and name == CTL_NAME.encode():
            raise FUSEError(errno.EPERM)
        raise FUSEError(errno.ENOTDIR if self.pool.lookup(self._name(parent, name))
                        else errno.ENOENT)

    @handler
    async def unlink(self, parent, name, ctx):
        if parent == ROOT and name == CTL_NAME.encode():
            raise FUSEError(errno.EISDIR)
        if parent == CTL:
            raise FUSEError(errno.EPERM if name in CTL_FILES else errno.ENOENT)
        vd = self.pool.lookup(self._name(parent, name))
        if vd is None:
            raise FUSEError(errno.ENOENT)
        await self.released(vd)
        self.pool.unlink(vd, in_use=self._in_use(vd))

    @handler
    async def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FUSEError(errno.EINVAL)
        if CTL_NAME.encode() in (name_old, name_new) and ROOT in (parent_old, parent_new):
            raise FUSEError(errno.EPERM)
        vd = self.pool.lookup(self._name(parent_old, name_old))
        if vd is None:
            raise FUSEError(errno.ENOENT)
        new = self._name(parent_new, name_new)
        names.check(new)
        target = self.pool.lookup(new)
        if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise FUSEError(errno.EEXIST)
        if target is not None:
            await self.released(target)
        self.pool.rename(vd, new, target_in_use=target is not None and self._in_use(target))

    @handler
    async def mknod(self, parent, name, mode, rdev, ctx):
        if not stat.S_ISREG(mode):
            raise FUSEError(errno.EPERM)
        return self._looked_up(self._create(parent, name, mode, ctx))

    def _create(self, parent, name, mode, ctx) -> VDisk:
        if parent == CTL:
            raise FUSEError(errno.EACCES)
        vname = self._name(parent, name)
        if name == CTL_NAME.encode():
            raise FUSEError(errno.EEXIST)
        return self.pool.create(vname, 0, mode=stat.S_IMODE(mode) & ~SETID, uid=ctx.uid, gid=ctx.gid)

    # ------------------------------------------------------------ files
    def _open_handle(self, vd: VDisk) -> pyfuse3.FileInfo:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = Handle(vd)
        self.pool.opened(vd)
        # keep_cache: only this kernel changes a VDisk's bytes, so its page cache stays valid.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @handler
    async def create(self, parent, name, mode, flags, ctx):
        vd = self._create(parent, name, mode, ctx)
        return self._open_handle(vd), self._looked_up(vd)

    @handler
    async def open(self, inode, flags, ctx):
        if inode in (ROOT, CTL):
            raise FUSEError(errno.EISDIR)
        if inode in CTL_INODES:
            return self._open_ctl(inode, flags)
        vd = self.vdisk(inode)
        if self.pool.clones.unfinished(vd) or self.jobs.settling(vd.vid):
            raise FUSEError(errno.EBUSY)   # no client may attach a half-made clone
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            # libfuse asks for atomic O_TRUNC: the kernel sends no SETATTR for it, has
            # already emptied its cache and takes the size as 0: the truncate is ours.
            self.pool.truncate(vd, 0)
        return self._open_handle(vd)

    def _open_ctl(self, inode: int, flags: int) -> pyfuse3.FileInfo:
        name = CTL_INODES[inode][0]
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if (name not in (CTL_WRITABLE if writing else CTL_READABLE)
                or flags & os.O_ACCMODE == os.O_RDWR):
            raise FUSEError(errno.EACCES)
        if writing:
            data = b""
        elif name == b"scrub":
            data = self.scrubber.render()
        elif name == b"vdisks":
            data = listing.render(self.pool, self.capacity,
                                  self.jobs.shown.percents(self.pool), self.scrubber.found,
                                  self.nbd_exports)
        else:
            data = self.jobs.render(extended=name == b"jobs")
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = Handle(None, inode, data)
        # direct_io: no page cache, no trust in st_size; each read sees this snapshot.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, nonseekable=False)

    @handler
    async def read(self, fh, off, size):
        h = self.handles[fh]
        if h.vd is None:
            return h.data[off:off + size]
        return self.pool.read(h.vd, off, size)

    @handler
    async def write(self, fh, off, buf):
        h = self.handles[fh]
        if h.vd is None:
            if CTL_INODES[h.ctl][0] == b"scrub":
                self.scrubber.command(bytes(buf))
            else:
                await self.jobs.execute(commands.parse(bytes(buf)), self._flush_vdisk)
            return len(buf)
        try:                      # the hot path: one call, no wrapper
            return self.pool.write(h.vd, off, buf)
        except OSError as e:
            return await self._retry_enospc(e, self.pool.write, h.vd, off, buf)

    async def _retry_enospc(self, e: OSError, call: Callable, *args: Any) -> Any:
        """``call(*args)`` failed with ``e``: space freed by a delete comes back only once
        that delete is durable and punched, so on ENOSPC with frees or punches pending
        make them durable, punch them and try once more before telling the writer the
        disk is full."""
        space = self.pool.space
        if e.errno != errno.ENOSPC or not (space.frees_pending() or space.punches_pending()):
            raise e
        await self.syncer.sync()
        await self.syncer.puncher.drain()
        return call(*args)

    @handler
    async def flush(self, fh):
        pass

    @handler
    async def fsync(self, fh, datasync):
        if self.handles[fh].vd is not None:
            await self.syncer.sync()

    @handler
    async def release(self, fh):
        h = self.handles.pop(fh)
        if h.vd is None:
            return
        self.pool.released(h.vd)
        if h.vd.vid not in self.lookups:
            self.pool.forget(h.vd)

    @handler
    async def statfs(self, ctx):
        st = os.statvfs(self.pool.path)
        s = pyfuse3.StatvfsData()
        # f_bsize, the preferred I/O size, is the chunk: the loop driver takes it as its
        # discard granularity, so fstrim sends discards that free whole chunks.
        s.f_bsize = self.pool.chunk_size
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        used = self.pool.used_bytes() // st.f_frsize
        # df: used = the pool's data + metadata; avail = what the backing fs really has.
        s.f_bfree = max(st.f_blocks - used, 0)
        s.f_bavail = min(st.f_bavail, s.f_bfree)
        # Inodes: one per VDisk (and the root, .ctl and its files); no fixed table, so
        # df -i shows what is used beside a large, constant free count.
        s.f_ffree = s.f_favail = FREE_INODES
        s.f_files = len(self.pool.meta.vdisks) + 2 + len(CTL_FILES) + FREE_INODES
        s.f_namemax = 64
        return s

    # ------------------------------------------------------------ properties
    @handler
    async def getxattr(self, inode, name, ctx):
        if inode < VDISK_BASE:
            raise FUSEError(pyfuse3.ENOATTR)
        log.debug("getxattr %d %r", inode, name)
        return xattrs.get(self.pool, self.vdisk(inode), name)

    @handler
    async def listxattr(self, inode, ctx):
        if inode < VDISK_BASE:
            return []
        return xattrs.names()

    @handler
    async def setxattr(self, inode, name, value, ctx):
        if inode < VDISK_BASE:
            raise FUSEError(errno.ENOTSUP)
        xattrs.set(self.pool, self.vdisk(inode), name, value)

    @handler
    async def removexattr(self, inode, name, ctx):
        if inode < VDISK_BASE:
            raise FUSEError(pyfuse3.ENOATTR)
        xattrs.remove(self.vdisk(inode), name)

    # ------------------------------------------------------------ thin provisioning
    # pyfuse3 has no handlers for these: fs/extra_ops.py installs them into libfuse's
    # session and calls these methods (errors as FUSEError, as for any handler).
    @handler
    async def fallocate(self, inode, mode, off, length):
        """Punch hole, zero range, preallocation (Pool.fallocate). The kernel has written
        back its dirty pages in the range before, and drops its cached ones after."""
        if inode < VDISK_BASE:
            raise FUSEError(errno.EOPNOTSUPP)
        vd = self.vdisk(inode)
        size = vd.size
        try:
            self.pool.fallocate(vd, mode, off, length)
        except OSError as e:
            await self._retry_enospc(e, self.pool.fallocate, vd, mode, off, length)
        if vd.size > size:
            self.capacity.grown(vd.name or str(vd.vid))

    @handler
    async def lseek(self, inode, off, whence):
        """SEEK_DATA / SEEK_HOLE (Pool.seek). The kernel does not write back its dirty
        pages before asking (fs/fuse/file.c: fuse_lseek), and a dirty page not written
        back yet is data, so they are written back first: otherwise cp --sparse or
        qemu-img would skip data the writer already wrote."""
        if inode < VDISK_BASE:
            raise FUSEError(errno.EINVAL)
        vd = self.vdisk(inode)
        # Only the range whose dirty pages could change the answer is written back (its
        # cached pages are holes' zeros), so a copy by SEEK_DATA keeps the data it reads
        # in the cache. Writing a hole back can fill it and move SEEK_HOLE's answer on
        # to the next hole: then that one is written back in turn.
        done: list[tuple[int, int | None]] = []
        for _ in range(SEEK_WRITEBACK_ROUNDS):
            lo, hi = self.pool.seek_window(vd, off, whence)
            if lo == hi or any(a <= lo and (b is None or (hi is not None and hi <= b))
                               for a, b in done):
                break
            await self._writeback(vd, lo, 0 if hi is None else hi - lo)
            done.append((lo, hi))
        else:
            await self._writeback(vd)
        return self.pool.seek(vd, off, whence)
