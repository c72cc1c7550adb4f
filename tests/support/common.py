"""Helpers every layer of the tests shares: running commands and ``vdiskfs`` as users run
it, reading and writing files, a vdiskfs daemon serving a pool (``Mount``), the loop mounts
and loop devices a test makes (``KernelMounts``), and checks of a pool on disk.

The fixtures that hand these out (and clean up after them) are in ../conftest.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import subprocess
import sys
import time

VDISKFS = [sys.executable, "-m", "vdiskfs"]


def run(cmd: list[str], *, check: bool = True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 300)
    proc = subprocess.run(cmd, **kw)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def vdiskfs(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return run(VDISKFS + list(args), check=check, **kw)


def write_file(path: str, data: bytes, offset: int = 0, *, fsync: bool = True) -> None:
    """pwrite ``data`` at ``offset`` (creating the file 0600), fsync unless told not to."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, offset)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: str | bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def sha256_file(path: str) -> str:
    """The sha256 of a file's contents, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def journal_frames(pool: str) -> list[tuple[int, int]]:
    """(start, end) of every intact frame of POOL/journal."""
    from vdiskfs.cow import codec, layout
    with open(os.path.join(pool, layout.JOURNAL), "rb") as f:
        data = f.read()
    out, start = [], 0
    for _payload, end in codec.iter_frames(data):
        out.append((start, end))
        start = end
    return out


def is_mounted(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == path for line in f)


def fsck_clean(pool: str) -> str:
    proc = vdiskfs("fsck", pool, check=False)
    assert proc.returncode == 0, f"fsck of {pool} failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def daemon_log(pool: str, tail: int | None = None, *, must_exist: bool = False) -> str:
    """POOL/daemon.log (only its last ``tail`` lines if given); "(no daemon.log)" if there
    is none, unless ``must_exist`` (then FileNotFoundError)."""
    try:
        with open(os.path.join(pool, "daemon.log"), errors="replace") as f:
            return f.read() if tail is None else "".join(f.readlines()[-tail:])
    except FileNotFoundError:
        if must_exist:
            raise
        return "(no daemon.log)"


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A refused command: non-zero exit, one line on stderr (mentioning ``needles``), no
    traceback; returns that line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"{proc.args}: expected failure, got 0:\n{out}"
    assert "Traceback" not in out, out
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"{proc.args}: expected one line on stderr, got:\n{proc.stderr}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def wait_until(pred, what: str, timeout: float = 30.0, interval: float = 0.05):
    """Poll ``pred`` until it returns something truthy, and return that (a bounded wait,
    not a timing assertion: the condition must hold eventually, however slow the machine)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_PUNCH = 0x03          # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: a discard
FALLOC_ZERO_KEEP = 0x11      # FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE: write-zeroes


def fallocate(fd: int, mode: int, off: int, n: int) -> None:
    """fallocate(2) (Python has only posix_fallocate, mode 0)."""
    if _libc.fallocate(fd, mode, off, n) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate(mode={mode:#x}, {off}, {n}): {os.strerror(e)}")


def fsync_path(path: str) -> None:
    """fsync a file by path (on a VDisk: commits the whole pool)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def allocated(path: str) -> int:
    """The VDisk's user.vdisk.allocated (bytes of chunks it maps)."""
    return int(os.getxattr(path, "user.vdisk.allocated"))


def used_bytes(mnt: str) -> int:
    """Used bytes of the filesystem at ``mnt`` as statvfs reports them."""
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def loop_devices_of(image: str) -> list[str]:
    """The loop devices attached to ``image`` (losetup -j)."""
    out = run(["losetup", "-j", image], check=False).stdout
    return [line.split(":")[0] for line in out.splitlines() if line.strip()]


class Mount:
    """A vdiskfs daemon serving ``pool`` at ``mnt``, started as users start it."""

    def __init__(self, pool: str, mnt: str):
        self.pool = pool
        self.mnt = mnt
        self.pid: int | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.mnt, name)

    def start(self, *extra: str) -> "Mount":
        os.makedirs(self.mnt, exist_ok=True)
        vdiskfs("mount", self.pool, self.mnt, *extra, timeout=60)
        with open(os.path.join(self.pool, "lock")) as f:
            self.pid = int(f.read().strip())
        return self

    def stop(self) -> None:
        vdiskfs("umount", self.mnt, "--timeout", "120", timeout=180)
        self.pid = None

    def kill9(self) -> None:
        """Crash the daemon (kill -9) and clear the dead mount."""
        assert self.pid
        os.kill(self.pid, signal.SIGKILL)
        _wait_gone(self.pid)
        self.pid = None
        if is_mounted(self.mnt):
            run(["umount", "-l", self.mnt], check=False)

    def cleanup(self) -> None:
        if self.pid is not None and is_mounted(self.mnt):
            proc = vdiskfs("umount", self.mnt, "--timeout", "60", check=False, timeout=90)
            if proc.returncode == 0:
                self.pid = None
        if is_mounted(self.mnt):
            run(["umount", "-l", self.mnt], check=False)
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                _wait_gone(self.pid)
            except ProcessLookupError:
                pass
            self.pid = None


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A zombie child of ours? (daemons are detached, so normally not.)
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.02)


class KernelMounts:
    """Loop mounts and loop devices a test made; undone in reverse order at teardown."""

    def __init__(self):
        self.mounts: list[str] = []
        self.loops: list[str] = []

    def loop_mount(self, image: str, target: str, *opts: str) -> str:
        os.makedirs(target, exist_ok=True)
        o = ",".join(("loop",) + opts)
        run(["mount", "-o", o, image, target])
        self.mounts.append(target)
        return target

    def umount(self, target: str) -> None:
        run(["umount", target])
        self.mounts.remove(target)

    def attach(self, image: str) -> str:
        dev = run(["losetup", "-f", "--show", image]).stdout.strip()
        self.loops.append(dev)
        return dev

    def detach(self, dev: str) -> None:
        run(["losetup", "-d", dev])
        self.loops.remove(dev)

    def cleanup(self) -> None:
        for target in reversed(self.mounts):
            if run(["umount", target], check=False).returncode:
                run(["umount", "-l", target], check=False)
        self.mounts.clear()
        for dev in reversed(self.loops):
            run(["losetup", "-d", dev], check=False)
        self.loops.clear()


def flip_byte(path: str, offset: int, mask: int = 0x10) -> None:
    """XOR one byte of a file in place (twice restores it)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))
