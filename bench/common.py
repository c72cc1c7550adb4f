"""What every part of the benchmark suite shares: paths and sizes, the configuration, the
figures and the results they go into, and the helpers to run commands, time, sync, drop
caches, read the mount table and make random data."""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from bench.report import evaluate_checks

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PY = sys.executable
RESULTS = os.path.join(BENCH, "results")
_libc = ctypes.CDLL(None, use_errno=True)


# ============================================================== configuration
@dataclass
class Config:
    quick: bool = False
    reps: int = 3
    seq_bytes: int = 1 * GiB
    fio_runtime: int = 5
    fio_bytes: int = 256 * MiB
    ext4_image: int = 1 * GiB
    ext4_big: tuple = (50, 4 * MiB)
    ext4_small: tuple = (1000, 4 * KiB)
    fresh_bytes: int = 1 * GiB
    clone_gib: tuple = (1, 16, 64)
    big_vdisks: int = 16
    big_vdisk_size: int = 64 * GiB
    big_mapped: int = 4 * GiB
    writer_seconds: float = 5.0
    chunk_size: int | None = None      # None: the pool default
    qd_bytes: int = 1 * GiB            # the qd and cache sections' file (4 files in qdjobs)
    lat_seconds: float = 3.0           # lat: writer seconds before/after the checkpoint
    busy: bool = False                 # --busy: a CPU hog during the 4K rows
    notes: list = field(default_factory=list)

    @classmethod
    def make(cls, quick: bool, reps: int | None) -> "Config":
        c = cls(quick=quick)
        if quick:
            c.reps = 1
            c.seq_bytes = 256 * MiB
            c.fio_runtime = 3
            c.ext4_big, c.ext4_small = (25, 4 * MiB), (500, 4 * KiB)
            c.fresh_bytes = 512 * MiB
            c.writer_seconds = 3.0
            c.notes.append("quick: 1 rep, 256 MiB sequential, 3 s fio runs (qd, cache: "
                           "1 GiB files as in the full run), ext4 with "
                           "25 x 4 MiB + 500 x 4 KiB files, 512 MiB fresh-clone VDisk, "
                           "3 s writer; clone and mount sizes as in the full run")
        if reps:
            c.reps = reps
        return c


# ============================================================== figures and results
# id -> (section, label, unit, higher is better); the JSON and the table keep this order.
# The targets checked against them are report.CHECKS.
FIGURES = {
    "seq_write_1m": ("seq", "seq write, 1 MiB writes", "MiB/s", True),
    "seq_write_128k": ("seq", "seq write, 128 KiB writes", "MiB/s", True),
    "seq_read": ("seq", "seq read, cold", "MiB/s", True),
    "seq_read_first": ("seq", "seq read, first after writing", "MiB/s", True),
    "fio_randwrite_direct": ("fio", "4K randwrite O_DIRECT", "IOPS", True),
    "fio_randread_direct": ("fio", "4K randread O_DIRECT", "IOPS", True),
    "fio_randwrite_buffered": ("fio", "4K randwrite buffered", "IOPS", True),
    "fio_randread_buffered": ("fio", "4K randread buffered", "IOPS", True),
    "qd_randread_d1": ("qd", "4K randread O_DIRECT libaio qd1", "IOPS", True),
    "qd_randread_d4": ("qd", "4K randread O_DIRECT libaio qd4", "IOPS", True),
    "qd_randread_d16": ("qd", "4K randread O_DIRECT libaio qd16", "IOPS", True),
    "qd_scaling_randread": ("qd", "4K randread scaling qd16/qd1", "x", True),
    "qd_randwrite_d1": ("qd", "4K randwrite O_DIRECT libaio qd1", "IOPS", True),
    "qd_randwrite_d4": ("qd", "4K randwrite O_DIRECT libaio qd4", "IOPS", True),
    "qd_randwrite_d16": ("qd", "4K randwrite O_DIRECT libaio qd16", "IOPS", True),
    "qd_scaling_randwrite": ("qd", "4K randwrite scaling qd16/qd1", "x", True),
    "qd_cpu_randread_d1": ("qd", "daemon CPU per 4K randread, qd1", "us", False),
    "qd_cpu_randread_d16": ("qd", "daemon CPU per 4K randread, qd16", "us", False),
    "qd_cpu_randwrite_d1": ("qd", "daemon CPU per 4K randwrite, qd1", "us", False),
    "qd_cpu_randwrite_d16": ("qd", "daemon CPU per 4K randwrite, qd16", "us", False),
    "qdext4_randread_d1": ("qd", "ext4/loop-dio: 4K randread O_DIRECT libaio qd1", "IOPS", True),
    "qdext4_randread_d4": ("qd", "ext4/loop-dio: 4K randread O_DIRECT libaio qd4", "IOPS", True),
    "qdext4_randread_d16": ("qd", "ext4/loop-dio: 4K randread O_DIRECT libaio qd16", "IOPS", True),
    "qdext4_scaling_randread": ("qd", "ext4/loop-dio: 4K randread scaling qd16/qd1", "x", True),
    "qdext4_randwrite_d1": ("qd", "ext4/loop-dio: 4K randwrite O_DIRECT libaio qd1", "IOPS", True),
    "qdext4_randwrite_d4": ("qd", "ext4/loop-dio: 4K randwrite O_DIRECT libaio qd4", "IOPS", True),
    "qdext4_randwrite_d16": ("qd", "ext4/loop-dio: 4K randwrite O_DIRECT libaio qd16", "IOPS", True),
    "qdext4_scaling_randwrite": ("qd", "ext4/loop-dio: 4K randwrite scaling qd16/qd1", "x", True),
    "qdjobs_randread": ("qd", "4 jobs x 4 VDisks: 4K randread qd4 each", "IOPS", True),
    "qdjobs_randwrite": ("qd", "4 jobs x 4 VDisks: 4K randwrite qd4 each", "IOPS", True),
    "cache_randread_warm": ("cache", "4K randread buffered, warm", "IOPS", True),
    "cache_randread_miss": ("cache", "4K randread buffered, cold misses", "IOPS", True),
    "ext4_mkfs": ("ext4", "ext4 mkfs (eager init)", "s", False),
    "ext4_write": ("ext4", "ext4 write files + syncfs", "s", False),
    "ext4_read": ("ext4", "ext4 cold read back", "s", False),
    "ext4_total": ("ext4", "ext4 write + read", "s", False),
    "fresh_seq_write": ("fresh", "fresh clone: seq overwrite", "MiB/s", True),
    "fresh_seq_read": ("fresh", "fresh clone: seq read, cold", "MiB/s", True),
    "fresh_fio_randwrite_direct": ("fresh", "fresh clone: fio 4K randwrite O_DIRECT", "IOPS",
                                   True),
    "fresh_fio_randwrite_buffered": ("fresh", "fresh clone: fio 4K randwrite buffered", "IOPS",
                                     True),
    "fresh_randwrite_direct": ("fresh", "fresh clone: 1st 4K write/chunk O_DIRECT", "IOPS",
                               True),
    "fresh_randwrite_buffered": ("fresh", "fresh clone: 1st 4K write/chunk buffered", "IOPS",
                                 True),
    "fresh_ext4_rewrite": ("fresh", "fresh clone: ext4 rewrite + syncfs", "s", False),
    "clone_1g": ("clone", "clone 1 GiB of data", "ms", False),
    "clone_16g": ("clone", "clone 16 GiB mapped", "ms", False),
    "clone_64g": ("clone", "clone 64 GiB mapped", "ms", False),
    "clone2_1g": ("clone", "clone of a clone, 1 GiB", "ms", False),
    "clone2_16g": ("clone", "clone of a clone, 16 GiB", "ms", False),
    "clone2_64g": ("clone", "clone of a clone, 64 GiB", "ms", False),
    "clone_meta_journal_1g": ("clone", "metadata/clone 1 GiB, journal", "B", False),
    "clone_meta_journal_16g": ("clone", "metadata/clone 16 GiB, journal", "B", False),
    "clone_meta_journal_64g": ("clone", "metadata/clone 64 GiB, journal", "B", False),
    "clone_meta_ckpt_1g": ("clone", "metadata/clone 1 GiB, checkpointed", "B", False),
    "clone_meta_ckpt_16g": ("clone", "metadata/clone 16 GiB, checkpointed", "B", False),
    "clone_meta_ckpt_64g": ("clone", "metadata/clone 64 GiB, checkpointed", "B", False),
    "mount_time": ("mount", "mount, 1 TiB space / 64 GiB mapped", "s", False),
    "mount_rss": ("mount", "daemon RSS after mount", "MiB", False),
    "mount_rss_used": ("mount", "daemon RSS after ls -l, status, reads", "MiB", False),
    "mount_meta": ("mount", "metadata on disk (checkpoint+journal)", "MiB", False),
    "umount_time": ("mount", "umount (checkpoint) time", "s", False),
    "lat_ckpt_max": ("lat", "4K O_DIRECT write max, journal checkpoint", "ms", False),
    "lat_ckpt_p99": ("lat", "4K O_DIRECT write p99, journal checkpoint", "ms", False),
    "lat_ckpt_time": ("lat", "journal-size checkpoint (fsync) time", "s", False),
    "lat_umount_max": ("lat", "4K O_DIRECT write max, umount checkpoint", "ms", False),
    "lat_umount_p99": ("lat", "4K O_DIRECT write p99, umount checkpoint", "ms", False),
    "writer": ("writer", "O_DIRECT writer while cloning", "MiB/s", True),
    "writer_clones": ("writer", "clones done while writing", "n", True),
    "scrub": ("scrub", "scrub, cold (vs cat through the mount)", "MiB/s", True),
    "nbd_copy_out": ("nbd", "NBD: nbdcopy 1 GiB out (vs dd of the file)", "MiB/s", True),
    "nbd_copy_in": ("nbd", "NBD: nbdcopy 1 GiB in (vs dd of the file)", "MiB/s", True),
    "nbd_randread_d1": ("nbd", "NBD: 4K randread qd1 (vs the file, O_DIRECT)", "IOPS", True),
    "nbd_randread_d16": ("nbd", "NBD: 4K randread qd16 (vs the file)", "IOPS", True),
    "nbd_randwrite_d1": ("nbd", "NBD: 4K randwrite qd1 (vs the file, O_DIRECT)", "IOPS", True),
    "nbd_randwrite_d16": ("nbd", "NBD: 4K randwrite qd16 (vs the file)", "IOPS", True),
    "thin_fstrim": ("thin", "fstrim of a deleted file in an ext4 guest", "s", False),
    "thin_fstrim_returned": ("thin", "space fstrim gave back", "%", True),
    "thin_mkfs_100g": ("thin", "mkfs.ext4 of 100 GiB (defaults)", "s", False),
    "thin_mkfs_100g_alloc": ("thin", "space held after mkfs.ext4 of 100 GiB", "MiB", False),
    "thin_cp_sparse_256m": ("thin", "cp --sparse=auto, 64 GiB holding 256 MiB", "s", False),
    "thin_cp_sparse_1g": ("thin", "cp --sparse=auto, 64 GiB holding 1 GiB", "s", False),
}


class Results:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.values: dict[str, dict[str, list]] = {}
        self.na: dict[str, dict[str, str]] = {}
        self.notes: dict[str, list[str]] = {}
        self.errors: dict[str, str] = {}
        self.section_seconds: dict[str, float] = {}
        self.info: dict = {}

    def add(self, fid: str, target: str, value: float) -> None:
        assert fid in FIGURES, fid
        self.values.setdefault(fid, {}).setdefault(target, []).append(value)

    def set_na(self, fid: str, target: str, why: str) -> None:
        self.na.setdefault(fid, {})[target] = why

    def note(self, fid: str, text: str) -> None:
        if text not in self.notes.setdefault(fid, []):
            self.notes[fid].append(text)

    def to_json(self) -> dict:
        figs = {}
        for fid, (section, label, unit, higher) in FIGURES.items():
            if fid not in self.values and fid not in self.na:
                continue
            vals = {}
            for t, s in self.values.get(fid, {}).items():
                vals[t] = {"median": statistics.median(s), "min": min(s), "max": max(s),
                           "samples": s}
            for t, why in self.na.get(fid, {}).items():
                vals.setdefault(t, {"na": why})
            figs[fid] = {"section": section, "label": label, "unit": unit,
                         "higher_is_better": higher, "values": vals,
                         "notes": self.notes.get(fid, [])}
        return {"figures": figs, "checks": evaluate_checks(figs, bool(self.info.get("busy"))),
                "errors": self.errors, "section_seconds": self.section_seconds,
                "info": self.info}


# ============================================================== commands and timing
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], check: bool = True, timeout: float | None = 600,
        **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): "
                           f"{(p.stderr or p.stdout).strip()[-500:]}")
    return p


def timed_run(cmd: list[str]) -> float:
    t = time.perf_counter()
    run(cmd)
    return time.perf_counter() - t


def retry(cmd: list[str], tries: int = 50, pause: float = 0.1) -> bool:
    """Run ``cmd`` until it succeeds (an unmount or detach of something still busy)."""
    for _ in range(tries):
        if run(cmd, check=False).returncode == 0:
            return True
        time.sleep(pause)
    return False


def tail(path: str, n: int = 800) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:].strip()
    except OSError:
        return ""


def tool_version(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr) else "?"


def loadavg() -> list[float]:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


@contextlib.contextmanager
def cpu_hog(res: "Results"):
    """A plain CPU hog (a Python busy loop, one core) that we start and kill by its pid."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    res.info.setdefault("busy_hog_pids", []).append(proc.pid)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


# ============================================================== syncing and caches
WORKDIR = ""   # set by run.py: only file systems under it are synced


def drop_caches() -> None:
    """syncfs our own file systems (innermost first: loop-mounted ext4, FUSE mounts, the
    backing fs), then drop the page cache. Not sync(2): another user's stuck FUSE mount
    would hang it."""
    if WORKDIR:
        for _, mp, _ in reversed(mount_table()):
            if mp.startswith(WORKDIR + "/"):
                with contextlib.suppress(OSError):
                    syncfs(mp)
        syncfs(WORKDIR)
    else:
        os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """On vdiskfs: a commit (fsyncdir), so unlinked VDisks' chunks are freed before the
    next measurement. Other file systems may not implement it: ignored."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def fsync_path(path: str) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


# ============================================================== data
class RandomData:
    """64 MiB of random bytes, handed out cyclically (random, so never zero chunks)."""

    def __init__(self, size: int = 64 * MiB):
        self.size = size
        self.buf = memoryview(os.urandom(size))

    def piece(self, off: int, n: int) -> memoryview:
        o = off % self.size
        if o + n <= self.size:
            return self.buf[o:o + n]
        return memoryview(bytes(self.buf[o:]) + bytes(self.buf[:n - (self.size - o)]))

    def write_file(self, path: str, nbytes: int, bs: int, *, create: bool = True,
                   fsync: bool = True, trunc: bool = True) -> float:
        """Write ``nbytes`` sequentially in ``bs`` writes; seconds including the fsync."""
        flags = os.O_WRONLY | (os.O_CREAT if create else 0) | (os.O_TRUNC if trunc else 0)
        t = time.perf_counter()
        fd = os.open(path, flags, 0o600)
        try:
            self.write_fd(fd, nbytes, bs)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return time.perf_counter() - t

    def write_fd(self, fd: int, nbytes: int, bs: int, start: int = 0) -> None:
        """Write ``nbytes`` to ``fd`` in ``bs`` writes: the bytes from ``start`` on."""
        done = 0
        while done < nbytes:
            n = min(bs, nbytes - done)
            done += os.write(fd, self.piece(start + done, n))


def read_file(path: str, bs: int = MiB) -> tuple[float, int]:
    buf = bytearray(bs)
    total = 0
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            n = os.readv(fd, [buf])
            if not n:
                break
            total += n
    finally:
        os.close(fd)
    return time.perf_counter() - t, total


def settle(path: str) -> None:
    """One untimed cold read. On this VM the first read of freshly allocated blocks is
    several times slower than any later read, whatever the file system (a native file too:
    ~570 vs ~2900 MiB/s), which would swamp what is measured; cold reads are timed after
    this settling read, with the guest's caches dropped again."""
    drop_caches()
    read_file(path)


# ============================================================== what the system says
def meta_bytes(pool: str) -> int:
    return sum(os.path.getsize(os.path.join(pool, f)) for f in ("checkpoint", "journal"))


def rss_mib(pid: int) -> tuple[float, float]:
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def mount_table() -> list[tuple[str, str, str]]:
    """(device major:minor, mount point, fs type) per line of /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            a, _, b = line.partition(" - ")
            fields, rest = a.split(), b.split()
            mp = fields[4].encode().decode("unicode_escape")
            out.append((fields[2], mp, rest[0]))
    return out


def is_mounted(mnt: str) -> bool:
    return any(mp == mnt for _, mp, _ in mount_table())


def read_ahead_kb(mountpoint: str) -> int | None:
    for dev, mp, _ in reversed(mount_table()):
        if mp == mountpoint:
            try:
                with open(f"/sys/class/bdi/{dev}/read_ahead_kb") as f:
                    return int(f.read())
            except OSError:
                return None
    return None


def disk_read_ahead(path: str) -> int | None:
    """Read-ahead of the block device holding ``path``."""
    try:
        dev = os.stat(path).st_dev
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue/read_ahead_kb") as f:
            return int(f.read())
    except OSError:
        return None


def fs_type(path: str) -> str:
    path = os.path.realpath(path)
    best = ("", "?")
    for _, mp, typ in mount_table():
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best[0]):
            best = (mp, typ)
    return best[1]
