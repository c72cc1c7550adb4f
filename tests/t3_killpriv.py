"""HANDLE_KILLPRIV_V2 (vdiskfs/fs/killpriv.py): writes without a GETXATTR round trip each,
and the promise it rests on, no setuid/setgid bits on a VDisk."""

import errno
import mmap
import os
import re
import stat

import pytest

from support.common import read_file

WRITES = 40


def _capability_probes(pool: str) -> int:
    with open(os.path.join(pool, "daemon.log")) as f:
        return len(re.findall(r"getxattr \d+ b'security\.capability'", f.read()))


@pytest.mark.mount
def test_writes_do_not_ask_for_security_capability(new_mount):
    m = new_mount.start("--debug")
    with open(os.path.join(m.pool, "daemon.log")) as f:
        assert "HANDLE_KILLPRIV_V2 (no GETXATTR before each write): negotiated" in f.read()
    p = m.path("A")
    piece = os.urandom(4096)
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        for i in range(WRITES):                      # buffered: one write(2) each
            os.pwrite(fd, piece, i * 8192)
        os.fsync(fd)
    finally:
        os.close(fd)
    buf = mmap.mmap(-1, 4096)
    buf.write(piece)
    fd = os.open(p, os.O_RDWR | os.O_DIRECT)
    try:
        for i in range(WRITES):                      # O_DIRECT: each one reaches the daemon
            os.pwritev(fd, [buf], i * 8192 + 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    data = read_file(p)
    assert data[:4096] == piece and data[4096:8192] == piece
    # The kernel asks once per inode (then marks it S_NOSEC); without the flag it would
    # have asked before each of the 80 writes.
    assert _capability_probes(m.pool) <= 2


@pytest.mark.mount
def test_no_setuid_or_setgid_on_a_vdisk(mount):
    p = mount.path("A")
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o6755)
    os.close(fd)
    assert stat.S_IMODE(os.stat(p).st_mode) & (stat.S_ISUID | stat.S_ISGID) == 0
    for mode in (0o4755, 0o2755, 0o6700):
        with pytest.raises(PermissionError) as e:
            os.chmod(p, mode)
        assert e.value.errno == errno.EPERM
    os.chmod(p, 0o1640)                               # other bits stay settable
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o1640


@pytest.mark.mount
def test_setid_bits_stored_by_an_older_version_are_not_shown(new_mount):
    """A pool written before this rule may hold a mode with S_ISUID: never reported, so
    the kernel never expects the daemon to clear it on write."""
    from vdiskfs.cow.pool import Pool, create_pool
    create_pool(new_mount.pool)
    pool = Pool(new_mount.pool)
    pool.create("OLD", 4096, mode=0o4755)
    pool.close()
    m = new_mount.start()
    assert stat.S_IMODE(os.stat(m.path("OLD")).st_mode) == 0o755


def test_without_a_session_it_declines_and_says_why(caplog):
    """No pyfuse3 session in this process: install() must decline (log, False), never
    raise or touch memory it did not check."""
    from vdiskfs.fs import killpriv
    with caplog.at_level("WARNING"):
        assert killpriv.install() is False
    assert "HANDLE_KILLPRIV_V2 not requested" in caplog.text
