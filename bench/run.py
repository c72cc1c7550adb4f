"""vdiskfs benchmark suite: vdiskfs against baselines measured in the same run.

Run as root (``make bench`` / ``make bench-quick`` install bindfs, fio, xfsprogs and
qemu-utils first, then call this):

    .venv/bin/python bench/run.py [--quick] [--reps N] [--only seq,fio,...] [--dir /var/tmp]
    .venv/bin/python bench/run.py --show bench/results/latest.json [--compare OLD.json]

Sections (``--only`` takes these names):

  seq     1 GiB (quick: 256 MiB) sequential write to a new file, 1 MiB and 128 KiB writes,
          fsync at the end; cold sequential read (caches dropped; timed on the second
          read after writing, since on this VM the first read of freshly allocated blocks
          is slow for any file system: that one is shown too): native file, bindfs, our
          Python passthrough (bench/passthrough.py: the floor cost of Python + FUSE), vdiskfs
  fio     fio 4 KiB random write/read, psync, iodepth 1, direct=1 and direct=0, 5 s runs
          (quick: 3 s) on a 256 MiB file of random data, caches dropped before each run;
          write IOPS count an fsync of the file after fio (the cost of writing back);
          a target refusing O_DIRECT is recorded as n/a
  ext4    ext4 on a loop device on a 1 GiB image file (mkfs.ext4 with eager init): write
          50 x 4 MiB + 1000 x 4 KiB files + syncfs, drop caches, read them all back
  fresh   vdiskfs only: the same on a freshly cloned VDisk (its first writes copy on
          write): seq overwrite + cold read, fio random 4 KiB writes (as many as the VDisk
          has chunks), ext4 rewriting its files in place; against an unshared VDisk
  clone   time from the clone command to Completed for 1 GiB (random data), 16 GiB and
          64 GiB mapped (engine-built: every chunk mapped, sparse data file, see
          build_pool); clone of a clone; metadata bytes per clone (journal growth, and
          growth of the checkpointed state after umount/mount); baselines: cp
          --reflink=always on XFS (a 1 GiB file written sequentially; the same with one
          4 KiB block per 256 KiB, and 16 GiB so: as many extents as vdiskfs has chunks),
          cp --sparse=always, qemu-img create -f qcow2 -b SRC -F raw
  mount   mount time, daemon RSS (VmRSS of the pid in POOL/lock) and metadata size of a
          pool of 16 VDisks x 64 GiB (1 TiB of address space) with 4 GiB mapped each
  writer  a concurrent writer (1 MiB O_DIRECT writes to another VDisk) while clones of a
          64 GiB-mapped VDisk run back to back, against the writer alone

Each figure is measured --reps times (3; --quick: 1) interleaving the targets; the table
shows the median with min-max, and speed ratios (> 1: vdiskfs is faster) against the
baselines, and the targets of the performance issue marked PASS/FAIL. JSON with every
sample goes to bench/results/<UTC time>.json and bench/results/latest.json.

Everything lives in a work directory under --dir (default /var/tmp, not /tmp: may be a
tmpfs); every mount, loop device and process the suite makes is undone at the end, also
after an error, Ctrl-C or SIGTERM. Warnings and errors in the vdiskfs daemons' logs are
kept in the JSON (info.daemon_log_warnings) and shown under the table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import fcntl
import json
import mmap
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
from vdiskfs.cow import layout  # noqa: E402
from vdiskfs.cow.chunkstore import ChunkStore  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PY = sys.executable
VDISKFS = [PY, "-m", "vdiskfs"]
RESULTS = os.path.join(BENCH, "results")
SECTIONS = ("seq", "fio", "ext4", "fresh", "clone", "mount", "writer")
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
            c.notes.append("quick: 1 rep, 256 MiB sequential, 3 s fio runs, ext4 with "
                           "25 x 4 MiB + 500 x 4 KiB files, 512 MiB fresh-clone VDisk, "
                           "3 s writer; clone and mount sizes as in the full run")
        if reps:
            c.reps = reps
        return c


# ============================================================== figures and targets
# id -> (section, label, unit, higher is better)
FIGURES = {
    "seq_write_1m": ("seq", "seq write, 1 MiB writes", "MiB/s", True),
    "seq_write_128k": ("seq", "seq write, 128 KiB writes", "MiB/s", True),
    "seq_read": ("seq", "seq read, cold", "MiB/s", True),
    "seq_read_first": ("seq", "seq read, first after writing", "MiB/s", True),
    "fio_randwrite_direct": ("fio", "4K randwrite O_DIRECT", "IOPS", True),
    "fio_randread_direct": ("fio", "4K randread O_DIRECT", "IOPS", True),
    "fio_randwrite_buffered": ("fio", "4K randwrite buffered", "IOPS", True),
    "fio_randread_buffered": ("fio", "4K randread buffered", "IOPS", True),
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
    "writer": ("writer", "O_DIRECT writer while cloning", "MiB/s", True),
    "writer_clones": ("writer", "clones done while writing", "n", True),
}

# The targets of the performance issue: (figure, baseline or None for an absolute limit,
# threshold, text). Passes when the speed ratio (vdiskfs/baseline for rates,
# baseline/vdiskfs for times) >= threshold, or for an absolute limit when the vdiskfs
# median < threshold. Issue: seq write >= 1.0x bindfs, seq read >= 0.8x bindfs, both >=
# the Python floor; 4K O_DIRECT >= the floor's IOPS; ext4 within 1.5x of a native loop;
# writes to a fresh clone >= 0.5x unshared; clone 1 GiB >= 10x faster than XFS reflink,
# 64 GiB < 100 ms; RSS < 200 MiB; mount < 2 s.
CHECKS = [
    ("seq_write_1m", "bindfs", 1.0, ">=1.0x bindfs"),
    ("seq_write_1m", "pyfloor", 1.0, ">=1.0x pyfloor"),
    ("seq_write_128k", "bindfs", 1.0, ">=1.0x bindfs"),
    ("seq_write_128k", "pyfloor", 1.0, ">=1.0x pyfloor"),
    ("seq_read", "bindfs", 0.8, ">=0.8x bindfs"),
    ("seq_read", "pyfloor", 1.0, ">=1.0x pyfloor"),
    ("fio_randwrite_direct", "pyfloor", 1.0, ">=1.0x pyfloor"),
    ("fio_randread_direct", "pyfloor", 1.0, ">=1.0x pyfloor"),
    ("ext4_total", "native", 1 / 1.5, "time <=1.5x native"),
    ("fresh_seq_write", "unshared", 0.5, ">=0.5x unshared"),
    ("fresh_fio_randwrite_direct", "unshared", 0.5, ">=0.5x unshared"),
    ("fresh_fio_randwrite_buffered", "unshared", 0.5, ">=0.5x unshared"),
    ("fresh_randwrite_direct", "unshared", 0.5, ">=0.5x unshared"),
    ("fresh_randwrite_buffered", "unshared", 0.5, ">=0.5x unshared"),
    ("fresh_ext4_rewrite", "unshared", 0.5, ">=0.5x unshared"),
    ("clone_1g", "xfs-reflink", 10.0, ">=10x xfs-reflink"),
    ("clone_64g", None, 100.0, "<100 ms"),
    ("mount_rss", None, 200.0, "<200 MiB"),
    ("mount_rss_used", None, 200.0, "<200 MiB"),
    ("mount_time", None, 2.0, "<2 s"),
]

MAIN_COLUMNS = ("vdiskfs", "native", "bindfs", "pyfloor")


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
        return {"figures": figs, "checks": evaluate_checks(figs),
                "errors": self.errors, "section_seconds": self.section_seconds,
                "info": self.info}


def speed_ratio(fig: dict, base: str, which: str = "median") -> float | None:
    v, b = fig["values"].get("vdiskfs", {}), fig["values"].get(base, {})
    if which not in v or which not in b or not v[which] or not b[which]:
        return None
    return v[which] / b[which] if fig["higher_is_better"] else b[which] / v[which]


def ratio_range(fig: dict, base: str) -> tuple[float, float] | None:
    v, b = fig["values"].get("vdiskfs", {}), fig["values"].get(base, {})
    if "min" not in v or "min" not in b or not all((v["min"], v["max"], b["min"], b["max"])):
        return None
    if fig["higher_is_better"]:
        return v["min"] / b["max"], v["max"] / b["min"]
    return b["min"] / v["max"], b["max"] / v["min"]


def evaluate_checks(figs: dict) -> list[dict]:
    out = []
    for fid, base, thr, text in CHECKS:
        fig = figs.get(fid)
        if fig is None:
            continue
        row = {"figure": fid, "target": text, "baseline": base, "threshold": thr}
        v = fig["values"].get("vdiskfs", {})
        if base is None:
            if "median" not in v:
                row.update(result="n/a", why=v.get("na", "not measured"))
            else:
                row.update(value=v["median"], result="PASS" if v["median"] < thr else "FAIL",
                           noisy=v["min"] < thr <= v["max"])
        else:
            r = speed_ratio(fig, base)
            if r is None:
                why = fig["values"].get(base, {}).get("na") or v.get("na") or "not measured"
                row.update(result="n/a", why=why)
            else:
                rr = ratio_range(fig, base)
                row.update(value=r, result="PASS" if r >= thr else "FAIL",
                           noisy=bool(rr and rr[0] < thr <= rr[1]))
        out.append(row)
    return out


# ============================================================== small helpers
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


WORKDIR = ""   # set by main(): only file systems under it are synced
CHUNK_SIZE = 0  # set by main() from --chunk-size: pools the run creates use it


def drop_caches() -> None:
    """syncfs our own file systems (innermost first: loop-mounted ext4, FUSE mounts, the
    backing fs), then drop the page cache. Not sync(2): another user's stuck FUSE mount
    would hang it."""
    if WORKDIR:
        for _, mp, _ in reversed(mounts()):
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
            off = 0
            while off < nbytes:
                n = min(bs, nbytes - off)
                off += os.write(fd, self.piece(off, n))
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return time.perf_counter() - t


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


def mounts() -> list[tuple[str, str, str]]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            a, _, b = line.partition(" - ")
            fields, rest = a.split(), b.split()
            mp = fields[4].encode().decode("unicode_escape")
            out.append((fields[2], mp, rest[0]))
    return out


def read_ahead_kb(mountpoint: str) -> int | None:
    for dev, mp, _ in reversed(mounts()):
        if mp == mountpoint:
            try:
                with open(f"/sys/class/bdi/{dev}/read_ahead_kb") as f:
                    return int(f.read())
            except OSError:
                return None
    return None


def fs_type(path: str) -> str:
    path = os.path.realpath(path)
    best = ("", "?")
    for _, mp, typ in mounts():
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best[0]):
            best = (mp, typ)
    return best[1]


def tool_version(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr) else "?"


def xfs_extents(path: str) -> int | None:
    """Data extents (mapping records, holes not counted) of a file on XFS."""
    p = run(["xfs_bmap", path], check=False)
    if p.returncode:
        return None
    return sum(1 for ln in p.stdout.splitlines()[1:] if "hole" not in ln)


def loadavg() -> list[float]:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


# ============================================================== mounts (all undone on exit)
DAEMON_WARNINGS: list[str] = []   # from the pools' daemon.log, reported in the JSON


class VdiskfsMount:
    """``vdiskfs mount`` as a context manager: .mount_s, .pid; .umount() (timed) may be
    called early. Undone by vdiskfs umount, or if that fails fusermount3 -u -z and SIGTERM
    to the daemon this mount started."""

    def __init__(self, pool: str, mnt: str, *extra: str):
        self.pool, self.mnt, self.extra = pool, mnt, extra
        self.pid = 0
        self.mount_s = 0.0

    def __enter__(self) -> "VdiskfsMount":
        os.makedirs(self.mnt, exist_ok=True)
        t = time.perf_counter()
        extra = list(self.extra)
        if CHUNK_SIZE and not os.path.exists(os.path.join(self.pool, layout.HEADER)):
            extra += ["--chunk-size", str(CHUNK_SIZE)]
        run(VDISKFS + ["mount", *extra, self.pool, self.mnt], timeout=300)
        self.mount_s = time.perf_counter() - t
        with open(os.path.join(self.pool, "lock")) as f:
            self.pid = int(f.read().strip())
        return self

    def umount(self) -> float:
        if not self.pid:
            return 0.0
        pid, self.pid = self.pid, 0
        t = time.perf_counter()
        p = run(VDISKFS + ["umount", self.mnt], check=False, timeout=600)
        dt = time.perf_counter() - t
        if p.returncode:
            log(f"warning: vdiskfs umount {self.mnt}: {p.stderr.strip()}; detaching")
            run(["fusermount3", "-u", "-z", self.mnt], check=False)
            _stop_pid(pid)
        self._collect_log()
        return dt

    def _collect_log(self) -> None:
        """Keep the daemon's warnings and errors for the JSON (and the summary)."""
        try:
            with open(os.path.join(self.pool, "daemon.log"), errors="replace") as f:
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


vdiskfs_mount = VdiskfsMount


def _stop_pid(pid: int, timeout: float = 30) -> None:
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


def _tail(path: str, n: int = 800) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:].strip()
    except OSError:
        return ""


def _wait_mounted(mnt: str, proc: subprocess.Popen, what: str, logfile: str,
                  timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not any(mp == mnt for _, mp, _ in mounts()):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {_tail(logfile)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not mount {mnt} in {timeout} s")
        time.sleep(0.02)


def _stop_fuse_proc(mnt: str, proc: subprocess.Popen) -> None:
    if any(mp == mnt for _, mp, _ in mounts()):
        for _ in range(50):
            if run(["fusermount3", "-u", mnt], check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
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


@contextlib.contextmanager
def passthrough_mount(src: str, mnt: str, logfile: str):
    os.makedirs(src, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    r, w = os.pipe()
    with open(logfile, "ab") as lf:
        proc = subprocess.Popen([PY, os.path.join(BENCH, "passthrough.py"), src, mnt,
                                 "--ready-fd", str(w)], pass_fds=(w,), stdin=subprocess.DEVNULL,
                                stdout=lf, stderr=lf, start_new_session=True)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            msg = f.read().decode(errors="replace")
        if msg != "ready":
            proc.wait(timeout=30)
            raise RuntimeError(f"passthrough failed: {_tail(logfile)}")
        yield proc.pid
    finally:
        _stop_fuse_proc(mnt, proc)


@contextlib.contextmanager
def bindfs_mount(src: str, mnt: str, logfile: str):
    """bindfs in the foreground (so the process is ours), with big_writes if it takes it."""
    os.makedirs(src, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    proc = None
    for opts in (["-o", "big_writes"], []):
        with open(logfile, "ab") as lf:
            proc = subprocess.Popen(["bindfs", "-f", *opts, src, mnt], stdin=subprocess.DEVNULL,
                                    stdout=lf, stderr=lf, start_new_session=True)
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


@contextlib.contextmanager
def loop_device(image: str):
    dev = run(["losetup", "-f", "--show", image]).stdout.strip()
    try:
        yield dev
    finally:
        for i in range(50):
            if run(["losetup", "-d", dev], check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            log(f"warning: could not detach {dev}")


@contextlib.contextmanager
def mounted(dev: str, mnt: str, *opts: str):
    os.makedirs(mnt, exist_ok=True)
    run(["mount", *opts, dev, mnt])
    try:
        yield mnt
    finally:
        for _ in range(50):
            if run(["umount", mnt], check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            log(f"warning: {mnt} busy; lazy unmount")
            run(["umount", "-l", mnt], check=False)


@contextlib.contextmanager
def loop_mount(image: str, mnt: str):
    with loop_device(image) as dev, mounted(dev, mnt):
        yield mnt


# ============================================================== clones through .ctl
def ctl(mnt: str, cmd: str) -> None:
    with open(os.path.join(mnt, ".ctl", "clone"), "w") as f:
        f.write(cmd + "\n")


def clone_state(mnt: str, src: str, dst: str) -> str | None:
    with open(os.path.join(mnt, ".ctl", "status")) as f:
        rows = [r.split() for r in f.read().splitlines()[1:]]
    states = [r[2] for r in rows if r[:2] == [src, dst]]
    return states[-1] if states else None


FICLONE = 0x40049409   # _IOW(0x94, 9, int)


def ficlone(src: str, dst: str) -> float:
    """Seconds for open + FICLONE + fsync + close, in this process."""
    t = time.perf_counter()
    sfd = os.open(src, os.O_RDONLY)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return time.perf_counter() - t


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


# ============================================================== fio
def fio(path: str, rw: str, direct: int, size: int, runtime: float | None = None,
        number_ios: int | None = None) -> dict:
    """One fio job; returns {"iops", "ios", "runtime_s"} or {"na": reason}."""
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--size={size}", f"--rw={rw}",
           "--bs=4k", "--ioengine=psync", "--iodepth=1", f"--direct={direct}",
           "--randrepeat=0", "--norandommap", "--allow_file_create=0",
           "--output-format=json"]
    if runtime:
        cmd += [f"--runtime={runtime}", "--time_based"]
    if number_ios:
        cmd += [f"--number_ios={number_ios}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = p.stdout
    try:
        data = json.loads(out[out.index("{"):out.rindex("}") + 1])
        job = data["jobs"][0]
    except (ValueError, KeyError, IndexError):
        data, job = None, None
    err = (p.stderr.strip() or out.strip())[-300:]
    if p.returncode or job is None or job.get("error"):
        if direct and ("EINVAL" in err or "Invalid argument" in err or "direct" in err):
            return {"na": f"O_DIRECT refused: {err}"}
        raise RuntimeError(f"fio {rw} direct={direct} on {path} failed: {err}")
    side = job["write" if "write" in rw else "read"]
    return {"iops": side["iops"], "ios": side["total_ios"], "runtime_s": side["runtime"] / 1000}


def fio_measure(path: str, rw: str, direct: int, size: int, runtime: float | None = None,
                number_ios: int | None = None) -> tuple[float | None, str | None]:
    """IOPS (for writes: the I/Os over fio's runtime plus an fsync of the file after it:
    write-back included); caches dropped first."""
    drop_caches()
    r = fio(path, rw, direct, size, runtime, number_ios)
    if "na" in r:
        return None, r["na"]
    if "write" in rw:
        return r["ios"] / (r["runtime_s"] + fsync_path(path)), None
    return r["iops"], None


# ============================================================== engine-built pools
class SparseBuildStore(ChunkStore):
    """The chunk store of Suite.build_pool: a pool's maps, refcounts and checkpoint as if
    it held its data, in a sparse data file.

    While ``sparse`` is set, ``writev`` stores nothing: it only extends the file (by
    ftruncate: a hole) over the written range, so that the slots lie inside the data file
    (fsck checks that) and ``eof`` (which ``known_zero`` reads) and ``unsynced`` (which the
    commits read) are what the real write would have left. Storing the builder's one byte
    per chunk would cost a 4 KiB extent per chunk (1 GiB of disk per 64 GiB mapped at
    256 KiB chunks), which on this discard-mounted disk takes ~13 s per 16 GiB mapped
    just to delete. With ``sparse`` off (the random-data VDisks) writes are stored.

    ``reserve`` never fallocates (64 GiB mapped would reserve 64 GiB of disk): it keeps
    only the bookkeeping, that slots about to be written are no longer punched holes."""

    sparse = True

    def reserve(self, slots: list[int]) -> None:
        self.punched.difference_update(slots)

    def writev(self, slot: int, off: int, views: list[memoryview]) -> None:
        if not self.sparse:
            super().writev(slot, off, views)
            return
        self.unsynced = True
        end = slot * self.chunk_size + off + sum(len(v) for v in views)
        if end > self.eof:
            os.ftruncate(self.fd, end)
            self.eof = end


# ============================================================== the suite
class Suite:
    def __init__(self, cfg: Config, workdir: str, res: Results, stack: contextlib.ExitStack):
        self.cfg = cfg
        self.w = workdir
        self.res = res
        self.stack = stack
        self.data = RandomData()
        self.have = {t: shutil.which(t) is not None
                     for t in ("bindfs", "fio", "mkfs.xfs", "qemu-img")}
        self.targets: dict[str, str] = {}   # target -> directory where its files go
        self.main_pool = os.path.join(workdir, "pool-main")
        self.main_mnt = os.path.join(workdir, "vd")

    def p(self, *parts: str) -> str:
        return os.path.join(self.w, *parts)

    def rotated(self, r: int) -> list[str]:
        names = list(self.targets)
        k = r % len(names)
        return names[k:] + names[:k]

    # ---------------------------------------------------------- the four file targets
    def mount_targets(self) -> None:
        if self.targets:
            return
        st = self.stack
        native = self.p("native")
        os.makedirs(native)
        self.targets["native"] = native
        if self.have["bindfs"]:
            how = st.enter_context(bindfs_mount(self.p("bindfs-src"), self.p("bindfs"),
                                                self.p("bindfs.log")))
            self.targets["bindfs"] = self.p("bindfs")
            self.res.info["bindfs_mount"] = how
        else:
            self.res.info["bindfs_mount"] = "bindfs not installed (make bench installs it)"
        st.enter_context(passthrough_mount(self.p("pt-src"), self.p("pt"), self.p("pt.log")))
        self.targets["pyfloor"] = self.p("pt")
        st.enter_context(vdiskfs_mount(self.main_pool, self.main_mnt))
        self.targets["vdiskfs"] = self.main_mnt
        self.res.info["read_ahead_kb"] = {t: read_ahead_kb(d) for t, d in self.targets.items()
                                          if t != "native"}
        self.res.info["read_ahead_kb"]["native"] = self._disk_read_ahead(native)

    @staticmethod
    def _disk_read_ahead(path: str) -> int | None:
        try:
            dev = os.stat(path).st_dev
            with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue/read_ahead_kb") as f:
                return int(f.read())
        except OSError:
            return None

    def file(self, target: str, name: str) -> str:
        return os.path.join(self.targets[target], name)

    def removed(self, target: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file(target, name))
        fsync_dir(self.targets[target])

    # ---------------------------------------------------------- 1. sequential
    def sec_seq(self) -> None:
        self.mount_targets()
        n = self.cfg.seq_bytes
        for r in range(self.cfg.reps):
            for t in self.rotated(r):
                path = self.file(t, "seq")
                dt = self.data.write_file(path, n, MiB)
                self.res.add("seq_write_1m", t, n / MiB / dt)
                drop_caches()
                dt, got = read_file(path)
                if got != n:
                    raise RuntimeError(f"{t}: read {got} bytes of {n}")
                self.res.add("seq_read_first", t, n / MiB / dt)
                drop_caches()
                self.res.add("seq_read", t, n / MiB / read_file(path)[0])
                self.removed(t, "seq")
                dt = self.data.write_file(path, n, 128 * KiB)
                self.res.add("seq_write_128k", t, n / MiB / dt)
                self.removed(t, "seq")
                log(f"  seq rep {r + 1} {t}: done")
        for fid in ("seq_write_1m", "seq_write_128k"):
            self.res.note(fid, f"{n // MiB} MiB to a new file, fsync at the end")
        self.res.note("seq_read", f"{n // MiB} MiB in 1 MiB reads after drop_caches, "
                      "the second such read after writing (see the next row)")
        self.res.note("seq_read_first", "the first read after writing: on this VM slow for "
                      "any file system, as the host reads freshly allocated blocks")

    # ---------------------------------------------------------- 2. fio
    def sec_fio(self) -> None:
        if not self.have["fio"]:
            for fid in ("fio_randwrite_direct", "fio_randread_direct",
                        "fio_randwrite_buffered", "fio_randread_buffered"):
                self.res.set_na(fid, "vdiskfs", "fio not installed (make bench installs it)")
            return
        self.mount_targets()
        size = self.cfg.fio_bytes
        for t in self.targets:
            self.data.write_file(self.file(t, "fio"), size, MiB)
            settle(self.file(t, "fio"))
        runs = [("randwrite", 1, "fio_randwrite_direct"), ("randread", 1, "fio_randread_direct"),
                ("randwrite", 0, "fio_randwrite_buffered"),
                ("randread", 0, "fio_randread_buffered")]
        for r in range(self.cfg.reps):
            for rw, direct, fid in runs:
                for t in self.rotated(r):
                    iops, na = fio_measure(self.file(t, "fio"), rw, direct, size,
                                           runtime=self.cfg.fio_runtime)
                    if na:
                        self.res.set_na(fid, t, na)
                    else:
                        self.res.add(fid, t, iops)
            log(f"  fio rep {r + 1}: done")
        for t in self.targets:
            self.removed(t, "fio")
        for rw, _, fid in runs:
            self.res.note(fid, f"{size // MiB} MiB file of random data, {self.cfg.fio_runtime} s"
                          " runs, caches dropped before each"
                          + ("; IOPS incl. an fsync after fio" if "write" in rw else ""))

    # ---------------------------------------------------------- 3. ext4 on loop
    def ext4_files(self) -> list[tuple[str, int]]:
        (nb, sb), (ns, ss) = self.cfg.ext4_big, self.cfg.ext4_small
        return ([(f"big/{i:03d}", sb) for i in range(nb)]
                + [(f"small/{i // 250:02d}/{i:04d}", ss) for i in range(ns)])

    def ext4_write(self, root: str, rewrite: bool = False) -> float:
        """Write (or rewrite in place) the workload's files and syncfs: seconds."""
        t = time.perf_counter()
        off = 7 * MiB + 4096 if rewrite else 0   # other bytes than the first write
        for name, size in self.ext4_files():
            path = os.path.join(root, name)
            if not rewrite:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | (0 if rewrite else os.O_CREAT | os.O_TRUNC), 0o644)
            try:
                done = 0
                while done < size:
                    n = min(MiB, size - done)
                    done += os.write(fd, self.data.piece(off + done, n))
            finally:
                os.close(fd)
            off += size + 4096
        syncfs(root)
        return time.perf_counter() - t

    def ext4_read(self, root: str) -> float:
        t = time.perf_counter()
        total = 0
        for name, size in self.ext4_files():
            total += read_file(os.path.join(root, name))[1]
        expect = sum(s for _, s in self.ext4_files())
        if total != expect:
            raise RuntimeError(f"ext4 read back {total} bytes of {expect}")
        return time.perf_counter() - t

    def mkfs_ext4(self, image: str) -> float:
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, self.cfg.ext4_image)
        finally:
            os.close(fd)
        return timed_run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                          image])

    def sec_ext4(self) -> None:
        self.mount_targets()
        mnt = self.p("ext4mnt")
        for r in range(self.cfg.reps):
            for t in self.rotated(r):
                image = self.file(t, "ext4img")
                self.res.add("ext4_mkfs", t, self.mkfs_ext4(image))
                with loop_mount(image, mnt):
                    w = self.ext4_write(mnt)
                    drop_caches()
                    self.ext4_read(mnt)   # settling read, see settle()
                    drop_caches()
                    rd = self.ext4_read(mnt)
                self.res.add("ext4_write", t, w)
                self.res.add("ext4_read", t, rd)
                self.res.add("ext4_total", t, w + rd)
                self.removed(t, "ext4img")
                log(f"  ext4 rep {r + 1} {t}: write {w:.2f} s, read {rd:.2f} s")
        total = sum(s for _, s in self.ext4_files()) / MiB
        (nb, sb), (ns, ss) = self.cfg.ext4_big, self.cfg.ext4_small
        self.res.note("ext4_total", f"{self.cfg.ext4_image // MiB} MiB image, {nb} x "
                      f"{sb // MiB} MiB + {ns} x {ss // KiB} KiB files ({total:.0f} MiB)")
        self.res.note("ext4_read", "caches dropped; the second read after writing")

    # ---------------------------------------------------------- 4. fresh clone
    def sec_fresh(self) -> None:
        self.mount_targets()
        mnt = self.main_mnt
        n = self.cfg.fresh_bytes
        chunks = n // (256 * KiB)   # the default chunk size: one 4K write per chunk on average
        a = os.path.join(mnt, "A")
        self.data.write_file(a, n, MiB)
        # ext4 image VDisk E holding the workload's files
        e = os.path.join(mnt, "E")
        emnt = self.p("ext4mnt")
        self.mkfs_ext4(e)
        with loop_mount(e, emnt):
            self.ext4_write(emnt)
        fsync_path(e)
        for r in range(self.cfg.reps):
            # sequential: unshared A, then a fresh clone of it
            self.res.add("fresh_seq_write", "unshared",
                         n / MiB / self.data.write_file(a, n, MiB, create=False, trunc=False))
            settle(a)
            drop_caches()
            self.res.add("fresh_seq_read", "unshared", n / MiB / read_file(a)[0])
            c = f"C{r}"
            clone(mnt, "A", c)
            cp = os.path.join(mnt, c)
            drop_caches()
            self.res.add("fresh_seq_read", "vdiskfs", n / MiB / read_file(cp)[0])
            self.res.add("fresh_seq_write", "vdiskfs",
                         n / MiB / self.data.write_file(cp, n, MiB, create=False, trunc=False))
            os.unlink(cp)
            fsync_dir(mnt)
            # fio: the section-2 job (timed runs), then the worst case: as many random 4K
            # writes as the VDisk has chunks, so that most are a chunk's first
            if self.have["fio"]:
                for direct, fid, ios in (
                        (1, "fresh_fio_randwrite_direct", None),
                        (0, "fresh_fio_randwrite_buffered", None),
                        (1, "fresh_randwrite_direct", chunks),
                        (0, "fresh_randwrite_buffered", chunks)):
                    runtime = None if ios else self.cfg.fio_runtime
                    iops, na = fio_measure(a, "randwrite", direct, n, runtime=runtime,
                                           number_ios=ios)
                    if na:
                        self.res.set_na(fid, "unshared", na)
                    else:
                        self.res.add(fid, "unshared", iops)
                    d = f"D{r}{direct}"
                    clone(mnt, "A", d)
                    iops, na = fio_measure(os.path.join(mnt, d), "randwrite", direct, n,
                                           runtime=runtime, number_ios=ios)
                    if na:
                        self.res.set_na(fid, "vdiskfs", na)
                    else:
                        self.res.add(fid, "vdiskfs", iops)
                    os.unlink(os.path.join(mnt, d))
                    fsync_dir(mnt)
            # ext4: rewrite the files in place, on E unshared, then on a fresh clone of E
            with loop_mount(e, emnt):
                self.res.add("fresh_ext4_rewrite", "unshared", self.ext4_write(emnt, rewrite=True))
            fsync_path(e)
            f = f"F{r}"
            clone(mnt, "E", f)
            with loop_mount(os.path.join(mnt, f), emnt):
                self.res.add("fresh_ext4_rewrite", "vdiskfs", self.ext4_write(emnt, rewrite=True))
            os.unlink(os.path.join(mnt, f))
            fsync_dir(mnt)
            log(f"  fresh-clone rep {r + 1}: done")
        for x in ("A", "E"):
            os.unlink(os.path.join(mnt, x))
        fsync_dir(mnt)
        self.res.note("fresh_seq_write", f"{n // MiB} MiB VDisk of random data, overwritten "
                      "in 1 MiB writes + fsync; vdiskfs = a clone made just before")
        self.res.note("fresh_seq_read", "caches dropped (unshared: after a settling read)")
        for fid in ("fresh_fio_randwrite_direct", "fresh_fio_randwrite_buffered"):
            self.res.note(fid, f"the fio job of section 2 ({self.cfg.fio_runtime} s, caches "
                          f"dropped, IOPS incl. a final fsync) on the {n // MiB} MiB VDisk; "
                          "vdiskfs = on a clone made just before")
        for fid in ("fresh_randwrite_direct", "fresh_randwrite_buffered"):
            self.res.note(fid, f"the worst case: {chunks} random 4K writes (one per 256 KiB), "
                          "caches dropped before, so most writes copy a cold chunk; IOPS "
                          "incl. a final fsync")
        self.res.note("fresh_ext4_rewrite", "the ext4 workload's files rewritten in place")

    # ---------------------------------------------------------- 5. clones
    def build_pool(self, path: str, specs: list[tuple[str, int, int, bool]]) -> float:
        """Engine-built pool: (name, size, mapped bytes, random data?) per VDisk.

        Random data is written for real. The others get one byte per chunk through the
        engine (every chunk mapped: the maps, refcounts and checkpoint are those of a
        VDisk holding that much data) into a SparseBuildStore, which stores none of it
        and only extends the data file over the slots (see there): the data file stays
        sparse. The pool is then closed (checkpointed) and reopened normally by the
        mounts; those VDisks are only cloned, mounted and read for the RSS figures (their
        chunks read as zeros), never checked for contents."""
        from vdiskfs.cow.pool import Pool, create_pool
        t = time.perf_counter()
        create_pool(path, **({"chunk_size": CHUNK_SIZE} if CHUNK_SIZE else {}))
        p = Pool(path, store_class=SparseBuildStore)
        try:
            cs = p.chunk_size
            for name, size, mapped, real in specs:
                vd = p.create(name, size)
                p.store.sparse = not real
                if real:
                    for off in range(0, mapped, MiB):
                        p.write(vd, off, self.data.piece(off, MiB))
                else:
                    for off in range(0, mapped, cs):
                        p.write(vd, off, b"\x01")
        finally:
            p.close()
        return time.perf_counter() - t

    def sec_clone(self) -> None:
        gibs = self.cfg.clone_gib
        pool, mnt = self.p("pool-clone"), self.p("vc")
        specs = [(f"S{g}", g * GiB, g * GiB, g == 1) for g in gibs]
        bt = self.build_pool(pool, specs)
        self.res.info["clone_pool_build_s"] = bt
        log(f"  clone pool built in {bt:.1f} s ({sum(gibs)} GiB mapped)")
        # metadata per clone: journal growth, and growth of the checkpointed state
        for g in gibs:
            with vdiskfs_mount(pool, mnt):
                m0 = meta_bytes(pool)
                clone(mnt, f"S{g}", f"M{g}")
                m1 = meta_bytes(pool)
            with vdiskfs_mount(pool, mnt):
                m2 = meta_bytes(pool)
            self.res.add(f"clone_meta_journal_{g}g", "vdiskfs", m1 - m0)
            self.res.add(f"clone_meta_ckpt_{g}g", "vdiskfs", m2 - m0)
        # times: clone, clone of a clone (of M{g})
        with vdiskfs_mount(pool, mnt):
            for r in range(self.cfg.reps):
                for g in gibs:
                    self.res.add(f"clone_{g}g", "vdiskfs", 1000 * clone(mnt, f"S{g}", f"T{g}_{r}"))
                    self.res.add(f"clone2_{g}g", "vdiskfs",
                                 1000 * clone(mnt, f"M{g}", f"U{g}_{r}"))
                    for x in (f"T{g}_{r}", f"U{g}_{r}"):
                        os.unlink(os.path.join(mnt, x))
                    fsync_dir(mnt)
                ctl(mnt, "purge")
                log(f"  clone rep {r + 1}: done")
        for g in gibs:
            what = ("random data" if g == 1 else
                    "engine-built, every chunk mapped, sparse data file (see build_pool)")
            self.res.note(f"clone_{g}g", f"{g} GiB mapped, {what}; command to Completed")
        self.clone_baselines()

    def clone_baselines(self) -> None:
        reps = self.cfg.reps
        # full copy and qcow2 overlay of a 1 GiB file of random data on the backing fs
        src = self.p("native-clone", "src1")
        os.makedirs(os.path.dirname(src), exist_ok=True)
        self.data.write_file(src, GiB, MiB)
        for r in range(reps):
            dst = self.p("native-clone", f"copy{r}")
            self.res.add("clone_1g", "cp-full", 1000 * timed_run(["cp", "--sparse=always", src,
                                                                  dst]))
            os.unlink(dst)
            if self.have["qemu-img"]:
                q = self.p("native-clone", f"ovl{r}.qcow2")
                self.res.add("clone_1g", "qemu-img", 1000 * timed_run(
                    ["qemu-img", "create", "-q", "-f", "qcow2", "-b", src, "-F", "raw", q]))
                os.unlink(q)
        if not self.have["qemu-img"]:
            self.res.set_na("clone_1g", "qemu-img", "qemu-img not installed")
        self.res.note("clone_1g", "cp-full: cp --sparse=always of a 1 GiB file in the page "
                      "cache; qemu-img: create -f qcow2 -b SRC -F raw")
        # XFS reflink
        if not self.have["mkfs.xfs"]:
            self.res.set_na("clone_1g", "xfs-reflink", "xfsprogs not installed")
            return
        img, xmnt = self.p("xfs.img"), self.p("xfs")
        with open(img, "wb") as f:
            f.truncate(24 * GiB)
        run(["mkfs.xfs", "-q", "-m", "reflink=1", img])
        with loop_mount(img, xmnt):
            s1 = os.path.join(xmnt, "src1")
            self.data.write_file(s1, GiB, MiB)
            s1f = self.sparse_mapped(os.path.join(xmnt, "src1f"), GiB)
            s16 = self.sparse_mapped(os.path.join(xmnt, "src16"), 16 * GiB)
            self.res.info["xfs_data_extents"] = {os.path.basename(x): xfs_extents(x)
                                                 for x in (s1, s1f, s16)}
            for r in range(reps):
                for fid, s, name in (("clone_1g", s1, "xfs-reflink"),
                                     ("clone_1g", s1f, "xfs-reflink-frag"),
                                     ("clone_16g", s16, "xfs-reflink")):
                    d = os.path.join(xmnt, f"r{r}")
                    t = timed_run(["cp", "--reflink=always", s, d])
                    t2 = t + fsync_path(d)
                    self.res.add(fid, name, 1000 * t)
                    os.unlink(d)
                    if name == "xfs-reflink":
                        self.res.add(fid, "xfs-reflink+fsync", 1000 * t2)
                        self.res.add(fid, "xfs-ficlone+fsync", 1000 * ficlone(s, d))
                        os.unlink(d)
        self.res.note("clone_1g", "xfs-reflink: cp --reflink=always of a 1 GiB file written "
                      "sequentially (few extents: the best case for XFS); -frag: of a 1 GiB "
                      "file with one 4 KiB block per 256 KiB (4096 extents: as many as vdiskfs "
                      "has chunks)")
        self.res.note("clone_1g", "xfs-ficlone+fsync: the FICLONE ioctl and an fsync in this "
                      "process (no cp to start; durable, like a vdiskfs clone)")
        self.res.note("clone_16g", "xfs-reflink: a 16 GiB file with one 4 KiB block written per "
                      "256 KiB (as many extents as vdiskfs has mapped chunks)")

    @staticmethod
    def sparse_mapped(path: str, size: int) -> str:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)   # no extending writes: no speculative preallocation
            for off in range(0, size, 256 * KiB):
                os.pwrite(fd, b"\x01", off)
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    # ---------------------------------------------------------- 7. writer during clones
    def writer_part(self, mnt: str, src: str) -> None:
        wpath = os.path.join(mnt, "W")
        size = 256 * MiB
        self.data.write_file(wpath, size, MiB)
        secs = self.cfg.writer_seconds
        for r in range(self.cfg.reps):
            self.res.add("writer", "alone", WriterProc(wpath, secs, size).wait_result())
            w = WriterProc(wpath, secs, size)
            n = 0
            while w.running():
                clone(mnt, src, f"X{n}")
                os.unlink(os.path.join(mnt, f"X{n}"))
                n += 1
                if n % 10 == 0:
                    ctl(mnt, "purge")
            self.res.add("writer", "vdiskfs", w.wait_result())
            self.res.add("writer_clones", "vdiskfs", n)
            ctl(mnt, "purge")
            log(f"  writer rep {r + 1}: {n} clones")
        os.unlink(wpath)
        fsync_dir(mnt)
        self.res.note("writer", f"{secs:.0f} s of 1 MiB O_DIRECT writes cycling over a 256 MiB "
                      f"VDisk (fsync at the end), while clones of {src} run back to back; "
                      "the baseline is the writer alone")

    # ---------------------------------------------------------- 6. mount time, RSS
    def sec_mount(self) -> None:
        c = self.cfg
        pool, mnt = self.p("pool-big"), self.p("vb")
        specs = [(f"V{i:02d}", c.big_vdisk_size, c.big_mapped, False) for i in range(c.big_vdisks)]
        bt = self.build_pool(pool, specs)
        space = c.big_vdisks * c.big_vdisk_size
        mapped = c.big_vdisks * c.big_mapped
        self.res.info["big_pool"] = {"build_s": bt, "vdisks": c.big_vdisks,
                                     "space_bytes": space, "mapped_bytes": mapped}
        log(f"  big pool built in {bt:.1f} s ({space / GiB:.0f} GiB space, "
            f"{mapped / GiB:.0f} GiB mapped)")
        self.res.add("mount_meta", "vdiskfs", meta_bytes(pool) / MiB)
        for r in range(c.reps):
            drop_caches()
            with vdiskfs_mount(pool, mnt) as m:
                dt, pid = m.mount_s, m.pid
                self.res.add("mount_time", "vdiskfs", dt)
                self.res.add("mount_rss", "vdiskfs", rss_mib(pid)[0])
                run(["ls", "-l", mnt])
                with open(os.path.join(mnt, ".ctl", "status")) as f:
                    f.read()
                for i in range(c.big_vdisks):
                    with open(os.path.join(mnt, f"V{i:02d}"), "rb") as f:
                        f.read(MiB)
                rss, hwm = rss_mib(pid)
                self.res.add("mount_rss_used", "vdiskfs", rss)
                self.res.info.setdefault("mount_vmhwm_mib", []).append(hwm)
                self.res.add("umount_time", "vdiskfs", m.umount())
            log(f"  mount rep {r + 1}: {dt:.2f} s")
        label = f"{space / GiB:.0f} GiB space / {mapped / GiB:.0f} GiB mapped"
        for fid in ("mount_time", "mount_rss", "mount_rss_used", "mount_meta", "umount_time"):
            self.res.note(fid, f"{c.big_vdisks} VDisks, {label}, engine-built")

    # ---------------------------------------------------------- driver
    def run_section(self, name: str, fn) -> None:
        log(f"section {name}")
        t = time.perf_counter()
        try:
            fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            self.res.errors[name] = f"{type(e).__name__}: {e}"
            log(f"section {name} FAILED: {e}")
            traceback.print_exc()
        finally:
            self.res.section_seconds[name] = round(time.perf_counter() - t, 1)

    def run_all(self, sections: tuple) -> None:
        table = {"seq": self.sec_seq, "fio": self.sec_fio, "ext4": self.sec_ext4,
                 "fresh": self.sec_fresh, "clone": self.sec_clone, "mount": self.sec_mount,
                 "writer": self.sec_writer}
        for name in SECTIONS:
            if name in sections:
                self.run_section(name, table[name])

    def sec_writer(self) -> None:
        g = self.cfg.clone_gib[-1]
        pool, mnt = self.p("pool-writer"), self.p("vw")
        self.build_pool(pool, [(f"S{g}", g * GiB, g * GiB, False)])
        with vdiskfs_mount(pool, mnt):
            self.writer_part(mnt, f"S{g}")


class WriterProc:
    """The concurrent writer runs in its own process (no GIL shared with the clone loop)."""

    def __init__(self, path: str, secs: float, size: int):
        self.proc = subprocess.Popen([PY, os.path.abspath(__file__), "--_writer", path,
                                      str(secs), str(size)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_result(self) -> float:
        out, err = self.proc.communicate(timeout=600)
        if self.proc.returncode:
            raise RuntimeError(f"writer failed: {err.strip()}")
        return float(out.strip())


def writer_main(path: str, secs: float, size: int) -> None:
    buf = mmap.mmap(-1, MiB)   # page-aligned, as O_DIRECT wants
    buf.write(os.urandom(MiB))
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    n, t0 = 0, time.perf_counter()
    try:
        while time.perf_counter() - t0 < secs:
            os.pwrite(fd, buf, (n * MiB) % size)
            n += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    print(n / (time.perf_counter() - t0))


# ============================================================== output
def fmt_num(v: float, unit: str) -> str:
    if unit in ("B", "n") and v < 10000:
        return f"{v:.0f}"
    if unit == "IOPS" or (unit in ("MiB/s", "B", "n") and v >= 100):
        return f"{v / 1000:.1f}k" if v >= 10000 else f"{v:.0f}"
    if unit == "ms":
        return f"{v:.1f}" if v < 1000 else f"{v:.0f}"
    if unit == "s":
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def fmt_cell(val: dict | None, unit: str) -> str:
    if not val:
        return ""
    if "na" in val:
        return "n/a"
    s = fmt_num(val["median"], unit)
    if len(val["samples"]) > 1:
        s += f" ({fmt_num(val['min'], unit)}-{fmt_num(val['max'], unit)})"
    return s


def render_table(data: dict, compare: dict | None = None) -> str:
    """One row per figure and baseline: the vdiskfs cell on the figure's first row, then
    each baseline measured in the same run with the speed ratio against it, and the
    targets of the issue that apply with PASS/FAIL."""
    figs, checks = data["figures"], data["checks"]
    by_fig: dict[tuple[str, str | None], list[dict]] = {}
    for c in checks:
        by_fig.setdefault((c["figure"], c["baseline"]), []).append(c)
    head = ["figure", "unit", "vdiskfs", "baseline", "baseline value", "speed", "target",
            "result"]
    rows: list[list[str] | None] = []
    section = None
    for fid, fig in figs.items():
        if fig["section"] != section:
            if section is not None:
                rows.append(None)
            section = fig["section"]
        vals, unit = fig["values"], fig["unit"]
        bases = [t for t in MAIN_COLUMNS[1:] if t in vals]
        bases += [t for t in vals if t not in MAIN_COLUMNS]
        first = [fig["label"], unit, fmt_cell(vals.get("vdiskfs"), unit)]

        def cells(base: str | None) -> list[str]:
            tg = by_fig.get((fid, base), [])
            return [", ".join(c["target"] for c in tg),
                    " ".join(c["result"] + ("~" if c.get("noisy") else "") for c in tg)]

        rows.append(first + ["", "", ""] + cells(None))
        if bases and not any((fid, None) == k for k in by_fig):
            rows.pop()   # the first baseline goes on the figure's own row
            first_row = True
        else:
            first_row = False
        for b in bases:
            r = speed_ratio(fig, b)
            ratio = f"{r:.2f}x" if r is not None and unit not in ("B", "n") else ""
            lead = first if first_row else ["", "", ""]
            first_row = False
            rows.append(lead + [b, fmt_cell(vals[b], unit), ratio] + cells(b))
    widths = [max(len(r[i]) for r in rows + [head] if r) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    out += [line(r) if r else "" for r in rows]
    out.append("")
    out.append("Cells: median (min-max) over the repetitions. speed: vdiskfs/baseline for "
               "rates, baseline/vdiskfs for times (> 1: vdiskfs faster). ~: the min-max range "
               "straddles the threshold (noisy).")
    passed = sum(c["result"] == "PASS" for c in checks)
    failed = sum(c["result"] == "FAIL" for c in checks)
    out.append(f"Targets: {passed} PASS, {failed} FAIL, "
               f"{sum(c['result'] == 'n/a' for c in checks)} n/a")
    for c in checks:
        if c["result"] == "n/a":
            out.append(f"  n/a: {c['target']} ({figs[c['figure']]['label']}): {c.get('why')}")
    if data.get("errors"):
        for name, e in data["errors"].items():
            out.append(f"ERROR in section {name}: {e}")
    ra = data.get("info", {}).get("read_ahead_kb")
    if ra:
        out.append("Read-ahead of each mount's bdi, KiB (native: the disk): "
                   + ", ".join(f"{t} {v}" for t, v in ra.items())
                   + " (vdiskfs and the passthrough mean to raise theirs to 1024)")
    warns = data.get("info", {}).get("daemon_log_warnings")
    if warns:
        out.append(f"vdiskfs daemon.log warnings/errors ({len(warns)}, first 5):")
        out += [f"  {w[:200]}" for w in warns[:5]]
    notes: dict[str, list[str]] = {}
    for f in figs:
        for n in figs[f]["notes"]:
            notes.setdefault(n, []).append(figs[f]["label"])
    if notes:
        out.append("Notes:")
        out += [f"  {', '.join(labels)}: {n}" for n, labels in notes.items()]
    if compare:
        out.append("")
        out += render_compare(data, compare)
    return "\n".join(out)


def render_compare(new: dict, old: dict) -> list[str]:
    out = [f"Compared with {old.get('info', {}).get('git', '?')} "
           f"({old.get('info', {}).get('started', '?')}): median old -> new (change; + is better)"]
    for fid, fig in new["figures"].items():
        ofig = old.get("figures", {}).get(fid)
        if not ofig:
            continue
        for t, v in fig["values"].items():
            ov = ofig["values"].get(t, {})
            if "median" not in v or "median" not in ov or not ov["median"]:
                continue
            ch = v["median"] / ov["median"] - 1
            if not fig["higher_is_better"]:
                ch = ov["median"] / v["median"] - 1 if v["median"] else 0
            out.append(f"  {fig['label']:<40} {t:<18} {fmt_num(ov['median'], fig['unit']):>8} -> "
                       f"{fmt_num(v['median'], fig['unit']):>8} {fig['unit']:<5} ({ch:+.0%})")
    return out


# ============================================================== cleanup safety net
def sweep(workdir: str) -> list[str]:
    """Undo whatever is still mounted or attached under the work dir (after a crash of the
    context managers): lazy unmounts and loop detaches, innermost first."""
    left = []
    for _, mp, typ in reversed(mounts()):
        if mp == workdir or mp.startswith(workdir + "/"):
            left.append(f"mount {mp} ({typ})")
            cmd = ["fusermount3", "-u", "-z", mp] if typ.startswith("fuse") else ["umount", "-l", mp]
            run(cmd, check=False)
    p = run(["losetup", "-a", "-O", "NAME,BACK-FILE", "-n", "-l"], check=False)
    for line in p.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(workdir + "/"):
            left.append(f"loop {parts[0]} on {parts[1].strip()}")
            run(["losetup", "-d", parts[0]], check=False)
    return left


def git_info() -> str:
    try:
        rev = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"]).stdout
        return rev + ("-dirty" if dirty.strip() else "")
    except Exception:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description="vdiskfs benchmark suite (run as root)",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--quick", action="store_true", help="reduced set, about 2 minutes")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (3; quick: 1)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    ap.add_argument("--chunk-size", default=None, metavar="SIZE",
                    help="chunk size of the pools the run creates (e.g. 64K; default: "
                         "vdiskfs's default)")
    ap.add_argument("--dir", default="/var/tmp", help="where the work directory goes")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<time>.json)")
    ap.add_argument("--compare", default=None, metavar="OLD.json",
                    help="also print the change of each median against an earlier run")
    ap.add_argument("--show", default=None, metavar="RUN.json",
                    help="print the table of an earlier run and exit")
    ap.add_argument("--_writer", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._writer:
        writer_main(args._writer[0], float(args._writer[1]), int(args._writer[2]))
        return 0
    compare = None
    if args.compare:
        with open(args.compare) as f:
            compare = json.load(f)
    if args.show:
        with open(args.show) as f:
            print(render_table(json.load(f), compare))
        return 0
    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    if os.geteuid() != 0:
        print("bench/run.py: run as root (mounts, loop devices, drop_caches)", file=sys.stderr)
        return 2
    missing = [t for t in ("bindfs", "fio", "mkfs.xfs", "qemu-img") if not shutil.which(t)]
    if missing:
        log(f"warning: {', '.join(missing)} missing: those baselines will be n/a "
            "(`make bench` installs them)")

    cfg = Config.make(args.quick, args.reps)
    if args.chunk_size:
        from vdiskfs.cli import parse_size
        global CHUNK_SIZE
        CHUNK_SIZE = cfg.chunk_size = parse_size(args.chunk_size)
    res = Results(cfg)
    os.makedirs(args.dir, exist_ok=True)
    if fs_type(args.dir) == "tmpfs":
        log(f"warning: {args.dir} is a tmpfs: 'native' figures will be of memory")
    free = shutil.disk_usage(args.dir).free
    if free < 16 * GiB:
        log(f"warning: only {free / GiB:.1f} GiB free in {args.dir}; the suite needs ~12 GiB")
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="vdiskfs-bench-", dir=args.dir))
    global WORKDIR
    WORKDIR = workdir
    started = datetime.datetime.now(datetime.timezone.utc)
    res.info.update(
        started=started.isoformat(timespec="seconds"), git=git_info(), quick=cfg.quick,
        config={k: v for k, v in asdict(cfg).items()}, sections=list(sections),
        host=platform.node(), kernel=platform.release(), cpus=os.cpu_count(),
        python=platform.python_version(), loadavg_start=loadavg(), workdir=workdir,
        backing_fs=fs_type(workdir),
        tools={t: tool_version(c) for t, c in (("bindfs", ["bindfs", "--version"]),
                                                ("fio", ["fio", "--version"]),
                                                ("qemu-img", ["qemu-img", "--version"]),
                                                ("mkfs.xfs", ["mkfs.xfs", "-V"]))})
    log(f"vdiskfs bench ({'quick' if cfg.quick else 'full'}, {cfg.reps} rep(s)) in {workdir}; "
        f"load average {res.info['loadavg_start']}")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    t0 = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            Suite(cfg, workdir, res, stack).run_all(sections)
            log("unmounting")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        for name in ("pt.log", "bindfs.log"):
            tail = _tail(os.path.join(workdir, name), 2000)
            if tail:
                res.info[name.replace(".", "_")] = tail
        left = sweep(workdir)
        if left:
            log(f"warning: had to force-clean {left}")
            res.info["force_cleaned"] = left
        shutil.rmtree(workdir, ignore_errors=True)
    res.info["seconds"] = round(time.perf_counter() - t0, 1)
    res.info["daemon_log_warnings"] = DAEMON_WARNINGS
    res.info["loadavg_end"] = loadavg()
    res.info["notes"] = cfg.notes
    if interrupted:
        res.errors["run"] = "interrupted"
    data = res.to_json()
    os.makedirs(RESULTS, exist_ok=True)
    out = args.out or os.path.join(RESULTS, started.strftime("%Y%m%dT%H%M%SZ") + ".json")
    with open(out, "w") as f:
        json.dump(data, f, indent=1)
    if not args.out:
        shutil.copyfile(out, os.path.join(RESULTS, "latest.json"))
    print()
    print(render_table(data, compare))
    print(f"\n{'quick' if cfg.quick else 'full'} run, {res.info['seconds']:.0f} s, load average "
          f"{res.info['loadavg_start']} -> {res.info['loadavg_end']}; JSON: {out}")
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
