"""vdiskfs through a real FUSE mount (SPEC §1–§2): the mount/umount lifecycle and the
commands around it, POSIX behaviour of VDisks as files, a randomised comparison with a
plain file, and the mount surviving bad requests.

Every test runs the daemon as users run it (``vdiskfs mount`` in a subprocess, or
``python -m vdiskfs mount -f`` for the foreground tests) and cleans up through the
conftest fixtures; the pool_dir fixture fscks every pool at teardown.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import signal
import stat
import subprocess

import pytest

from support.common import (VDISKFS, Mount, allocated, assert_user_error, daemon_log,
                            fsck_clean, is_mounted, read_file, run, used_bytes, vdiskfs,
                            wait_until, write_file)

pytestmark = pytest.mark.mount

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

XATTRS = ("user.vdisk.lba_size", "user.vdisk.serial", "user.vdisk.allocated",
          "user.vdisk.unique", "user.vdisk.shared")


# ---------------------------------------------------------------- helpers
def process_gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def lock_free(pool: str) -> bool:
    fd = os.open(os.path.join(pool, "lock"), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def sync_pool(mount: Mount) -> None:
    """Force a commit of the whole pool (an fsync on any VDisk commits everything), so that
    chunks freed before it are given back to the backing filesystem."""
    write_file(mount.path("ZZSYNC"), b"\1", fsync=True)


def st_blocks_bytes(path: str, expect: int) -> int:
    """st_blocks*512 of ``path`` once it equals ``expect`` (attributes are cached by the
    kernel for up to a second); returns the last value seen, for the caller to assert."""
    last = [None]

    def check():
        last[0] = os.stat(path).st_blocks * 512
        return last[0] == expect
    try:
        wait_until(check, f"st_blocks of {path} to become {expect // 512}", timeout=10)
    except AssertionError:
        pass
    return last[0]


def chunk_size_of(path: str) -> int:
    return os.stat(path).st_blksize


# ================================================================ lifecycle
def test_mount_returns_ready_with_ctl(mount):
    assert is_mounted(mount.mnt)
    with open("/proc/mounts") as f:
        rows = [line.split() for line in f]
    row = [r for r in rows if r[1] == os.path.realpath(mount.mnt)]
    assert row and row[-1][2] == "fuse.vdiskfs", row
    # Ready at once: no retry loop needed for the first request.
    assert os.listdir(mount.mnt) == [".ctl"]
    st = os.stat(mount.path(".ctl"))
    assert stat.S_ISDIR(st.st_mode)
    # .ctl holds virtual control files only (SPEC §4): at least clone and status.
    entries = os.listdir(mount.path(".ctl"))
    assert {"clone", "status"} <= set(entries), entries
    for name in entries:
        assert stat.S_ISREG(os.stat(mount.path(f".ctl/{name}")).st_mode), name
    assert not lock_free(mount.pool)
    assert not process_gone(mount.pid)


def test_second_mount_of_same_pool_is_refused(mount, tmp_path):
    other = tmp_path / "mnt2"
    other.mkdir()
    write_file(mount.path("FOO"), b"still here")
    proc = vdiskfs("mount", mount.pool, str(other), check=False, timeout=60)
    line = assert_user_error(proc, "already mounted at", mount.mnt, "vdiskfs umount")
    assert mount.pool in line or os.path.basename(mount.pool) in line, line
    assert not is_mounted(str(other))
    # The first mount is untouched.
    assert read_file(mount.path("FOO")) == b"still here"
    assert not process_gone(mount.pid)


def test_umount_returns_after_daemon_exited(mount):
    write_file(mount.path("FOO"), b"x" * 5000)
    pid = mount.pid
    mount.stop()
    # No waiting here: `vdiskfs umount` promises all of this when it returns.
    assert not is_mounted(mount.mnt)
    assert lock_free(mount.pool)
    out = fsck_clean(mount.pool)
    assert "clean" in out
    # The process itself: umount waits for the lock, which the daemon drops just before it
    # exits; allow it those last milliseconds rather than make this test racy.
    wait_until(lambda: process_gone(pid), f"daemon {pid} to exit")
    log = daemon_log(mount.pool)
    assert "closed cleanly" in log and "Traceback" not in log, log


def test_umount_refuses_busy_mount_and_non_mounts(mount, tmp_path):
    fd = os.open(mount.path("FOO"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        proc = vdiskfs("umount", mount.mnt, "--timeout", "10", check=False, timeout=60)
        assert_user_error(proc, "busy")
        assert is_mounted(mount.mnt)
        os.pwrite(fd, b"alive", 0)        # the mount still serves the open file
        os.fsync(fd)
        assert os.pread(fd, 5, 0) == b"alive"
    finally:
        os.close(fd)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert_user_error(vdiskfs("umount", str(plain), check=False), "not a vdiskfs mount")
    mount.stop()
    assert lock_free(mount.pool)


def test_remount_keeps_data_and_properties(mount):
    data = random.Random(7).randbytes(3 * MiB + 12345)
    write_file(mount.path("FOO"), data, offset=5 * MiB)
    fd = os.open(mount.path("BAR"), os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 10 * GiB)
    os.close(fd)
    os.chmod(mount.path("FOO"), 0o640)
    os.setxattr(mount.path("BAR"), "user.vdisk.lba_size", b"4096")
    before = {n: (os.stat(mount.path(n)).st_size,
                  os.getxattr(mount.path(n), "user.vdisk.serial"),
                  os.getxattr(mount.path(n), "user.vdisk.lba_size"))
              for n in ("FOO", "BAR")}
    mount.stop()
    fsck_clean(mount.pool)
    mount.start()
    assert sorted(os.listdir(mount.mnt)) == [".ctl", "BAR", "FOO"]
    after = {n: (os.stat(mount.path(n)).st_size,
                 os.getxattr(mount.path(n), "user.vdisk.serial"),
                 os.getxattr(mount.path(n), "user.vdisk.lba_size"))
             for n in ("FOO", "BAR")}
    assert after == before
    assert after["BAR"][2] == b"4096"
    assert stat.S_IMODE(os.stat(mount.path("FOO")).st_mode) == 0o640
    content = read_file(mount.path("FOO"))
    assert len(content) == 5 * MiB + len(data)
    assert content[:5 * MiB] == bytes(5 * MiB)
    assert content[5 * MiB:] == data


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_foreground_mount_exits_cleanly_on_signal(need_fuse, pool_dir, tmp_path, sig):
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    log_path = tmp_path / "fg.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(VDISKFS + ["mount", "-f", pool_dir, mnt],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_until(lambda: is_mounted(mnt) or proc.poll() is not None, "the foreground mount")
        assert proc.poll() is None, f"foreground daemon exited: {log_path.read_text()}"
        wait_until(lambda: os.listdir(mnt) == [".ctl"], "the mount to answer")
        data = random.Random(sig).randbytes(2 * MiB + 3)
        # No fsync: a clean unmount must write back what the kernel still caches.
        write_file(os.path.join(mnt, "FOO"), data, fsync=False)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
        logtext = log_path.read_text(errors="replace")
        assert rc == 0, f"exit status {rc}:\n{logtext}"
        assert "Traceback" not in logtext, logtext
        assert not is_mounted(mnt)
        assert lock_free(pool_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if is_mounted(mnt):
            run(["umount", "-l", mnt], check=False)
    fsck_clean(pool_dir)
    m = Mount(pool_dir, mnt).start()
    try:
        assert read_file(m.path("FOO")) == data
    finally:
        m.cleanup()


@pytest.mark.parametrize("cmd", [["fusermount3", "-u"], ["umount"]], ids=["fusermount3", "umount"])
def test_plain_unmount_ends_daemon_cleanly(mount, cmd):
    data = random.Random(3).randbytes(MiB + 77)
    write_file(mount.path("FOO"), data, fsync=False)
    pid = mount.pid
    run(cmd + [mount.mnt])
    wait_until(lambda: process_gone(pid), f"daemon {pid} to exit after {cmd[0]}", timeout=120)
    mount.pid = None
    wait_until(lambda: lock_free(mount.pool), "the pool lock to be released")
    assert not is_mounted(mount.mnt)
    log = daemon_log(mount.pool)
    assert "closed cleanly" in log and "Traceback" not in log, log
    fsck_clean(mount.pool)
    mount.start()
    assert read_file(mount.path("FOO")) == data


def test_chunk_size_option_on_new_pool(new_mount):
    new_mount.start("--chunk-size", "128K")
    foo = new_mount.path("FOO")
    fd = os.open(foo, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 10 * MiB)
    os.pwrite(fd, b"\xab", 3 * 128 * KiB + 5)     # one byte allocates one whole chunk
    os.fsync(fd)
    os.close(fd)
    assert os.stat(foo).st_blksize == 128 * KiB
    assert allocated(foo) == 128 * KiB
    new_mount.stop()
    # The chunk size is fixed at creation: another one is refused, none keeps it.
    proc = vdiskfs("mount", "--chunk-size", "64K", new_mount.pool, new_mount.mnt, check=False,
                   timeout=60)
    assert_user_error(proc, "chunk size")
    assert not is_mounted(new_mount.mnt)
    assert lock_free(new_mount.pool)
    new_mount.start()
    assert os.stat(foo).st_blksize == 128 * KiB
    with open(foo, "rb") as f:
        f.seek(3 * 128 * KiB)
        assert f.read(8) == b"\0\0\0\0\0\xab\0\0"


@pytest.mark.parametrize("size", ["100K", "3000", "32M", "1000000", "0"])
def test_bad_chunk_size_is_refused(new_mount, size):
    os.makedirs(new_mount.mnt)
    proc = vdiskfs("mount", "--chunk-size", size, new_mount.pool, new_mount.mnt, check=False,
                   timeout=60)
    if proc.returncode == 0:                 # it mounted after all: let the fixture clean up
        with open(os.path.join(new_mount.pool, "lock")) as f:
            new_mount.pid = int(f.read().strip())
    assert_user_error(proc, "chunk size", "power of two")
    assert not is_mounted(new_mount.mnt)
    assert not os.path.exists(os.path.join(new_mount.pool, "vdiskfs-pool"))


def test_create_command(mount, tmp_path):
    proc = vdiskfs("create", "FOO", "10M", "--mount", mount.mnt)
    assert "FOO" in proc.stdout
    st = os.stat(mount.path("FOO"))
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == 10 * MiB
    assert st.st_blocks == 0
    assert read_file(mount.path("FOO")) == bytes(10 * MiB)
    # $VDISKFS_MOUNT names the mount too.
    vdiskfs("create", "BAR", "1G", env={**os.environ, "VDISKFS_MOUNT": mount.mnt})
    assert os.stat(mount.path("BAR")).st_size == GiB
    assert_user_error(vdiskfs("create", "FOO", "1M", "--mount", mount.mnt, check=False),
                      "exists")
    assert os.stat(mount.path("FOO")).st_size == 10 * MiB
    assert_user_error(vdiskfs("create", ".bad", "1M", "--mount", mount.mnt, check=False),
                      "name")
    assert_user_error(vdiskfs("create", "X" * 65, "1M", "--mount", mount.mnt, check=False),
                      "name")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert_user_error(vdiskfs("create", "BAZ", "1M", "--mount", str(plain), check=False),
                      "not a vdiskfs mount")
    proc = vdiskfs("create", "BAZ", "ten", "--mount", mount.mnt, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert sorted(os.listdir(mount.mnt)) == [".ctl", "BAR", "FOO"]


def test_fsck_of_mounted_pool_fails_clearly(mount):
    write_file(mount.path("FOO"), b"data")
    proc = vdiskfs("fsck", mount.pool, check=False)
    assert_user_error(proc, "in use")
    assert "unmount" in proc.stderr.lower()
    assert read_file(mount.path("FOO")) == b"data"       # the mount did not notice
    mount.stop()
    fsck_clean(mount.pool)


# ================================================================ names and directory
VALID_NAMES = ["A", "z" * 64, "foo.bar_baz-1", "X.", "0", "disk-01.img", "a..b", "_", "-"]
INVALID_NAMES = ["a" * 65, ".hidden", "..x", "has space", "naïve", "日本", "tab\tname",
                 "a:b", "a*b", "semi;colon", "nl\n", "ünï"]


def test_valid_names(mount):
    for name in VALID_NAMES:
        fd = os.open(mount.path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, name.encode())
        os.close(fd)
    assert sorted(os.listdir(mount.mnt)) == sorted(VALID_NAMES + [".ctl"])
    for name in VALID_NAMES:
        assert read_file(mount.path(name)) == name.encode()
    os.truncate(mount.path("A"), 0)
    run(["truncate", "-s", "1M", mount.path("viatruncate")])
    assert os.stat(mount.path("viatruncate")).st_size == MiB


@pytest.mark.parametrize("name", INVALID_NAMES, ids=lambda n: repr(n)[1:-1][:12])
def test_invalid_names_are_einval(mount, name):
    with pytest.raises(OSError) as ei:
        os.open(mount.path(name), os.O_RDWR | os.O_CREAT, 0o600)
    assert ei.value.errno == errno.EINVAL
    write_file(mount.path("GOOD"), b"good")
    with pytest.raises(OSError) as ei:
        os.rename(mount.path("GOOD"), mount.path(name))
    assert ei.value.errno == errno.EINVAL
    assert sorted(os.listdir(mount.mnt)) == [".ctl", "GOOD"]
    assert read_file(mount.path("GOOD")) == b"good"


def test_non_utf8_name_is_einval(mount):
    with pytest.raises(OSError) as ei:
        os.open(os.fsencode(mount.mnt) + b"/bad\xff", os.O_RDWR | os.O_CREAT, 0o600)
    assert ei.value.errno == errno.EINVAL
    assert os.listdir(mount.mnt) == [".ctl"]


def test_ctl_is_reserved(mount):
    ctl = mount.path(".ctl")
    with pytest.raises(OSError):
        os.open(ctl, os.O_RDWR | os.O_CREAT, 0o600)
    with pytest.raises(OSError) as ei:
        os.open(ctl, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    assert ei.value.errno == errno.EEXIST
    write_file(mount.path("FOO"), b"foo")
    with pytest.raises(OSError):
        os.rename(mount.path("FOO"), ctl)
    with pytest.raises(OSError):
        os.rename(ctl, mount.path("BAR"))
    with pytest.raises(OSError):
        os.rmdir(ctl)
    with pytest.raises(OSError):
        os.unlink(ctl)
    with pytest.raises(OSError):
        os.truncate(ctl, 0)
    assert stat.S_ISDIR(os.stat(ctl).st_mode)
    assert sorted(os.listdir(mount.mnt)) == [".ctl", "FOO"]
    assert read_file(mount.path("FOO")) == b"foo"


def test_no_subdirectories_or_links(mount):
    for fn, args in [(os.mkdir, (mount.path("DIR"),)),
                     (os.mkdir, (mount.path(".ctl/DIR"),)),
                     (os.symlink, ("/etc/passwd", mount.path("LNK")))]:
        with pytest.raises(OSError) as ei:
            fn(*args)
        assert ei.value.errno == errno.EPERM, (fn.__name__, args)
    write_file(mount.path("FOO"), b"x")
    with pytest.raises(OSError) as ei:
        os.link(mount.path("FOO"), mount.path("HARD"))
    assert ei.value.errno == errno.EPERM
    with pytest.raises(OSError) as ei:
        os.mknod(mount.path("FIFO"), 0o600 | stat.S_IFIFO)
    assert ei.value.errno == errno.EPERM
    assert sorted(os.listdir(mount.mnt)) == [".ctl", "FOO"]
    assert "DIR" not in os.listdir(mount.path(".ctl"))


# ================================================================ sizes and space
def test_open_with_o_trunc_empties_an_existing_vdisk(mount):
    """``echo hi > FOO`` over a VDisk: the kernel (atomic O_TRUNC) sends no truncate of
    its own, so the daemon must empty it at open, or the old bytes come back past the
    new end (after a remount, in a clone, in the holes of a sparse copy onto it)."""
    foo = mount.path("FOO")
    write_file(foo, random.Random(2).randbytes(MiB))
    with open(foo, "w") as f:                       # O_WRONLY | O_CREAT | O_TRUNC
        f.write("hi\n")
    assert os.stat(foo).st_size == 3 and read_file(foo) == b"hi\n"
    sync_pool(mount)
    assert allocated(foo) <= chunk_size_of(foo)
    fd = os.open(foo, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 3
    finally:
        os.close(fd)
    with open(foo, "rb") as f:                      # O_RDONLY | O_TRUNC: left alone
        pass
    fd = os.open(foo, os.O_RDONLY | os.O_TRUNC)
    os.close(fd)
    mount.stop()
    mount.start()
    assert read_file(foo) == b"hi\n"


def test_truncate_grow_and_shrink(mount):
    foo = mount.path("FOO")
    data = random.Random(1).randbytes(700 * KiB)
    write_file(foo, data)
    cs = chunk_size_of(foo)
    os.truncate(foo, 3 * MiB)                       # grow: the new range reads zeros
    assert os.stat(foo).st_size == 3 * MiB
    assert read_file(foo) == data + bytes(3 * MiB - len(data))
    cut = cs + 12345                                # shrink inside a chunk
    os.truncate(foo, cut)
    assert os.stat(foo).st_size == cut
    assert read_file(foo) == data[:cut]
    os.truncate(foo, 2 * MiB)                       # regrow: the cut-off tail stays gone
    assert read_file(foo) == data[:cut] + bytes(2 * MiB - cut)
    run(["truncate", "-s", "100K", foo])
    assert read_file(foo) == data[:100 * KiB]
    run(["truncate", "-s", "+1M", foo])
    assert os.stat(foo).st_size == 100 * KiB + MiB
    os.truncate(foo, 0)
    assert os.stat(foo).st_size == 0 and read_file(foo) == b""
    sync_pool(mount)
    assert allocated(foo) == 0
    assert st_blocks_bytes(foo, 0) == 0


def test_thin_provisioning_st_blocks(mount):
    foo = mount.path("FOO")
    run(["truncate", "-s", "1G", foo])
    st = os.stat(foo)
    assert st.st_size == GiB
    assert st.st_blocks == 0
    assert allocated(foo) == 0
    # `ls -l` shows the size, `du` the allocation.
    assert run(["du", "-B1", foo]).stdout.split()[0] == "0"
    write_file(foo, random.Random(2).randbytes(MiB), offset=512 * MiB)
    assert os.stat(foo).st_size == GiB
    assert allocated(foo) == MiB
    assert st_blocks_bytes(foo, MiB) == MiB
    assert run(["du", "-B1", foo]).stdout.split()[0] == str(MiB)
    with open(foo, "rb") as f:
        f.seek(511 * MiB)
        assert f.read(MiB) == bytes(MiB)


def test_shrink_frees_chunks(mount):
    foo = mount.path("FOO")
    write_file(foo, random.Random(3).randbytes(8 * MiB))
    sync_pool(mount)
    assert st_blocks_bytes(foo, 8 * MiB) == 8 * MiB
    used_before = used_bytes(mount.mnt)
    os.truncate(foo, MiB)
    sync_pool(mount)
    assert allocated(foo) == MiB
    assert st_blocks_bytes(foo, MiB) == MiB
    # The backing filesystem gets the space back once I/O pauses (fs/puncher.py).
    wait_until(lambda: used_before - used_bytes(mount.mnt) >= 6 * MiB,
               f"df used to drop by 6 MiB from {used_before}")


def test_whole_chunk_zero_writes_free_chunks(mount):
    foo = mount.path("FOO")
    write_file(foo, random.Random(4).randbytes(4 * MiB))
    cs = chunk_size_of(foo)
    n = 4 * MiB // cs
    assert n >= 6, f"chunk size {cs} too large for this test"
    assert allocated(foo) == 4 * MiB
    # One whole chunk zeroed in one write.
    write_file(foo, bytes(cs), offset=cs)
    assert allocated(foo) == (n - 1) * cs
    # A chunk made zero piece by piece (the last piece completes it).
    for off in range(0, cs, cs // 4):
        write_file(foo, bytes(cs // 4), offset=3 * cs + off)
    assert allocated(foo) == (n - 2) * cs
    # A partly zeroed chunk stays.
    write_file(foo, bytes(cs - 1), offset=5 * cs)
    assert allocated(foo) == (n - 2) * cs
    sync_pool(mount)
    assert st_blocks_bytes(foo, (n - 2) * cs) == (n - 2) * cs
    expect = bytearray(random.Random(4).randbytes(4 * MiB))
    expect[cs:2 * cs] = bytes(cs)
    expect[3 * cs:4 * cs] = bytes(cs)
    expect[5 * cs:6 * cs - 1] = bytes(cs - 1)
    assert read_file(foo) == expect


def test_unlink_frees_space_after_close(mount):
    foo = mount.path("FOO")
    write_file(foo, random.Random(5).randbytes(8 * MiB))
    sync_pool(mount)
    used_full = used_bytes(mount.mnt)
    os.unlink(foo)
    assert not os.path.exists(foo)
    assert sorted(os.listdir(mount.mnt)) == [".ctl", "ZZSYNC"]

    def dropped():
        sync_pool(mount)
        return used_full - used_bytes(mount.mnt) >= 7 * MiB
    wait_until(dropped, "df used to drop after rm", timeout=30, interval=0.2)


def test_an_open_vdisk_is_not_deleted_or_replaced(mount):
    """rm or mv onto a VDisk that is open (here by a process; a loop device holds it the
    same way) fails with EBUSY and changes nothing; once closed it goes."""
    foo, bar = mount.path("FOO"), mount.path("BAR")
    data = random.Random(6).randbytes(4 * MiB)
    write_file(bar, b"bar")
    fd = os.open(foo, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        with pytest.raises(OSError) as e:
            os.unlink(foo)
        assert e.value.errno == errno.EBUSY
        with pytest.raises(OSError) as e:
            os.rename(bar, foo)
        assert e.value.errno == errno.EBUSY
        assert sorted(os.listdir(mount.mnt)) == [".ctl", "BAR", "FOO"]
        assert os.pread(fd, len(data), 0) == data
        os.rename(foo, mount.path("MOVED"))          # an open VDisk may change its name
        assert os.pread(fd, 3, 0) == data[:3]
    finally:
        os.close(fd)
    os.unlink(mount.path("MOVED"))                   # closed: it may go (at once)
    assert sorted(os.listdir(mount.mnt)) == [".ctl", "BAR"]


def test_rename(mount):
    a, b, c = mount.path("A"), mount.path("B"), mount.path("C")
    da = random.Random(8).randbytes(MiB + 1)
    write_file(a, da)
    serial = os.getxattr(a, "user.vdisk.serial")
    os.rename(a, b)
    assert sorted(os.listdir(mount.mnt)) == [".ctl", "B"]
    assert read_file(b) == da
    assert os.getxattr(b, "user.vdisk.serial") == serial
    run(["mv", b, c])
    assert sorted(os.listdir(mount.mnt)) == [".ctl", "C"]
    assert read_file(c) == da
    os.rename(c, c)                                   # to itself: nothing happens
    assert read_file(c) == da
    with pytest.raises(FileNotFoundError):
        os.rename(a, b)


def test_rename_over_existing_vdisk(mount):
    a, b = mount.path("A"), mount.path("B")
    da = random.Random(9).randbytes(2 * MiB)
    db = random.Random(10).randbytes(6 * MiB)
    write_file(a, da)
    write_file(b, db)
    serial_a = os.getxattr(a, "user.vdisk.serial")
    sync_pool(mount)
    used_both = used_bytes(mount.mnt)
    os.rename(a, b)
    assert sorted(os.listdir(mount.mnt)) == [".ctl", "B", "ZZSYNC"]
    assert read_file(b) == da
    assert os.stat(b).st_size == len(da)
    assert os.getxattr(b, "user.vdisk.serial") == serial_a

    def dropped():
        sync_pool(mount)
        return used_both - used_bytes(mount.mnt) >= 5 * MiB
    wait_until(dropped, "the replaced VDisk's space to be freed", timeout=30, interval=0.2)
    mount.stop()
    mount.start()
    assert sorted(os.listdir(mount.mnt)) == [".ctl", "B", "ZZSYNC"]
    assert read_file(b) == da


def test_fsync_and_fdatasync_are_durable_across_kill9(mount):
    foo = mount.path("FOO")
    d1 = random.Random(11).randbytes(3 * MiB)
    d2 = random.Random(12).randbytes(MiB + 5)
    fd = os.open(foo, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, d1, 0)
        assert os.fsync(fd) is None
        os.pwrite(fd, d2, 10 * MiB)
        assert os.fdatasync(fd) is None
        os.ftruncate(fd, 20 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    mount.kill9()
    fsck_clean(mount.pool)          # the offline check sees a consistent pool before replay
    mount.start()
    assert os.stat(foo).st_size == 20 * MiB
    with open(foo, "rb") as f:
        assert f.read(len(d1)) == d1
        f.seek(10 * MiB)
        assert f.read(len(d2)) == d2
        f.seek(10 * MiB + len(d2))
        assert f.read() == bytes(10 * MiB - len(d2))
    mount.stop()
    fsck_clean(mount.pool)


# ================================================================ properties
def test_xattr_lba_size(mount):
    foo = mount.path("FOO")
    write_file(foo, b"x")
    assert os.getxattr(foo, "user.vdisk.lba_size") == b"512"
    os.setxattr(foo, "user.vdisk.lba_size", b"4096")
    assert os.getxattr(foo, "user.vdisk.lba_size") == b"4096"
    for bad in (b"1000", b"0", b"-512", b"abc", b"", b"8192"):
        with pytest.raises(OSError) as ei:
            os.setxattr(foo, "user.vdisk.lba_size", bad)
        assert ei.value.errno == errno.EINVAL, bad
    assert os.getxattr(foo, "user.vdisk.lba_size") == b"4096"
    os.setxattr(foo, "user.vdisk.lba_size", b"512")
    assert os.getxattr(foo, "user.vdisk.lba_size") == b"512"
    # Not while the VDisk is in use.
    fd = os.open(foo, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            os.setxattr(foo, "user.vdisk.lba_size", b"4096")
        assert ei.value.errno == errno.EBUSY
    finally:
        os.close(fd)
    assert os.getxattr(foo, "user.vdisk.lba_size") == b"512"
    out = run(["getfattr", "-d", "-m", "-", foo]).stdout
    for name in XATTRS:
        assert name in out, out


def test_xattr_serial_unique_and_read_only(mount):
    serials = set()
    for name in ("A", "B", "C"):
        write_file(mount.path(name), b"")
        serials.add(os.getxattr(mount.path(name), "user.vdisk.serial"))
    assert len(serials) == 3 and all(serials)
    # A new VDisk under an old name gets a new serial.
    old = os.getxattr(mount.path("A"), "user.vdisk.serial")
    os.unlink(mount.path("A"))
    write_file(mount.path("A"), b"")
    assert os.getxattr(mount.path("A"), "user.vdisk.serial") not in serials | {old}
    for name in ("user.vdisk.serial", "user.vdisk.allocated", "user.vdisk.unique",
                 "user.vdisk.shared"):
        with pytest.raises(OSError) as ei:
            os.setxattr(mount.path("B"), name, b"123")
        assert ei.value.errno == errno.EPERM, name
        with pytest.raises(OSError) as ei:
            os.removexattr(mount.path("B"), name)
        assert ei.value.errno == errno.EPERM, name
    assert set(os.listxattr(mount.path("B"))) >= set(XATTRS)
    with pytest.raises(OSError) as ei:
        os.getxattr(mount.path("B"), "user.vdisk.nonexistent")
    assert ei.value.errno == errno.ENODATA
    with pytest.raises(OSError) as ei:
        os.setxattr(mount.path("B"), "user.other", b"1")
    assert ei.value.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)


def test_xattr_space_figures(mount):
    foo = mount.path("FOO")
    run(["truncate", "-s", "100M", foo])
    assert [int(os.getxattr(foo, f"user.vdisk.{k}")) for k in ("allocated", "unique", "shared")] \
        == [0, 0, 0]
    cs = chunk_size_of(foo)
    write_file(foo, b"\1" * 10, offset=0)                   # one chunk
    write_file(foo, b"\2" * (cs + 2), offset=50 * MiB - 1)  # straddles into three chunks
    figures = {k: int(os.getxattr(foo, f"user.vdisk.{k}"))
               for k in ("allocated", "unique", "shared")}
    assert figures == {"allocated": 4 * cs, "unique": 4 * cs, "shared": 0}


def test_statvfs_used_grows_with_data(mount):
    st0 = os.statvfs(mount.mnt)
    used0 = used_bytes(mount.mnt)
    assert st0.f_blocks > 0 and st0.f_frsize > 0
    write_file(mount.path("FOO"), random.Random(13).randbytes(16 * MiB))
    used1 = used_bytes(mount.mnt)
    assert used1 - used0 >= 16 * MiB, (used0, used1)
    assert used1 - used0 < 20 * MiB, (used0, used1)   # roughly the data, not the VDisk size
    run(["truncate", "-s", "100G", mount.path("THIN")])
    assert used_bytes(mount.mnt) - used1 < MiB
    # total is the backing filesystem's capacity.
    back = os.statvfs(mount.pool)
    assert st0.f_blocks * st0.f_frsize == back.f_blocks * back.f_frsize
    df = run(["df", "-B1", mount.mnt]).stdout.splitlines()
    assert len(df) == 2 and mount.pool in df[1], df


# ================================================================ randomised comparison
# (seed, chunk size): mostly the 64 KiB chunks whose boundaries the ops straddle; 4 KiB
# chunks make a map page (1024 entries) 4 MiB, so the far-apart regions span many pages.
CASES = [(11, "64K"), (22, "64K"), (33, "4K"), (44, "64K")]
OPS = 4000


def _compare(vfd: int, rfd: int, where: str) -> None:
    vsize, rsize = os.fstat(vfd).st_size, os.fstat(rfd).st_size
    assert vsize == rsize, f"{where}: size {vsize} != {rsize}"
    off = 0
    while off < rsize:
        n = min(4 * MiB, rsize - off)
        a, b = os.pread(vfd, n, off), os.pread(rfd, n, off)
        if a != b:
            i = next(i for i in range(len(a)) if i >= len(b) or a[i] != b[i])
            raise AssertionError(f"{where}: contents differ at byte {off + i} "
                                 f"(lengths {len(a)}/{len(b)})")
        off += n


def _nonzero_chunks(rfd: int, cs: int) -> int:
    size = os.fstat(rfd).st_size
    n = 0
    for off in range(0, size, cs):
        if os.pread(rfd, cs, off).count(0) != min(cs, size - off):
            n += 1
    return n


@pytest.mark.parametrize("seed,chunk", CASES, ids=[f"{s}-{c}" for s, c in CASES])
def test_random_ops_match_plain_file(new_mount, tmp_path, seed, chunk):
    new_mount.start("--chunk-size", chunk)
    rng = random.Random(seed)
    cs = int(chunk[:-1]) * KiB
    vpath = new_mount.path("RND")
    rpath = str(tmp_path / "reference")
    vfd = os.open(vpath, os.O_RDWR | os.O_CREAT, 0o600)
    assert os.fstat(vfd).st_blksize == cs
    rfd = os.open(rpath, os.O_RDWR | os.O_CREAT, 0o600)
    # Far-apart regions so that the file stays sparse; 64 MiB is where the second map page
    # of a 64 KiB-chunk pool starts.
    hot = [0, 3 * MiB - 7, 17 * MiB + 5 * cs, 40 * MiB - 1, 64 * MiB - 3]
    max_size = 72 * MiB
    counts: dict[str, int] = {}
    peak = 0

    def pick_off() -> int:
        if rng.random() < 0.3:                     # on or next to a chunk boundary
            base = rng.choice(hot) // cs * cs + rng.randrange(-3, 4) * cs
            return max(0, base + rng.choice((0, 0, -1, 1, -5, 7, cs // 2)))
        return max(0, rng.choice(hot) + rng.randrange(-400 * KiB, 400 * KiB))

    def pick_len() -> int:
        r = rng.random()
        if r < 0.5:
            return rng.randrange(1, 9 * KiB)
        if r < 0.8:
            return rng.randrange(cs - 10, cs + 10)
        return rng.randrange(1, 5 * cs)

    try:
        for i in range(1, OPS + 1):
            r = rng.random()
            if r < 0.40:
                kind = "write"
                off, n = pick_off(), pick_len()
                data = rng.randbytes(n)
                assert os.pwrite(vfd, data, off) == n
                os.pwrite(rfd, data, off)
            elif r < 0.55:
                kind = "zero"
                if rng.random() < 0.5:             # whole chunks, aligned
                    off = pick_off() // cs * cs
                    n = cs * rng.randrange(1, 4)
                else:
                    off, n = pick_off(), pick_len()
                assert os.pwrite(vfd, bytes(n), off) == n
                os.pwrite(rfd, bytes(n), off)
            elif r < 0.80:
                kind = "read"
                size = os.fstat(rfd).st_size
                off = rng.randrange(0, size + 200 * KiB) if rng.random() < 0.5 else pick_off()
                n = pick_len()
                got, want = os.pread(vfd, n, off), os.pread(rfd, n, off)
                assert got == want, f"seed {seed} op {i}: pread({n}, {off}) differs"
            elif r < 0.90:
                kind = "truncate"
                size = os.fstat(rfd).st_size
                if rng.random() < 0.5:
                    new = rng.randrange(size, max(size, max_size) + 1)
                else:
                    new = rng.randrange(0, size + 1) if rng.random() < 0.15 \
                        else max(0, size - rng.randrange(0, 3 * cs))
                os.ftruncate(vfd, new)
                os.ftruncate(rfd, new)
            elif r < 0.95:
                kind = "fsync"
                (os.fsync if rng.random() < 0.5 else os.fdatasync)(vfd)
            else:
                kind = "stat"
                assert os.fstat(vfd).st_size == os.fstat(rfd).st_size, f"op {i}"
            counts[kind] = counts.get(kind, 0) + 1
            peak = max(peak, os.fstat(rfd).st_size)
            if i % 250 == 0:
                _compare(vfd, rfd, f"seed {seed} after op {i}")
            if i == OPS // 3:                      # close and reopen
                os.close(vfd)
                vfd = -1
                vfd = os.open(vpath, os.O_RDWR)
                _compare(vfd, rfd, f"seed {seed} reopened")
            if i == 2 * OPS // 3:                  # full umount / remount
                os.close(vfd)
                vfd = -1
                new_mount.stop()
                fsck_clean(new_mount.pool)
                new_mount.start()
                vfd = os.open(vpath, os.O_RDWR)
                _compare(vfd, rfd, f"seed {seed} remounted")
        os.fsync(vfd)
        _compare(vfd, rfd, f"seed {seed} at the end")
        # Zero detection and shrinking leave exactly the chunks that hold data.
        assert allocated(vpath) == _nonzero_chunks(rfd, cs) * cs
    finally:
        if vfd >= 0:
            os.close(vfd)
        os.close(rfd)
    # The run covered what it is meant to: many writes and truncates, past the 64 MiB mark.
    assert counts.get("write", 0) > OPS // 4 and counts.get("truncate", 0) > OPS // 20, counts
    assert peak > 64 * MiB, peak
    new_mount.stop()
    fsck_clean(new_mount.pool)


# ================================================================ robustness
def test_mount_survives_bad_requests(mount):
    foo = mount.path("FOO")
    write_file(foo, b"precious")
    fd = os.open(foo, os.O_RDWR)
    try:
        with pytest.raises(OSError) as ei:
            os.ftruncate(fd, 2 ** 62)
        assert ei.value.errno in (errno.EFBIG, errno.EINVAL)
        with pytest.raises(OSError) as ei:
            os.truncate(foo, 2 ** 62)
        assert ei.value.errno in (errno.EFBIG, errno.EINVAL)
        with pytest.raises(OSError):
            os.ftruncate(fd, -1)
        assert os.fstat(fd).st_size == 8
        assert os.pread(fd, 100, 2 ** 60) == b""
    finally:
        os.close(fd)
    provocations = [
        lambda: os.open(mount.path("a" * 65), os.O_CREAT | os.O_RDWR),
        lambda: os.open(mount.path("a" * 255), os.O_CREAT | os.O_RDWR),
        lambda: os.open(mount.path(".x"), os.O_CREAT | os.O_RDWR),
        lambda: os.open(os.fsencode(mount.mnt) + b"/\xfe\xff", os.O_CREAT | os.O_RDWR),
        lambda: os.open(mount.path("MISSING"), os.O_RDONLY),
        lambda: os.open(mount.path(".ctl"), os.O_RDWR),
        lambda: os.open(mount.path(".ctl/x"), os.O_CREAT | os.O_RDWR),
        lambda: os.open(mount.path("FOO/x"), os.O_CREAT | os.O_RDWR),
        lambda: os.setxattr(foo, "user.vdisk.lba_size", b"1000"),
        lambda: os.setxattr(foo, "user.vdisk.lba_size", b"\xff\xfe"),
        lambda: os.setxattr(foo, "user.vdisk.lba_size", b"9" * 5000),
        lambda: os.setxattr(foo, "user.vdisk.serial", b"1"),
        lambda: os.setxattr(foo, "trusted.x", b"1"),
        lambda: os.setxattr(mount.mnt, "user.vdisk.lba_size", b"512"),
        lambda: os.getxattr(mount.mnt, "user.vdisk.serial"),
        lambda: os.getxattr(mount.path(".ctl"), "user.vdisk.serial"),
        lambda: os.removexattr(foo, "user.vdisk.lba_size"),
        lambda: os.rename(foo, mount.path("bad name")),
        lambda: os.rename(mount.path("MISSING"), mount.path("X")),
        lambda: os.unlink(mount.path("MISSING")),
        lambda: os.rmdir(mount.path("FOO")),
        lambda: os.rmdir(mount.path(".ctl")),
        lambda: os.mkdir(mount.path("D")),
        lambda: os.chmod(mount.mnt, 0o777),
        lambda: os.truncate(mount.path(".ctl"), 0),
        lambda: os.listdir(foo),
    ]
    for i, provoke in enumerate(provocations):
        with pytest.raises(OSError):
            provoke()
        assert is_mounted(mount.mnt), f"mount gone after provocation {i}"
    # Still answering, with nothing changed.
    assert sorted(os.listdir(mount.mnt)) == [".ctl", "FOO"]
    assert read_file(foo) == b"precious"
    assert os.getxattr(foo, "user.vdisk.lba_size") == b"512"
    write_file(mount.path("AFTER"), b"ok")
    assert read_file(mount.path("AFTER")) == b"ok"
    assert not process_gone(mount.pid)
    log = daemon_log(mount.pool)
    assert "unexpected error" not in log and "Traceback" not in log, log
    mount.stop()
    fsck_clean(mount.pool)


@pytest.mark.xfail(strict=False, reason="KNOWN LIMIT: a write past the 1 PiB VDisk limit is "
                   "accepted by the kernel's writeback cache, fails only at fsync (EFBIG), "
                   "and the mount may keep the bogus size the failed write made: on a quiet "
                   "machine it comes back about 1.5 s after the close, under load it did "
                   "not within 20 s")
def test_write_past_max_size_leaves_size_alone(mount):
    foo = mount.path("FOO")
    write_file(foo, b"precious")
    fd = os.open(foo, os.O_RDWR)
    try:
        failed = False
        try:
            os.pwrite(fd, b"xx", 2 ** 55)
            os.fsync(fd)
        except OSError as e:
            assert e.errno in (errno.EFBIG, errno.EINVAL)
            failed = True
        assert failed, "a write at 32 PiB succeeded"
    finally:
        os.close(fd)
    with open(foo, "rb") as f:
        assert f.read(8) == b"precious"
    # The daemon never accepted the write: the VDisk is still 8 bytes long.
    wait_until(lambda: os.stat(foo).st_size == 8, "the size to settle", timeout=20)
