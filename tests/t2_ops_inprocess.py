"""The pyfuse3 handlers (vdiskfs.fs.operations.Operations) called directly, without a mount.

pyfuse3.RequestContext and SetattrFields cannot be filled from Python, so a plain object
with the same attributes stands in for them. readdir needs a kernel token: it is left to
the mount tests.
"""

from __future__ import annotations

import errno
import os
import stat
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
from pyfuse3 import FUSEError

from support.engine import crash, new_pool

from vdiskfs.cow.codec import FormatError
from vdiskfs.cow.fsck import fsck
from vdiskfs.cow.pool import Pool
from vdiskfs.fs.operations import CTL, ROOT, VDISK_BASE, Operations

CS = 4096
PE = 4

CTX = SimpleNamespace(uid=1234, gid=5678, umask=0o022, pid=os.getpid())


@pytest.fixture
def pool_path(tmp_path):
    return new_pool(tmp_path, CS, PE)


@pytest.fixture
def ops(pool_path):
    pool = Pool(pool_path)
    o = Operations(pool)
    yield o
    if pool._lock_fd >= 0:
        pool.close(commit=False)


def fields(**kw) -> SimpleNamespace:
    f = {k: False for k in ("update_atime", "update_mtime", "update_ctime", "update_mode",
                             "update_uid", "update_gid", "update_size")}
    f.update(kw)
    return SimpleNamespace(**f)


async def fuse_errno(coro) -> int:
    with pytest.raises(FUSEError) as ei:
        await coro
    return ei.value.errno


async def make(ops: Operations, name: bytes, data: bytes = b"", mode=0o644):
    """create + write + release, as `cp` would; returns the inode (looked up once)."""
    fi, attr = await ops.create(ROOT, name, stat.S_IFREG | mode, os.O_RDWR, CTX)
    if data:
        assert await ops.write(fi.fh, 0, data) == len(data)
    await ops.release(fi.fh)
    return attr.st_ino


# ---------------------------------------------------------------------------- lookup
async def test_lookup_ctl_root_and_vdisk(ops):
    a = await ops.lookup(ROOT, b".ctl", CTX)
    assert a.st_ino == CTL and stat.S_ISDIR(a.st_mode)
    assert (await ops.lookup(ROOT, b".", CTX)).st_ino == ROOT
    assert (await ops.lookup(ROOT, b"..", CTX)).st_ino == ROOT
    assert (await ops.lookup(CTL, b"..", CTX)).st_ino == ROOT
    assert (await ops.getattr(CTL, CTX)).st_ino == CTL
    assert stat.S_ISDIR((await ops.getattr(ROOT, CTX)).st_mode)

    vd = ops.pool.create("A", 12345)
    a = await ops.lookup(ROOT, b"A", CTX)
    assert a.st_ino == vd.vid + VDISK_BASE
    assert stat.S_ISREG(a.st_mode) and a.st_size == 12345 and a.st_nlink == 1
    assert a.st_blocks == 0 and a.st_blksize == CS
    assert ops.lookups[vd.vid] == 1
    await ops.lookup(ROOT, b"A", CTX)
    assert ops.lookups[vd.vid] == 2

    assert await fuse_errno(ops.lookup(ROOT, b"missing", CTX)) == errno.ENOENT
    assert await fuse_errno(ops.lookup(CTL, b"A", CTX)) == errno.ENOENT
    assert await fuse_errno(ops.lookup(a.st_ino, b"x", CTX)) == errno.ENOTDIR
    assert await fuse_errno(ops.lookup(ROOT, b"\xff\xfe", CTX)) == errno.EINVAL
    assert await fuse_errno(ops.getattr(VDISK_BASE + 999, CTX)) == errno.ENOENT
    assert await fuse_errno(ops.getattr(10, CTX)) == errno.ENOENT      # no such inode


# ---------------------------------------------------------------------------- file I/O
async def test_create_write_read_fsync_survives_crash(ops, pool_path):
    fi, attr = await ops.create(ROOT, b"A", stat.S_IFREG | 0o640, os.O_RDWR | os.O_CREAT, CTX)
    assert attr.st_size == 0 and stat.S_IMODE(attr.st_mode) == 0o640
    assert (attr.st_uid, attr.st_gid) == (CTX.uid, CTX.gid)
    ino = attr.st_ino
    data = bytes(range(1, 256)) * 100                     # 25500 bytes: 7 chunks, 2 pages
    assert await ops.write(fi.fh, 100, data) == len(data)
    assert await ops.write(fi.fh, 50000, b"tail") == 4
    assert bytes(await ops.read(fi.fh, 100, len(data))) == data
    assert bytes(await ops.read(fi.fh, 0, 100)) == bytes(100)       # a hole reads zeros
    assert bytes(await ops.read(fi.fh, 49998, 100)) == b"\0\0tail"  # cut at the end
    assert await ops.read(fi.fh, 60000, 10) == b""
    a = await ops.getattr(ino, CTX)
    assert a.st_size == 50004
    assert a.st_blocks == 8 * CS // 512                   # chunks 0..6 and 12
    await ops.fsync(fi.fh, False)
    assert not ops.pool.journal.buffer                   # the records are in the file

    # Another handle on the same inode sees the same bytes.
    fi2 = await ops.open(ino, os.O_RDONLY, CTX)
    assert fi2.fh != fi.fh
    assert bytes(await ops.read(fi2.fh, 100, 10)) == data[:10]
    assert ops.pool.open_count[ino - VDISK_BASE] == 2
    await ops.release(fi2.fh)
    await ops.release(fi.fh)
    assert ino - VDISK_BASE not in ops.pool.open_count

    crash(ops.pool)                                       # what fsync acknowledged survives
    p2 = Pool(pool_path)
    try:
        vd = p2.lookup("A")
        assert vd.size == 50004
        assert bytes(p2.read(vd, 100, len(data))) == data
        assert bytes(p2.read(vd, 50000, 4)) == b"tail"
    finally:
        p2.close()


async def test_concurrent_fsyncs_share_commits(ops):
    inos = [await make(ops, b"F%d" % i) for i in range(4)]
    fhs = [(await ops.open(ino, os.O_RDWR, CTX)).fh for ino in inos]
    for i, fh in enumerate(fhs):
        await ops.write(fh, i * CS, b"x" * 10)
    async with trio.open_nursery() as n:
        for fh in fhs:
            n.start_soon(ops.fsync, fh, True)
    assert not ops.pool.journal.buffer and not ops.pool.commits.is_dirty()
    assert ops.syncer._done >= 1
    for fh in fhs:
        await ops.release(fh)


async def test_open_dir_inodes_is_eisdir(ops):
    assert await fuse_errno(ops.open(ROOT, os.O_RDONLY, CTX)) == errno.EISDIR
    assert await fuse_errno(ops.open(CTL, os.O_RDONLY, CTX)) == errno.EISDIR
    assert await fuse_errno(ops.open(VDISK_BASE + 77, os.O_RDONLY, CTX)) == errno.ENOENT
    assert await ops.opendir(ROOT, CTX) == ROOT
    ino = await make(ops, b"A")
    assert await fuse_errno(ops.opendir(ino, CTX)) == errno.ENOTDIR


# ---------------------------------------------------------------------------- refusals
async def test_no_directories_links_or_special_files(ops):
    assert await fuse_errno(ops.mkdir(ROOT, b"d", 0o755, CTX)) == errno.EPERM
    assert await fuse_errno(ops.symlink(ROOT, b"l", b"A", CTX)) == errno.EPERM
    ino = await make(ops, b"A")
    assert await fuse_errno(ops.link(ino, ROOT, b"B", CTX)) == errno.EPERM
    assert await fuse_errno(ops.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o644, 0, CTX)) \
        == errno.EPERM
    assert await fuse_errno(ops.rmdir(ROOT, b".ctl", CTX)) == errno.EPERM
    assert await fuse_errno(ops.rmdir(ROOT, b"A", CTX)) == errno.ENOTDIR
    assert await fuse_errno(ops.rmdir(ROOT, b"nope", CTX)) == errno.ENOENT
    assert await fuse_errno(ops.unlink(ROOT, b".ctl", CTX)) == errno.EISDIR
    assert await fuse_errno(ops.unlink(ROOT, b"nope", CTX)) == errno.ENOENT
    assert await fuse_errno(ops.create(ROOT, b".ctl", stat.S_IFREG | 0o644, 0, CTX)) \
        == errno.EEXIST
    assert await fuse_errno(ops.create(CTL, b"x", stat.S_IFREG | 0o644, 0, CTX)) \
        in (errno.EACCES, errno.EPERM, errno.ENOENT)
    assert await fuse_errno(ops.create(ROOT, b"A", stat.S_IFREG | 0o644, 0, CTX)) \
        == errno.EEXIST
    assert [vd.name for vd in ops.pool.vdisks()] == ["A"]
    # mknod of a regular file is a create
    a = await ops.mknod(ROOT, b"N", stat.S_IFREG | 0o600, 0, CTX)
    assert stat.S_ISREG(a.st_mode) and ops.pool.lookup("N") is not None


@pytest.mark.parametrize("name", [b".hidden", b"a b", b"x" * 65, b"caf\xc3\xa9", b"\xff",
                                  b"a:b", b"tab\t"])
async def test_bad_names_are_einval(ops, name):
    mode = stat.S_IFREG | 0o644
    assert await fuse_errno(ops.create(ROOT, name, mode, os.O_RDWR, CTX)) == errno.EINVAL
    assert await fuse_errno(ops.mknod(ROOT, name, mode, 0, CTX)) == errno.EINVAL
    await make(ops, b"A")
    assert await fuse_errno(ops.rename(ROOT, b"A", ROOT, name, 0, CTX)) == errno.EINVAL
    assert [vd.name for vd in ops.pool.vdisks()] == ["A"]


async def test_longest_name_is_fine(ops):
    await make(ops, b"x" * 64)
    assert (await ops.lookup(ROOT, b"x" * 64, CTX)).st_size == 0


# ---------------------------------------------------------------------------- unlink/forget
async def test_unlink_while_looked_up_keeps_data_until_forget(ops):
    pool = ops.pool
    ino = await make(ops, b"A", b"\x42" * (3 * CS))
    vid = ino - VDISK_BASE
    assert ops.lookups[vid] == 1
    await ops.unlink(ROOT, b"A", CTX)
    fi = await ops.open(ino, os.O_RDONLY, CTX)      # by the inode the kernel still has
    # The name is gone ...
    assert await fuse_errno(ops.lookup(ROOT, b"A", CTX)) == errno.ENOENT
    assert pool.lookup("A") is None
    # ... the inode and its data are not.
    a = await ops.getattr(ino, CTX)
    assert a.st_nlink == 0 and a.st_size == 3 * CS
    assert bytes(await ops.read(fi.fh, 0, 3 * CS)) == b"\x42" * (3 * CS)
    assert pool.meta.slots_in_use() == 3
    # A new VDisk may take the name meanwhile.
    await make(ops, b"A", b"new")
    await ops.release(fi.fh)
    assert pool.get(vid) is not None and pool.meta.slots_in_use() == 4  # still looked up
    await ops.forget([(ino, 1)])
    assert pool.get(vid) is None
    assert pool.meta.slots_in_use() == 1
    assert await fuse_errno(ops.getattr(ino, CTX)) == errno.ENOENT
    assert bytes(pool.read(pool.lookup("A"), 0, 3)) == b"new"


async def test_forget_counts_lookups(ops):
    ino = await make(ops, b"A", b"x")
    vid = ino - VDISK_BASE
    await ops.lookup(ROOT, b"A", CTX)
    await ops.lookup(ROOT, b"A", CTX)                 # 3 lookups in all
    await ops.unlink(ROOT, b"A", CTX)
    await ops.forget([(ino, 2)])
    assert ops.pool.get(vid) is not None
    await ops.forget([(ino, 1), (VDISK_BASE + 500, 1), (ROOT, 1)])
    assert ops.pool.get(vid) is None and ops.pool.meta.slots_in_use() == 0


async def test_unlink_of_forgotten_vdisk_frees_at_once(ops):
    ino = await make(ops, b"A", b"x" * CS)
    await ops.forget([(ino, 1)])                      # the kernel dropped the inode
    await ops.unlink(ROOT, b"A", CTX)
    assert ops.pool.get(ino - VDISK_BASE) is None
    assert ops.pool.meta.slots_in_use() == 0


async def test_an_open_vdisk_is_not_deleted_or_replaced(ops):
    """rm or mv onto a VDisk a loop device (or anything) holds open: EBUSY, and it keeps
    working; once released it may go."""
    ino = await make(ops, b"A", b"x" * CS)
    await make(ops, b"B", b"b")
    fi = await ops.open(ino, os.O_RDWR, CTX)
    assert await fuse_errno(ops.unlink(ROOT, b"A", CTX)) == errno.EBUSY
    assert await fuse_errno(ops.rename(ROOT, b"B", ROOT, b"A", 0, CTX)) == errno.EBUSY
    await ops.write(fi.fh, CS, b"more")
    assert bytes(await ops.read(fi.fh, CS, 4)) == b"more"
    await ops.release(fi.fh)
    await ops.forget([(ino, 1)])
    await ops.unlink(ROOT, b"A", CTX)
    assert ops.pool.get(ino - VDISK_BASE) is None
    assert ops.pool.meta.slots_in_use() == 1


# ---------------------------------------------------------------------------- rename
async def test_rename(ops):
    pool = ops.pool
    ino_a = await make(ops, b"A", b"aaaa")
    ino_b = await make(ops, b"B", b"b" * (2 * CS))
    await ops.rename(ROOT, b"A", ROOT, b"C", 0, CTX)
    assert await fuse_errno(ops.lookup(ROOT, b"A", CTX)) == errno.ENOENT
    assert (await ops.lookup(ROOT, b"C", CTX)).st_ino == ino_a

    # RENAME_NOREPLACE onto an existing name: EEXIST, nothing changes.
    assert await fuse_errno(ops.rename(ROOT, b"C", ROOT, b"B", pyfuse3.RENAME_NOREPLACE,
                                       CTX)) == errno.EEXIST
    assert sorted(vd.name for vd in pool.vdisks()) == ["B", "C"]
    assert (await ops.lookup(ROOT, b"B", CTX)).st_ino == ino_b
    # RENAME_NOREPLACE onto a free name works.
    await ops.rename(ROOT, b"C", ROOT, b"D", pyfuse3.RENAME_NOREPLACE, CTX)
    assert pool.lookup("D").vid == ino_a - VDISK_BASE

    # A plain rename replaces the target; the kernel still knows B's inode, so its data
    # stays until forget().
    await ops.rename(ROOT, b"D", ROOT, b"B", 0, CTX)
    assert pool.lookup("B").vid == ino_a - VDISK_BASE
    assert pool.get(ino_b - VDISK_BASE) is not None
    assert (await ops.getattr(ino_b, CTX)).st_nlink == 0
    assert pool.meta.slots_in_use() == 3
    await ops.forget([(ino_b, ops.lookups[ino_b - VDISK_BASE])])
    assert pool.get(ino_b - VDISK_BASE) is None and pool.meta.slots_in_use() == 1

    assert await fuse_errno(ops.rename(ROOT, b"nope", ROOT, b"X", 0, CTX)) == errno.ENOENT
    assert await fuse_errno(ops.rename(ROOT, b"B", ROOT, b"X", pyfuse3.RENAME_EXCHANGE,
                                       CTX)) == errno.EINVAL
    assert await fuse_errno(ops.rename(ROOT, b".ctl", ROOT, b"X", 0, CTX)) == errno.EPERM
    assert await fuse_errno(ops.rename(ROOT, b"B", ROOT, b".ctl", 0, CTX)) == errno.EPERM
    assert await fuse_errno(ops.rename(ROOT, b"B", CTL, b"X", 0, CTX)) == errno.ENOENT
    assert [vd.name for vd in pool.vdisks()] == ["B"]


async def test_rename_over_unreferenced_target_frees_it(ops):
    await make(ops, b"A", b"a")
    ino_b = await make(ops, b"B", b"b" * CS)
    await ops.forget([(ino_b, 1)])
    await ops.rename(ROOT, b"A", ROOT, b"B", 0, CTX)
    assert ops.pool.get(ino_b - VDISK_BASE) is None
    assert ops.pool.meta.slots_in_use() == 1


# ---------------------------------------------------------------------------- setattr
async def test_setattr_size_mode_owner_mtime(ops):
    ino = await make(ops, b"A", b"z" * (3 * CS))
    attr = pyfuse3.EntryAttributes()
    attr.st_size = CS + 10
    a = await ops.setattr(ino, attr, fields(update_size=True), None, CTX)
    assert a.st_size == CS + 10 and a.st_blocks == 2 * CS // 512
    attr.st_size = 5 * CS
    a = await ops.setattr(ino, attr, fields(update_size=True), None, CTX)
    assert a.st_size == 5 * CS
    fi = await ops.open(ino, os.O_RDONLY, CTX)
    assert bytes(await ops.read(fi.fh, 0, 5 * CS)) == b"z" * (CS + 10) + bytes(4 * CS - 10)
    await ops.release(fi.fh)

    attr.st_mode = stat.S_IFREG | 0o600
    attr.st_uid, attr.st_gid = 42, 43
    attr.st_mtime_ns = 1_000_000_000_123
    a = await ops.setattr(ino, attr, fields(update_mode=True, update_uid=True,
                                            update_gid=True, update_mtime=True), None, CTX)
    assert stat.S_IMODE(a.st_mode) == 0o600 and (a.st_uid, a.st_gid) == (42, 43)
    assert a.st_mtime_ns == 1_000_000_000_123
    assert a.st_size == 5 * CS                    # untouched without update_size
    assert await fuse_errno(ops.setattr(ROOT, attr, fields(update_mode=True), None, CTX)) \
        == errno.EPERM
    assert await fuse_errno(ops.setattr(VDISK_BASE + 99, attr, fields(), None, CTX)) \
        == errno.ENOENT


# ---------------------------------------------------------------------------- xattrs
async def test_xattrs(ops):
    pool = ops.pool
    ino = await make(ops, b"A", b"q" * (2 * CS))
    names = await ops.listxattr(ino, CTX)
    for n in (b"lba_size", b"serial", b"allocated", b"unique", b"shared"):
        assert b"user.vdisk." + n in names
    assert await ops.listxattr(ROOT, CTX) == []

    assert await ops.getxattr(ino, b"user.vdisk.lba_size", CTX) == b"512"
    serial = await ops.getxattr(ino, b"user.vdisk.serial", CTX)
    assert serial and serial == pool.lookup("A").props["serial"].encode()
    assert await ops.getxattr(ino, b"user.vdisk.allocated", CTX) == str(2 * CS).encode()
    assert await ops.getxattr(ino, b"user.vdisk.unique", CTX) == str(2 * CS).encode()
    assert await ops.getxattr(ino, b"user.vdisk.shared", CTX) == b"0"
    for name in (b"user.vdisk.nope", b"user.other", b"security.selinux"):
        assert await fuse_errno(ops.getxattr(ino, name, CTX)) == pyfuse3.ENOATTR
    assert await fuse_errno(ops.getxattr(ROOT, b"user.vdisk.serial", CTX)) == pyfuse3.ENOATTR

    await ops.setxattr(ino, b"user.vdisk.lba_size", b"4096", CTX)
    assert await ops.getxattr(ino, b"user.vdisk.lba_size", CTX) == b"4096"
    await ops.setxattr(ino, b"user.vdisk.lba_size", b"512\n", CTX)
    assert await ops.getxattr(ino, b"user.vdisk.lba_size", CTX) == b"512"
    for bad in (b"1000", b"0", b"abc", b"", b"4096x"):
        assert await fuse_errno(ops.setxattr(ino, b"user.vdisk.lba_size", bad, CTX)) \
            == errno.EINVAL, bad
    assert await fuse_errno(ops.setxattr(ino, b"user.vdisk.serial", b"X", CTX)) == errno.EPERM
    assert await fuse_errno(ops.setxattr(ino, b"user.vdisk.allocated", b"1", CTX)) \
        == errno.EPERM
    assert await fuse_errno(ops.setxattr(ino, b"user.vdisk.bogus", b"1", CTX)) == errno.EINVAL
    assert await fuse_errno(ops.setxattr(ino, b"user.other", b"1", CTX)) == errno.ENOTSUP
    assert await fuse_errno(ops.setxattr(ROOT, b"user.vdisk.lba_size", b"512", CTX)) \
        == errno.ENOTSUP
    assert await fuse_errno(ops.removexattr(ino, b"user.vdisk.lba_size", CTX)) == errno.EPERM
    assert await fuse_errno(ops.removexattr(ino, b"user.x", CTX)) == pyfuse3.ENOATTR
    assert pool.lookup("A").props["serial"] == serial.decode()

    # lba_size cannot change while the VDisk is open.
    fi = await ops.open(ino, os.O_RDONLY, CTX)
    assert await fuse_errno(ops.setxattr(ino, b"user.vdisk.lba_size", b"4096", CTX)) \
        == errno.EBUSY
    assert await ops.getxattr(ino, b"user.vdisk.lba_size", CTX) == b"512"
    await ops.release(fi.fh)
    await ops.setxattr(ino, b"user.vdisk.lba_size", b"4096", CTX)

    # Space figures after a clone (made by the engine; .ctl is not a handler yet).
    pool.clone(pool.lookup("A"), "B")
    ino_b = (await ops.lookup(ROOT, b"B", CTX)).st_ino
    for i in (ino, ino_b):
        assert await ops.getxattr(i, b"user.vdisk.allocated", CTX) == str(2 * CS).encode()
        assert await ops.getxattr(i, b"user.vdisk.unique", CTX) == b"0"
        assert await ops.getxattr(i, b"user.vdisk.shared", CTX) == str(2 * CS).encode()
    assert await ops.getxattr(ino_b, b"user.vdisk.lba_size", CTX) == b"4096"
    assert await ops.getxattr(ino_b, b"user.vdisk.serial", CTX) != serial


# ---------------------------------------------------------------------------- statfs
async def test_statfs(ops):
    st = os.statvfs(ops.pool.path)
    s0 = await ops.statfs(CTX)
    assert s0.f_namemax == 64
    assert s0.f_frsize == st.f_frsize and s0.f_blocks == st.f_blocks
    assert 0 <= s0.f_bavail <= s0.f_bfree <= s0.f_blocks
    used0 = s0.f_blocks - s0.f_bfree
    ino = await make(ops, b"A")
    fi = await ops.open(ino, os.O_RDWR, CTX)
    await ops.write(fi.fh, 0, os.urandom(64 * CS))
    await ops.fsync(fi.fh, False)
    await ops.release(fi.fh)
    s1 = await ops.statfs(CTX)
    used1 = s1.f_blocks - s1.f_bfree
    # "used" is the pool's own data + metadata, not the backing filesystem's usage.
    assert used1 - used0 >= 64 * CS // s1.f_frsize
    assert used1 * s1.f_frsize == ops.pool.used_bytes() // s1.f_frsize * s1.f_frsize
    assert s1.f_files >= 3


# ---------------------------------------------------------------------------- errors
async def test_unexpected_exception_becomes_eio(ops, monkeypatch, caplog):
    ino = await make(ops, b"A", b"data")
    fi = await ops.open(ino, os.O_RDWR, CTX)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(ops.pool, "read", boom)
    assert await fuse_errno(ops.read(fi.fh, 0, 10)) == errno.EIO
    assert "boom" in caplog.text

    def corrupt(*a, **k):
        raise FormatError("metadata went bad")

    monkeypatch.setattr(ops.pool, "usage", corrupt)
    assert await fuse_errno(ops.getxattr(ino, b"user.vdisk.allocated", CTX)) == errno.EIO

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ops.pool, "write", enospc)
    assert await fuse_errno(ops.write(fi.fh, 0, b"x")) == errno.ENOSPC

    def no_errno(*a, **k):
        raise OSError("strange")

    monkeypatch.setattr(ops.pool, "truncate", no_errno)
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 0
    assert await fuse_errno(ops.setattr(ino, attr, fields(update_size=True), None, CTX)) \
        == errno.EIO

    monkeypatch.undo()
    # The handlers keep working afterwards.
    assert bytes(await ops.read(fi.fh, 0, 4)) == b"data"
    await ops.release(fi.fh)


@pytest.mark.parametrize("which", ["data", "journal"])
async def test_a_failed_fdatasync_stops_the_pool(ops, monkeypatch, pool_path, which):
    """fsyncgate: after a failed fdatasync the kernel may have dropped the pages that
    failed, so a retry that "succeeds" proves nothing. That fsync and every later write
    and fsync fail with EIO; reads go on; nothing more is written; fsck says why, and the
    next open (which clears it) has everything acknowledged before the failure."""
    from vdiskfs.cow import chunkstore, journal
    ino = await make(ops, b"A")
    fi = await ops.open(ino, os.O_RDWR, CTX)
    await ops.write(fi.fh, 0, b"acked" * 10)
    await ops.fsync(fi.fh, False)
    await ops.write(fi.fh, CS, b"y" * 10)
    real = os.fdatasync

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr((chunkstore if which == "data" else journal).os, "fdatasync", eio)
    assert await fuse_errno(ops.fsync(fi.fh, False)) == errno.EIO
    monkeypatch.undo()
    assert real is os.fdatasync
    assert ops.pool.failed and "fdatasync" in ops.pool.failed
    assert await fuse_errno(ops.fsync(fi.fh, False)) == errno.EIO      # no retry
    assert await fuse_errno(ops.write(fi.fh, 0, b"z")) == errno.EIO
    assert await fuse_errno(ops.create(ROOT, b"B", stat.S_IFREG | 0o600,
                                       os.O_RDWR | os.O_CREAT, CTX)) == errno.EIO
    assert bytes(await ops.read(fi.fh, 0, 5)) == b"acked"               # reads go on
    await ops.release(fi.fh)
    journal_size = os.path.getsize(os.path.join(pool_path, "journal"))
    ops.pool.close()                               # an unmount writes no checkpoint now
    assert os.path.getsize(os.path.join(pool_path, "journal")) == journal_size
    r = fsck(pool_path)
    assert any("stopped writing" in e for e in r.errors), r.errors
    p2 = Pool(pool_path)
    try:
        assert bytes(p2.read(p2.lookup("A"), 0, 50)) == b"acked" * 10
    finally:
        p2.close()
    assert fsck(pool_path).clean


# ---------------------------------------------------------------------------- .ctl files
async def _status(ops: Operations) -> list[str]:
    fi = await ops.open(4, os.O_RDONLY, CTX)
    try:
        data = bytes(await ops.read(fi.fh, 0, 1 << 16))
        assert bytes(await ops.read(fi.fh, 7, 5)) == data[7:12]     # one snapshot per open
    finally:
        await ops.release(fi.fh)
    return data.decode().splitlines()


async def test_ctl_files_attributes_and_access(ops):
    a = await ops.lookup(CTL, b"clone", CTX)
    assert stat.S_ISREG(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o200
    s = await ops.lookup(CTL, b"status", CTX)
    assert stat.S_ISREG(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o444
    assert s.st_ino != a.st_ino and s.st_ino < VDISK_BASE and a.st_ino < VDISK_BASE
    assert await fuse_errno(ops.lookup(CTL, b"nope", CTX)) == errno.ENOENT
    clone, status = a.st_ino, s.st_ino
    assert await fuse_errno(ops.open(clone, os.O_RDONLY, CTX)) == errno.EACCES
    assert await fuse_errno(ops.open(status, os.O_WRONLY, CTX)) == errno.EACCES
    assert await fuse_errno(ops.open(status, os.O_RDWR, CTX)) == errno.EACCES
    fi = await ops.open(clone, os.O_WRONLY | os.O_TRUNC, CTX)
    assert fi.direct_io
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 0                              # `echo ... >` truncates first: a no-op
    await ops.setattr(clone, attr, fields(update_size=True), fi.fh, CTX)
    assert await fuse_errno(ops.setattr(status, attr, fields(update_size=True), None, CTX)) \
        == errno.EPERM
    await ops.release(fi.fh)
    assert await fuse_errno(ops.unlink(CTL, b"status", CTX)) == errno.EPERM
    assert await _status(ops) == ["Source Destination Progress"]
    assert await ops.listxattr(clone, CTX) == []


async def test_ctl_clone_runs_to_completion(ops):
    pool = ops.pool
    data = os.urandom(3 * PE * CS)                  # three pages
    await make(ops, b"A", data)
    async with trio.open_nursery() as nursery:
        ops.jobs.attach(nursery)
        fi = await ops.open(3, os.O_WRONLY, CTX)
        assert await ops.write(fi.fh, 0, b"A B\n") == 4
        with trio.fail_after(10):
            while True:
                b = pool.lookup("B")
                if b is not None and not pool.clones.unfinished(b) \
                        and not ops.jobs.unsettled:
                    break
                await trio.sleep(0.01)
        assert not pool.journal.buffer           # "Completed" is shown once durable
        assert await _status(ops) == ["Source Destination Progress", "A B Completed"]
        # A completed clone is an ordinary VDisk holding the source's data.
        ino_b = (await ops.lookup(ROOT, b"B", CTX)).st_ino
        fb = await ops.open(ino_b, os.O_RDWR, CTX)
        assert bytes(await ops.read(fb.fh, 0, len(data))) == data
        await ops.write(fb.fh, 0, b"only in B")
        await ops.release(fb.fh)
        assert pool.read(pool.lookup("A"), 0, 9) == data[:9]
        # Refused commands are the write's errno and change nothing.
        for cmd, err in ((b"nope X", errno.ENOENT), (b"A B", errno.EEXIST),
                         (b"A .x", errno.EINVAL), (b"cancel A", errno.ENOENT),
                         (b"A B C", errno.EINVAL), (b"A\nB", errno.EINVAL),
                         (b"", errno.EINVAL), (b"-s A", errno.EINVAL)):
            assert await fuse_errno(ops.write(fi.fh, 0, cmd)) == err, cmd
        assert sorted(vd.name for vd in pool.vdisks()) == ["A", "B"]
        assert await ops.write(fi.fh, 0, b"-p") == 2
        assert await _status(ops) == ["Source Destination Progress"]
        await ops.release(fi.fh)
        nursery.cancel_scope.cancel()


async def test_ctl_unfinished_clone_is_busy_and_cancel_removes_it(pool_path):
    pool = Pool(pool_path)
    ops = Operations(pool, clone_speed=1)          # one page per step, then a long sleep
    try:
        data = os.urandom(3 * PE * CS)
        await make(ops, b"A", data)
        pool.sync()
        slots = pool.meta.slots_in_use()
        async with trio.open_nursery() as nursery:
            ops.jobs.attach(nursery)
            fi = await ops.open(3, os.O_WRONLY, CTX)
            await ops.write(fi.fh, 0, b"-s A -d B")
            await trio.sleep(0.05)
            b = await ops.lookup(ROOT, b"B", CTX)
            assert b.st_size == len(data)                   # its final size from the start
            assert await fuse_errno(ops.open(b.st_ino, os.O_RDONLY, CTX)) == errno.EBUSY
            assert await fuse_errno(ops.unlink(ROOT, b"A", CTX)) == errno.EBUSY
            assert await fuse_errno(ops.rename(ROOT, b"A", ROOT, b"Z", 0, CTX)) == errno.EBUSY
            assert await fuse_errno(ops.unlink(ROOT, b"B", CTX)) == errno.EBUSY
            assert await fuse_errno(ops.setxattr(b.st_ino, b"user.vdisk.lba_size", b"4096",
                                                 CTX)) == errno.EBUSY
            rows = await _status(ops)
            assert rows[1].split()[:2] == ["A", "B"]
            pct = rows[1].split()[2]
            assert pct.endswith("%") and 0 <= int(pct[:-1]) <= 99
            # The source stays writable; the clone keeps the data of its start.
            fa = await ops.open((await ops.lookup(ROOT, b"A", CTX)).st_ino, os.O_RDWR, CTX)
            await ops.write(fa.fh, 2 * PE * CS, b"after")
            await ops.release(fa.fh)
            await ops.write(fi.fh, 0, b"cancel A")
            assert pool.lookup("B") is None
            assert await fuse_errno(ops.getattr(b.st_ino, CTX)) == errno.ENOENT
            assert (await _status(ops))[1].split() == ["A", "B", "Cancelled"]
            await ops.release(fi.fh)
            nursery.cancel_scope.cancel()
        # Everything the clone held is released (A's new chunk replaced the one only the
        # clone's copy of that page still named).
        assert pool.meta.slots_in_use() == slots
    finally:
        pool.close(commit=False)
