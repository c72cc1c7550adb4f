"""Everything the suite mounts, attaches or starts, as context managers that undo it (also
after an error): vdiskfs mounts, the baselines' FUSE processes (our Python passthrough,
bindfs), loop devices and mounts of them; clones through a vdiskfs mount's .ctl; and the
sweep that undoes whatever a crash left under the work directory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from bench.common import BENCH, PY, ROOT, is_mounted, log, mount_table, retry, run, tail
from vdiskfs.cow import layout

VDISKFS = [PY, "-m", "vdiskfs"]
# The daemons run the tree the suite runs from, as the in-process imports do (run.py puts
# it first on sys.path), not whatever vdiskfs the interpreter has installed.
_pythonpath = os.environ.get("PYTHONPATH")
VDISKFS_ENV = {**os.environ,
               "PYTHONPATH": ROOT + (os.pathsep + _pythonpath if _pythonpath else "")}
DAEMON_WARNINGS: list[str] = []   # from the pools' daemon.log, reported in the JSON


# ============================================================== vdiskfs
class VdiskfsMount:
    """``vdiskfs mount`` as a context manager: .mount_s, .pid; .umount() (timed) may be
    called early. ``chunk_size`` goes to mounts that create their pool. Undone by vdiskfs
    umount, or if that fails fusermount3 -u -z and SIGTERM to the daemon this mount
    started."""

    def __init__(self, pool: str, mnt: str, *extra: str, chunk_size: int | None = None):
        self.pool, self.mnt, self.extra = pool, mnt, extra
        self.chunk_size = chunk_size
        self.pid = 0
        self.mount_s = 0.0

    def __enter__(self) -> "VdiskfsMount":
        os.makedirs(self.mnt, exist_ok=True)
        t = time.perf_counter()
        extra = list(self.extra)
        if self.chunk_size and not os.path.exists(os.path.join(self.pool, layout.HEADER)):
            extra += ["--chunk-size", str(self.chunk_size)]
        run(VDISKFS + ["mount", *extra, self.pool, self.mnt], timeout=300, env=VDISKFS_ENV)
        self.mount_s = time.perf_counter() - t
        with open(os.path.join(self.pool, layout.LOCK)) as f:
            self.pid = int(f.read().strip())
        return self

    def umount(self) -> float:
        if not self.pid:
            return 0.0
        pid, self.pid = self.pid, 0
        t = time.perf_counter()
        p = run(VDISKFS + ["umount", self.mnt], check=False, timeout=600, env=VDISKFS_ENV)
        dt = time.perf_counter() - t
        if p.returncode:
            log(f"warning: vdiskfs umount {self.mnt}: {p.stderr.strip()}; detaching")
            run(["fusermount3", "-u", "-z", self.mnt], check=False)
            stop_pid(pid)
        self._collect_log()
        return dt

    def _collect_log(self) -> None:
        """Keep the daemon's warnings and errors for the JSON (and the summary)."""
        try:
            with open(os.path.join(self.pool, layout.LOG), errors="replace") as f:
                lines = [ln.rstrip() for ln in f if " WARNING " in ln or " ERROR " in ln]
        except OSError:
            return
        name = os.path.basename(self.pool)
        for ln in lines:
            msg = f"{name}: {ln.split(' ', 3)[-1]}"
            if msg not in DAEMON_WARNINGS and len(DAEMON_WARNINGS) < 50:
                DAEMON_WARNINGS.append(msg)

    def __exit__(self, *exc) -> None:
        self.umount()


def stop_pid(pid: int, timeout: float = 30) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ============================================================== clones through .ctl
def ctl(mnt: str, cmd: str) -> None:
    with open(os.path.join(mnt, ".ctl", "clone"), "w") as f:
        f.write(cmd + "\n")


def clone_state(mnt: str, src: str, dst: str) -> str | None:
    with open(os.path.join(mnt, ".ctl", "status")) as f:
        rows = [r.split() for r in f.read().splitlines()[1:]]
    states = [r[2] for r in rows if r[:2] == [src, dst]]
    return states[-1] if states else None


def clone(mnt: str, src: str, dst: str, poll: float = 0.001, timeout: float = 600) -> float:
    """Seconds from writing the command to a Completed row."""
    t = time.perf_counter()
    ctl(mnt, f"{src} {dst}")
    while True:
        state = clone_state(mnt, src, dst)
        if state == "Completed":
            return time.perf_counter() - t
        if state is not None and not state.endswith("%"):
            raise RuntimeError(f"clone {src} -> {dst}: {state}")
        if time.perf_counter() - t > timeout:
            raise RuntimeError(f"clone {src} -> {dst} not done after {timeout} s")
        time.sleep(poll)


# ============================================================== baselines' FUSE processes
def _wait_mounted(mnt: str, proc: subprocess.Popen, what: str, logfile: str,
                  timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(mnt):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {tail(logfile)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not mount {mnt} in {timeout} s")
        time.sleep(0.02)


def _stop_fuse_proc(mnt: str, proc: subprocess.Popen) -> None:
    if is_mounted(mnt) and not retry(["fusermount3", "-u", mnt]):
        log(f"warning: {mnt} busy; lazy unmount")
        run(["fusermount3", "-u", "-z", mnt], check=False)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        log(f"warning: pid {proc.pid} still running after unmount; terminating it")
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start_fuse_proc(cmd: list[str], src: str, mnt: str, logfile: str,
                     **kw) -> subprocess.Popen:
    os.makedirs(src, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    with open(logfile, "ab") as lf:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                start_new_session=True, **kw)


@contextlib.contextmanager
def passthrough_mount(src: str, mnt: str, logfile: str):
    """bench/passthrough.py, the floor cost of Python + FUSE; it reports readiness on a
    pipe. Yields its pid."""
    r, w = os.pipe()
    proc = _start_fuse_proc([PY, os.path.join(BENCH, "passthrough.py"), src, mnt,
                             "--ready-fd", str(w)], src, mnt, logfile, pass_fds=(w,))
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            msg = f.read().decode(errors="replace")
        if msg != "ready":
            proc.wait(timeout=30)
            raise RuntimeError(f"passthrough failed: {tail(logfile)}")
        yield proc.pid
    finally:
        _stop_fuse_proc(mnt, proc)


@contextlib.contextmanager
def bindfs_mount(src: str, mnt: str, logfile: str):
    """bindfs in the foreground (so the process is ours), with big_writes if it takes it.
    Yields the command line used."""
    proc = None
    for opts in (["-o", "big_writes"], []):
        proc = _start_fuse_proc(["bindfs", "-f", *opts, src, mnt], src, mnt, logfile)
        try:
            _wait_mounted(mnt, proc, "bindfs", logfile)
            break
        except RuntimeError as e:
            _stop_fuse_proc(mnt, proc)
            if not opts:
                raise
            log(f"bindfs -o big_writes refused ({e}); mounting without it")
    try:
        yield " ".join(["bindfs", *opts])
    finally:
        _stop_fuse_proc(mnt, proc)


# ============================================================== loop devices
@contextlib.contextmanager
def loop_device(image: str, direct_io: bool = False):
    """A loop device on ``image``; with ``direct_io`` attached with --direct-io=on (what
    a VM manager does; losetup falls back to buffered if the backing file refuses it:
    loop_dio() says what it got)."""
    cmd = ["losetup", "-f", "--show"] + (["--direct-io=on"] if direct_io else [])
    dev = run(cmd + [image]).stdout.strip().splitlines()[-1].strip()
    try:
        yield dev
    finally:
        if not retry(["losetup", "-d", dev]):
            log(f"warning: could not detach {dev}")


def loop_dio(dev: str) -> bool | None:
    """Whether loop device ``dev`` does direct I/O to its backing file."""
    try:
        with open(f"/sys/block/{os.path.basename(dev)}/loop/dio") as f:
            return f.read().strip() == "1"
    except OSError:
        return None


@contextlib.contextmanager
def mounted(dev: str, mnt: str, *opts: str):
    os.makedirs(mnt, exist_ok=True)
    run(["mount", *opts, dev, mnt])
    try:
        yield mnt
    finally:
        if not retry(["umount", mnt]):
            log(f"warning: {mnt} busy; lazy unmount")
            run(["umount", "-l", mnt], check=False)


@contextlib.contextmanager
def loop_mount(image: str, mnt: str):
    with loop_device(image) as dev, mounted(dev, mnt):
        yield mnt


# ============================================================== cleanup safety net
def sweep(workdir: str) -> list[str]:
    """Undo whatever is still mounted or attached under the work dir (after a crash of the
    context managers): lazy unmounts and loop detaches, innermost first."""
    left = []
    for _, mp, typ in reversed(mount_table()):
        if mp == workdir or mp.startswith(workdir + "/"):
            left.append(f"mount {mp} ({typ})")
            lazy = ["fusermount3", "-u", "-z"] if typ.startswith("fuse") else ["umount", "-l"]
            run(lazy + [mp], check=False)
    p = run(["losetup", "-a", "-O", "NAME,BACK-FILE", "-n", "-l"], check=False)
    for line in p.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(workdir + "/"):
            left.append(f"loop {parts[0]} on {parts[1].strip()}")
            run(["losetup", "-d", parts[0]], check=False)
    return left
