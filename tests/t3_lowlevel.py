"""fallocate and lseek installed into libfuse's session (vdiskfs/fs/extra_ops.py,
vdiskfs/fs/session.py): they reach the daemon, are answered exactly once, never with
ENOSYS; and the layout checks that guard the memory writes refuse what does not match.
What the operations do is tested in t1_thin.py (engine) and t4_thin.py (mount).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re

import pytest
import trio
import trio.testing
from pyfuse3 import FUSEError

from support.common import daemon_log

from vdiskfs.fs import extra_ops, session
from vdiskfs.fs.extra_ops import ExtraOps

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE   # as `fallocate -p` and discard send it
SIZE = 1 << 20
CALLS = 2000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, off: int, length: int) -> int:
    """fallocate(2): 0 or the errno (os.posix_fallocate cannot pass a mode)."""
    return 0 if _libc.fallocate(fd, mode, off, length) == 0 else ctypes.get_errno()


def lseek(fd: int, off: int, whence: int) -> int:
    """The offset, or -errno."""
    try:
        return os.lseek(fd, off, whence)
    except OSError as e:
        return -e.errno


def _requests(pool: str, op: str, inode: int) -> list[str]:
    return re.findall(rf"lowlevel {op}\({inode}, [^)]*\)", daemon_log(pool))


def _vdisk(path: str, *, fsync: bool = True) -> int:
    """A VDisk of SIZE random bytes (no hole anywhere), open read-write."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.pwrite(fd, os.urandom(SIZE), 0)
    if fsync:
        os.fsync(fd)
    return fd


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


# ---------------------------------------------------------------------------- mounted
@pytest.mark.mount
def test_both_installed_and_seek_data_hole_reach_the_daemon(new_mount):
    m = new_mount.start("--debug")
    assert "fallocate and lseek (SEEK_DATA/SEEK_HOLE) installed" in daemon_log(m.pool)
    fd = _vdisk(m.path("A"))
    try:
        ino = os.fstat(fd).st_ino
        assert lseek(fd, 0, os.SEEK_DATA) == 0
        assert lseek(fd, 4096, os.SEEK_DATA) == 4096
        assert lseek(fd, 0, os.SEEK_HOLE) == SIZE
        assert lseek(fd, SIZE, os.SEEK_HOLE) == -errno.ENXIO
        assert lseek(fd, SIZE + 4096, os.SEEK_DATA) == -errno.ENXIO
    finally:
        os.close(fd)
    # The kernel's own fallback would give the same numbers: the log tells they were ours.
    assert _requests(m.pool, "lseek", ino) == [
        f"lowlevel lseek({ino}, 0, 3)", f"lowlevel lseek({ino}, 4096, 3)",
        f"lowlevel lseek({ino}, 0, 4)", f"lowlevel lseek({ino}, {SIZE}, 4)",
        f"lowlevel lseek({ino}, {SIZE + 4096}, 3)"]


@pytest.mark.mount
def test_seek_sees_bytes_still_in_the_kernels_cache(mount):
    """The kernel sends LSEEK without writing its dirty pages back: the daemon must, or
    a file just written would be all hole (ENXIO from 0), and a copy by SEEK_DATA empty."""
    fd = _vdisk(mount.path("A"), fsync=False)
    try:
        assert lseek(fd, 0, os.SEEK_DATA) == 0
        assert lseek(fd, 0, os.SEEK_HOLE) == SIZE
        os.pwrite(fd, b"x", 2 * SIZE - 1)                 # grows it, in the cache only
        last_chunk = 2 * SIZE - os.fstat(fd).st_blksize   # st_blksize: the chunk size
        assert lseek(fd, SIZE, os.SEEK_DATA) == last_chunk
        assert lseek(fd, 0, os.SEEK_HOLE) == SIZE
    finally:
        os.close(fd)


@pytest.mark.mount
def test_fallocate_reaches_the_daemon_each_time_and_never_gets_enosys(new_mount):
    """After one ENOSYS the kernel answers EOPNOTSUPP itself and stops asking: the user
    sees EOPNOTSUPP either way, so the daemon's log is what tells."""
    m = new_mount.start("--debug")
    fd = _vdisk(m.path("A"))
    try:
        ino = os.fstat(fd).st_ino
        results = [fallocate(fd, PUNCH, 0, 4096), fallocate(fd, PUNCH, 8192, 4096)]
    finally:
        os.close(fd)
    assert results == [0, 0], [os.strerror(e) for e in results]
    assert _requests(m.pool, "fallocate", ino) == [
        f"lowlevel fallocate({ino}, {PUNCH}, 0, 4096)",
        f"lowlevel fallocate({ino}, {PUNCH}, 8192, 4096)"]


@pytest.mark.mount
def test_thousands_of_requests_leave_the_mount_answering(mount):
    p = mount.path("A")
    fd = _vdisk(p)
    try:
        def burst(n: int) -> None:
            for i in range(n // 2):
                assert fallocate(fd, PUNCH, (i % 8) * 4096, 4096) in (0, errno.EOPNOTSUPP)
                assert lseek(fd, (i % 8) * 4096, os.SEEK_DATA) >= 0   # data follows
        burst(200)                                        # warm-up: caches, threads
        before = _rss_kib(mount.pid)
        burst(CALLS)
        grown = _rss_kib(mount.pid) - before
    finally:
        os.close(fd)
    # A leak per request (a reply never sent, a task never ended) would show here, or
    # hang the loop above; the bound is loose on purpose: no allocator noise fails it.
    assert grown < 16 * 1024, f"daemon RSS grew {grown} KiB over {CALLS} requests"
    assert os.path.getsize(p) == SIZE
    with open(p, "rb") as f:
        assert len(f.read()) == SIZE
    assert "A" in os.listdir(mount.mnt)
    assert "Traceback" not in daemon_log(mount.pool)


# ---------------------------------------------------------------------------- no FUSE
FILLED = session.PYFUSE3_OPS["3.5.0"]
SLOTS = {session.OP_SLOTS["fallocate"]: 0xAAAA0, session.OP_SLOTS["lseek"]: 0xBBBB0}


def _tables():
    """A fake se->op and pyfuse3 table, as they are after pyfuse3.init()."""
    static = ctypes.create_string_buffer(session.OPS_SIZE)
    for name in FILLED:
        _pointer(static, session.OP_SLOTS[name]).value = 0x1000 + session.OP_SLOTS[name]
    copy = ctypes.create_string_buffer(static.raw, session.OPS_SIZE)
    return copy, static


def _pointer(buf, at: int) -> ctypes.c_void_p:
    return ctypes.c_void_p.from_address(ctypes.addressof(buf) + at)


def test_op_table_layout_is_libfuse_3_14s():
    assert (session.OP_OFFSET, session.OPS_SIZE) == (40, 352)
    assert (session.OP_SLOTS["fallocate"], session.OP_SLOTS["lseek"]) == (320, 344)


def test_op_names_follow_the_installed_header():
    header = "/usr/include/fuse3/fuse_lowlevel.h"
    if not os.path.exists(header):
        pytest.skip(f"{header} is not installed (libfuse3-dev)")
    with open(header) as f:
        text = f.read()
    body = text[text.index("struct fuse_lowlevel_ops {"):]
    body = body[:body.index("\n};")]
    names = re.findall(r"\(\*(\w+)\)\s*\(fuse_req_t|\(\*(\w+)\)\s*\(void \*userdata", body)
    names = [a or b for a, b in names]
    # ioctl is declared twice (#if FUSE_USE_VERSION < 35 / #else): one slot.
    names = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    assert tuple(names) == session.OP_NAMES


def test_fill_ops_writes_the_two_slots_when_everything_matches():
    copy, static = _tables()
    session.fill_ops(ctypes.addressof(copy), ctypes.addressof(static), FILLED, SLOTS)
    changed = [at for at in range(0, session.OPS_SIZE, 8)
               if copy.raw[at:at + 8] != static.raw[at:at + 8]]
    assert changed == [320, 344]
    assert (_pointer(copy, 320).value, _pointer(copy, 344).value) == (0xAAAA0, 0xBBBB0)


@pytest.mark.parametrize("spoil", ["one byte differs", "slot already set", "empty table",
                                   "another op set", "slot out of the table"])
def test_fill_ops_refuses_and_writes_nothing(spoil):
    copy, static = _tables()
    ops = dict(SLOTS)
    if spoil == "one byte differs":
        copy[17] = copy.raw[17] ^ 1
    elif spoil == "slot already set":            # in both: someone else's op
        _pointer(copy, 344).value = _pointer(static, 344).value = 0xDEAD0
    elif spoil == "empty table":                 # before pyfuse3.init()
        ctypes.memset(copy, 0, session.OPS_SIZE)
        ctypes.memset(static, 0, session.OPS_SIZE)
    elif spoil == "another op set":              # a pyfuse3 filling other slots
        _pointer(copy, 8).value = _pointer(static, 8).value = 0xBEEF0
    else:
        ops[session.OPS_SIZE] = 1
    before = copy.raw
    with pytest.raises(session.Unsupported):
        session.fill_ops(ctypes.addressof(copy), ctypes.addressof(static), FILLED, ops)
    assert copy.raw == before


def test_without_a_session_install_declines_and_says_why(caplog):
    class Ops:
        async def fallocate(self, inode, mode, off, length): ...
        async def lseek(self, inode, off, whence): ...

    with caplog.at_level("WARNING"):
        assert extra_ops.install(Ops()) is None
        assert extra_ops.install(object()) is None
    assert "pyfuse3 has no session" in caplog.text
    assert "Operations has no fallocate, lseek()" in caplog.text
    assert "fallocate(2) (punch hole, discard, zero range) is unavailable" in caplog.text


class FakeOps:
    """Operations stand-in: its answers are chosen per inode."""

    def __init__(self):
        self.release = trio.Event()

    async def fallocate(self, inode, mode, off, length):
        return await self._answer(inode, None)

    async def lseek(self, inode, off, whence):
        return await self._answer(inode, off + 1)

    async def _answer(self, inode, value):
        if inode == 1:
            return value
        if inode == 2:
            raise FUSEError(errno.EOPNOTSUPP)
        if inode == 3:
            raise FUSEError(errno.ENOSYS)
        if inode == 4:
            raise ValueError("a bug")
        if inode == 5:
            await self.release.wait()                     # until cancelled
        if inode == 6:
            return -5                                     # not an offset
        if inode == 7:
            raise FUSEError(4096)                         # the kernel refuses > 511
        return value


class Replies:
    def __init__(self):
        self.sent: dict[int, list] = {}

    def err(self, req, err):
        self.sent.setdefault(req, []).append(("err", err))
        return 0

    def lseek(self, req, off):
        self.sent.setdefault(req, []).append(("lseek", off))
        return 0


# inode -> (fallocate's reply, lseek's reply at offset 10)
EXPECTED = {1: (("err", 0), ("lseek", 11)),
            2: (("err", errno.EOPNOTSUPP),) * 2,
            3: (("err", errno.EOPNOTSUPP),) * 2,          # never ENOSYS
            4: (("err", errno.EIO),) * 2,
            5: (("err", errno.EINTR),) * 2,               # cancelled: the mount ends
            6: (("err", 0), ("err", errno.EIO)),
            7: (("err", errno.EIO),) * 2}


def test_every_request_is_answered_exactly_once(caplog):
    """Through the real ctypes callbacks (called as libfuse would), fake replies."""
    replies = Replies()
    extra = ExtraOps(FakeOps(), replies.err, replies.lseek)

    async def main():
        async with trio.open_nursery() as nursery:
            extra.bind(nursery)
            for ino in EXPECTED:
                extra.c_fallocate(ino * 2, ino, PUNCH, 0, 4096, None)
                extra.c_lseek(ino * 2 + 1, ino, 10, os.SEEK_DATA, None)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()                 # as the daemon does at unmount

    with caplog.at_level("ERROR"):
        trio.run(main)
    for ino, (falloc, seek) in EXPECTED.items():
        assert replies.sent.get(ino * 2) == [falloc], ino
        assert replies.sent.get(ino * 2 + 1) == [seek], ino
    assert "unexpected error in fallocate" in caplog.text        # the bug is logged
    assert "lseek handler returned -5" in caplog.text


def test_a_request_without_a_running_nursery_gets_eio_at_once(caplog):
    replies = Replies()
    extra = ExtraOps(FakeOps(), replies.err, replies.lseek)
    extra.c_fallocate(1, 1, 0, 0, 4096, None)             # not bound yet

    async def main():
        async with trio.open_nursery() as nursery:
            extra.bind(nursery)

    trio.run(main)
    with caplog.at_level("ERROR"):
        extra.c_lseek(2, 1, 0, os.SEEK_HOLE, None)        # bound, but that nursery closed
    assert replies.sent == {1: [("err", errno.EIO)], 2: [("err", errno.EIO)]}
    assert "cannot start lseek" in caplog.text
