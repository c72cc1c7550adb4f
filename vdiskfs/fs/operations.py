"""pyfuse3 Operations: the mount's request handlers, thin by design.

Each handler maps inodes and names to VDisks and calls the engine (vdiskfs.cow.pool) for
the work. Inodes: 1 is the root, 2 the ``.ctl`` directory, VDisk ``vid`` is ``vid + 16``
(vids are never reused, so neither are inodes).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from typing import Any, Callable

import pyfuse3
from pyfuse3 import FUSEError

from ..cow import names
from ..cow.errors import VDiskError
from ..cow.meta import VDisk
from ..cow.pool import Pool
from . import xattrs
from .syncer import Syncer

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
CTL = 2
VDISK_BASE = 16
CTL_NAME = ".ctl"
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0


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
            log.error("%s%r: %s", fn.__name__, args[:2], e)
            raise FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s%r", fn.__name__, args[:2])
            raise FUSEError(errno.EIO) from None

    return wrapper


class Handle:
    __slots__ = ("vd",)

    def __init__(self, vd: VDisk):
        self.vd = vd


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, pool: Pool):
        super().__init__()
        self.pool = pool
        self.syncer = Syncer(pool)
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.lookups: dict[int, int] = {}   # vid -> kernel lookup count
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
        a.st_mode = stat.S_IFREG | p["mode"]
        a.st_nlink = 0 if vd.name is None else 1
        a.st_uid, a.st_gid = p["uid"], p["gid"]
        a.st_size = vd.size
        a.st_blocks = vd.nalloc * self.pool.chunk_size // 512
        a.st_blksize = self.pool.chunk_size
        a.st_atime_ns = a.st_mtime_ns = p["mtime_ns"]
        a.st_ctime_ns = p["ctime_ns"]
        a.entry_timeout, a.attr_timeout = ENTRY_TIMEOUT, ATTR_TIMEOUT
        return a

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode in (ROOT, CTL):
            return self._dir_attr(inode)
        return self.vdisk_attr(self.vdisk(inode))

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
        if inode in (ROOT, CTL):
            raise FUSEError(errno.EPERM)
        vd = self.vdisk(inode)
        if fields.update_size:
            self.pool.truncate(vd, attr.st_size)
        changes = {}
        if fields.update_mode:
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
        # Entry ids: .ctl is 1, a VDisk is vid + 1; stable while VDisks come and go.
        if fh != ROOT:
            return
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, CTL_NAME.encode(), self._dir_attr(CTL), 1):
                return
        for vd in sorted(self.pool.vdisks(), key=lambda v: v.vid):
            if vd.vid + 1 <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, vd.name.encode(), self.vdisk_attr(vd),
                                         vd.vid + 1):
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
        vd = self.pool.lookup(self._name(parent, name))
        if vd is None:
            raise FUSEError(errno.ENOENT)
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
        self.pool.rename(vd, new, target_in_use=target is not None and self._in_use(target))

    @handler
    async def mknod(self, parent, name, mode, rdev, ctx):
        if not stat.S_ISREG(mode):
            raise FUSEError(errno.EPERM)
        return self._looked_up(self._create(parent, name, mode, ctx))

    def _create(self, parent, name, mode, ctx) -> VDisk:
        vname = self._name(parent, name)
        if name == CTL_NAME.encode():
            raise FUSEError(errno.EEXIST)
        return self.pool.create(vname, 0, mode=stat.S_IMODE(mode), uid=ctx.uid, gid=ctx.gid)

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
        return self._open_handle(self.vdisk(inode))

    @handler
    async def read(self, fh, off, size):
        return self.pool.read(self.handles[fh].vd, off, size)

    @handler
    async def write(self, fh, off, buf):
        return self.pool.write(self.handles[fh].vd, off, buf)

    @handler
    async def flush(self, fh):
        pass

    @handler
    async def fsync(self, fh, datasync):
        await self.syncer.sync()

    @handler
    async def release(self, fh):
        h = self.handles.pop(fh)
        self.pool.released(h.vd)
        if h.vd.vid not in self.lookups:
            self.pool.forget(h.vd)

    @handler
    async def statfs(self, ctx):
        st = os.statvfs(self.pool.path)
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        used = self.pool.used_bytes() // st.f_frsize
        # df: used = the pool's data + metadata; avail = what the backing fs really has.
        s.f_bfree = max(st.f_blocks - used, 0)
        s.f_bavail = min(st.f_bavail, s.f_bfree)
        s.f_files = len(self.pool.meta.vdisks) + 2
        s.f_ffree = s.f_favail = 1 << 20
        s.f_namemax = 64
        return s

    # ------------------------------------------------------------ properties
    @handler
    async def getxattr(self, inode, name, ctx):
        if inode in (ROOT, CTL):
            raise FUSEError(pyfuse3.ENOATTR)
        return xattrs.get(self.pool, self.vdisk(inode), name)

    @handler
    async def listxattr(self, inode, ctx):
        if inode in (ROOT, CTL):
            return []
        return xattrs.names()

    @handler
    async def setxattr(self, inode, name, value, ctx):
        if inode in (ROOT, CTL):
            raise FUSEError(errno.ENOTSUP)
        xattrs.set(self.pool, self.vdisk(inode), name, value)

    @handler
    async def removexattr(self, inode, name, ctx):
        if inode in (ROOT, CTL):
            raise FUSEError(pyfuse3.ENOATTR)
        xattrs.remove(self.vdisk(inode), name)
