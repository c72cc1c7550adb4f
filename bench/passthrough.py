"""A minimal pyfuse3 + trio passthrough filesystem: the floor cost of Python + FUSE.

It mirrors one directory and does nothing else, built the way vdiskfs is (one trio loop,
handlers call os.pread/os.pwrite synchronously, fsync in a worker thread,
``enable_writeback_cache``, ``keep_cache`` on open, 1 MiB read-ahead on the mount's bdi as
vdiskfs intends), so that ``vdiskfs / passthrough`` is the cost of vdiskfs's own work. Enough for dd, fio
and a loop-mounted ext4 image file: lookup, getattr, setattr (truncate, mode, owner,
times), open, create, read, write, flush, fsync, release, unlink, rename, mkdir, rmdir,
readdir, statfs. No xattr handlers: the kernel gets ENOSYS for getxattr once and stops
asking (a file system that serves xattrs, as vdiskfs does, gets a GETXATTR of
security.capability for every write() syscall). Used by bench/run.py; run as root:

    .venv/bin/python bench/passthrough.py SRC_DIR MOUNTPOINT [--ready-fd N]

Unmount with ``fusermount3 -u MOUNTPOINT`` (or SIGTERM/SIGINT); the process then exits.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio
from pyfuse3 import FUSEError

READ_AHEAD_KB = 1024   # as vdiskfs (vdiskfs/fs/daemon.py)
TIMEOUT = 1.0          # entry and attribute timeouts, as vdiskfs


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, source: str):
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: os.path.abspath(source)}
        self.fds: dict[int, int] = {}

    # ------------------------------------------------------------ helpers
    def _path(self, inode: int) -> str:
        try:
            return self.paths[inode]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    @staticmethod
    def _ino(st: os.stat_result, path: str, root: str) -> int:
        return pyfuse3.ROOT_INODE if path == root else st.st_ino

    def _attr(self, path: str, fd: int | None = None) -> pyfuse3.EntryAttributes:
        try:
            st = os.fstat(fd) if fd is not None else os.lstat(path)
        except OSError as e:
            raise FUSEError(e.errno) from None
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._ino(st, path, self.paths[pyfuse3.ROOT_INODE])
        a.st_mode, a.st_nlink = st.st_mode, st.st_nlink
        a.st_uid, a.st_gid, a.st_rdev = st.st_uid, st.st_gid, st.st_rdev
        a.st_size, a.st_blocks, a.st_blksize = st.st_size, st.st_blocks, st.st_blksize
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    def _remember(self, path: str) -> pyfuse3.EntryAttributes:
        a = self._attr(path)
        self.paths[a.st_ino] = path
        return a

    @staticmethod
    def _os_flags(flags: int) -> int:
        # Writeback cache: the kernel may read a file opened write-only (to fill a page)
        # and does O_APPEND itself; the backing file goes through its own page cache.
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags & ~(os.O_APPEND | os.O_DIRECT)

    @staticmethod
    def _oserror(e: OSError) -> FUSEError:
        return FUSEError(e.errno or errno.EIO)

    # ------------------------------------------------------------ names
    async def lookup(self, parent, name, ctx=None):
        if name == b".":
            return self._attr(self._path(parent))
        if name == b"..":
            path = self._path(parent)
            root = self.paths[pyfuse3.ROOT_INODE]
            return self._attr(root if path == root else os.path.dirname(path))
        return self._remember(self._child(parent, name))

    async def forget(self, inode_list):
        pass   # inodes keep their path: enough for a benchmark's few files

    async def getattr(self, inode, ctx=None):
        return self._attr(self._path(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        fd = self.fds.get(fh) if fh is not None else None
        try:
            if fields.update_size:
                os.truncate(fd if fd is not None else path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                         follow_symlinks=False)
        except OSError as e:
            raise self._oserror(e) from None
        return self._attr(path)

    async def unlink(self, parent, name, ctx):
        path = self._child(parent, name)
        try:
            ino = os.lstat(path).st_ino
            os.unlink(path)
        except OSError as e:
            raise self._oserror(e) from None
        if self.paths.get(ino) == path:
            del self.paths[ino]

    async def rmdir(self, parent, name, ctx):
        try:
            os.rmdir(self._child(parent, name))
        except OSError as e:
            raise self._oserror(e) from None

    async def mkdir(self, parent, name, mode, ctx):
        path = self._child(parent, name)
        try:
            os.mkdir(path, mode)
        except OSError as e:
            raise self._oserror(e) from None
        return self._remember(path)

    async def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
        if flags:
            raise FUSEError(errno.EINVAL)
        old, new = self._child(parent_old, name_old), self._child(parent_new, name_new)
        try:
            os.rename(old, new)
        except OSError as e:
            raise self._oserror(e) from None
        self._remember(new)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        path = self._path(fh)
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            raise self._oserror(e) from None
        for n, name in enumerate(names[start_id:], start_id + 1):
            try:
                a = self._remember(os.path.join(path, name))
            except FUSEError:
                continue   # vanished meanwhile
            if not pyfuse3.readdir_reply(token, os.fsencode(name), a, n):
                return

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        st = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        s = pyfuse3.StatvfsData()
        for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
            setattr(s, k, getattr(st, k))
        return s

    # ------------------------------------------------------------ files
    def _handle(self, fd: int) -> pyfuse3.FileInfo:
        self.fds[fd] = fd
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def open(self, inode, flags, ctx):
        try:
            fd = os.open(self._path(inode), self._os_flags(flags))
        except OSError as e:
            raise self._oserror(e) from None
        return self._handle(fd)

    async def create(self, parent, name, mode, flags, ctx):
        path = self._child(parent, name)
        try:
            fd = os.open(path, self._os_flags(flags) | os.O_CREAT, mode)
        except OSError as e:
            raise self._oserror(e) from None
        a = self._attr(path, fd)
        self.paths[a.st_ino] = path
        return self._handle(fd), a

    async def read(self, fh, off, size):
        try:
            return os.pread(fh, size, off)
        except OSError as e:
            raise self._oserror(e) from None

    async def write(self, fh, off, buf):
        try:
            return os.pwrite(fh, buf, off)
        except OSError as e:
            raise self._oserror(e) from None

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        try:
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fh)
        except OSError as e:
            raise self._oserror(e) from None

    async def release(self, fh):
        self.fds.pop(fh, None)
        os.close(fh)


def set_read_ahead(mountpoint: str, kb: int) -> None:
    """The mount's bdi read-ahead, found in our own mountinfo. Only after the INIT
    handshake: the kernel then sets it to min(current, INIT's max_readahead = 128 KiB)."""
    with open("/proc/self/mountinfo") as f:
        for line in reversed(f.read().splitlines()):
            fields = line.split()
            if fields[4] == mountpoint and " - fuse." in line:
                with open(f"/sys/class/bdi/{fields[2]}/read_ahead_kb", "w") as g:
                    g.write(str(kb))
                return


async def _after_init(mountpoint: str, read_ahead_kb: int, ready_fd: int | None) -> None:
    # A stat of our own mount from a worker thread returns once the kernel has its INIT
    # reply (it is served by this loop): then the read-ahead can be raised for good.
    await trio.to_thread.run_sync(os.stat, mountpoint)
    try:
        set_read_ahead(mountpoint, read_ahead_kb)
    except OSError as e:
        print(f"passthrough: could not set read-ahead: {e}", file=sys.stderr)
    if ready_fd is not None:
        os.write(ready_fd, b"ready")
        os.close(ready_fd)


async def _main(mountpoint: str, read_ahead_kb: int, ready_fd: int | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_after_init, mountpoint, read_ahead_kb, ready_fd)
        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    # A normal unmount: the kernel writes back dirty pages through us first.
                    await trio.run_process(["fusermount3", "-u", "-z", mountpoint], check=False)
                    return
        nursery.start_soon(on_signal)
        await pyfuse3.main(min_tasks=4, max_tasks=64)
        nursery.cancel_scope.cancel()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source")
    ap.add_argument("mountpoint")
    ap.add_argument("--ready-fd", type=int, default=None,
                    help="write 'ready' to this fd once mounted and set up, then close it")
    ap.add_argument("--read-ahead-kb", type=int, default=READ_AHEAD_KB)
    args = ap.parse_args()
    mnt = os.path.realpath(args.mountpoint)
    ops = Passthrough(args.source)
    opts = set(pyfuse3.default_options) | {"fsname=pypassthrough", "subtype=pypassthrough"}
    pyfuse3.init(ops, mnt, opts)
    try:
        trio.run(_main, mnt, args.read_ahead_kb, args.ready_fd)
    finally:
        pyfuse3.close(unmount=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
