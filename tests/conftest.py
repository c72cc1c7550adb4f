"""Shared fixtures: pools, real vdiskfs mounts in subprocesses, loop devices.

Every fixture cleans up what it made: it unmounts (lazily if it must), detaches the loop
devices it attached and kills only the daemon it started. Every pool a test leaves behind
is checked with ``vdiskfs fsck`` at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

VDISKFS = [sys.executable, "-m", "vdiskfs"]


def _missing_fuse() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not shutil.which("fusermount3"):
        return "fusermount3 is not installed"
    if os.geteuid() != 0:
        return "tests with mounts run as root"
    return None


def _missing_loop() -> str | None:
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is missing (no loop devices)"
    for tool in ("losetup", "mkfs.ext4", "e2fsck"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    return None


def _skip_or_fail(reason: str) -> None:
    msg = f"SKIPPING: this machine cannot run the test: {reason}"
    if os.environ.get("CI"):
        pytest.fail(f"{msg} (CI machines have FUSE and loop devices: this is a failure)")
    sys.stderr.write(f"\n*** {msg} ***\n")
    pytest.skip(msg)


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


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


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


# ---------------------------------------------------------------------------- markers
# A test that mounts must say so: whatever requests need_fuse (directly, or through mount,
# new_mount, need_loop or a fixture of its own module) carries the ``mount`` marker, and
# whatever requests need_loop the ``loop`` marker too, so that
# ``pytest -m "not mount and not loop"`` (make test-fast) runs no mount at all. A test
# without the marker fails in its setup, before any of its fixtures has run.
MARKER_OF = {"need_fuse": "mount", "need_loop": "loop"}


def _require_marker(item: pytest.Item, fixture: str) -> None:
    mark = MARKER_OF[fixture]
    if item.get_closest_marker(mark) is None:
        pytest.fail(f"{item.nodeid} uses the {fixture} fixture (directly or through another "
                    f"fixture) but has no @pytest.mark.{mark}: mark it (a decorator, or "
                    f"pytestmark for the module) so that -m \"not mount and not loop\" "
                    f"deselects it", pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Refuse to set up a test whose fixture closure holds need_fuse/need_loop without the
    matching marker (runs before the test's fixtures are set up)."""
    for fixture in MARKER_OF:
        if fixture in getattr(item, "fixturenames", ()):
            _require_marker(item, fixture)


@pytest.fixture
def need_fuse(request):
    _require_marker(request.node, "need_fuse")    # also for request.getfixturevalue()
    reason = _missing_fuse()
    if reason:
        _skip_or_fail(reason)


@pytest.fixture
def need_loop(request, need_fuse):
    _require_marker(request.node, "need_loop")
    reason = _missing_loop()
    if reason:
        _skip_or_fail(reason)


@pytest.fixture
def pool(path):
    """An open engine Pool (no FUSE) on the test module's ``path`` fixture (its geometry)."""
    from vdiskfs.cow.pool import Pool
    p = Pool(path)
    yield p
    if p._lock_fd >= 0:
        p.close(commit=False)


@pytest.fixture
def pool_dir(tmp_path):
    """A pool directory; fsck'd at teardown if the test made a pool there."""
    path = str(tmp_path / "pool")
    yield path
    if os.path.exists(os.path.join(path, "vdiskfs-pool")) and not _locked(path):
        fsck_clean(path)


def _locked(pool: str) -> bool:
    import fcntl
    fd = os.open(os.path.join(pool, "lock"), os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@pytest.fixture
def kmounts():
    km = KernelMounts()
    yield km
    km.cleanup()


@pytest.fixture
def mount(need_fuse, pool_dir, tmp_path, kmounts):
    """A started vdiskfs mount of a new pool with the default options."""
    m = Mount(pool_dir, str(tmp_path / "mnt"))
    m.start()
    yield m
    kmounts.cleanup()      # loop mounts on top of the VDisks go first
    m.cleanup()


@pytest.fixture
def new_mount(need_fuse, pool_dir, tmp_path, kmounts):
    """A Mount not yet started (for tests that choose options or restart it)."""
    m = Mount(pool_dir, str(tmp_path / "mnt"))
    yield m
    kmounts.cleanup()
    m.cleanup()
