"""Section qd: fio 4 KiB random reads and writes, O_DIRECT, libaio, iodepth 1, 4 and 16,
cold (caches dropped before each run), on a 1 GiB file of random data on the four file
targets; the scaling iodepth-16/iodepth-1 per target and rep; the same through ext4 on a
loop device attached with --direct-io=on on an image on each target (what a VM manager
does); and 4 fio jobs at once on 4 files (on vdiskfs: 4 VDisks), iodepth 4 each."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from bench.common import MiB, drop_caches, log, settle, syncfs, timed_run
from bench.mounts import loop_device, loop_dio, mounted
from bench.sections.fio import fio_record

if TYPE_CHECKING:
    from bench.suite import Suite

DEPTHS = (1, 4, 16)
RWS = ("randread", "randwrite")
JOBS, JOB_DEPTH = 4, 4


def qd_fids(prefix: str) -> list[str]:
    return [f"{prefix}_{rw}_d{d}" for rw in RWS for d in DEPTHS] + \
        [f"{prefix}_scaling_{rw}" for rw in RWS]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def depth_runs(s: Suite, prefix: str, paths: dict[str, str], size: int) -> None:
    """fio over RWS x DEPTHS on each target's file, targets interleaved per rep; then the
    scaling figure (IOPS at iodepth 16 / at 1) from each rep's own pair. For the Python
    daemons (vdiskfs, pyfloor) of the plain-file runs: their CPU time per request."""
    for r in range(s.cfg.reps):
        got: dict[tuple[str, str, int], float] = {}
        for rw in RWS:
            for d in DEPTHS:
                for t in s.rotated(r):
                    pid = s.pids.get(t) if prefix == "qd" else None
                    c0 = cpu_seconds(pid) if pid else 0.0
                    v = fio_record(s.res, f"{prefix}_{rw}_d{d}", t, paths[t], rw, 1, size,
                                   runtime=s.cfg.fio_runtime, engine="libaio", iodepth=d)
                    if v is not None:
                        got[(rw, t, d)] = v
                        if pid and d in (1, DEPTHS[-1]):
                            # per fio request; for writes v includes the closing fsync
                            s.res.add(f"qd_cpu_{rw}_d{d}", t, (cpu_seconds(pid) - c0)
                                      / (v * s.cfg.fio_runtime) * 1e6)
        for rw in RWS:
            for t in s.targets:
                if (rw, t, 1) in got and (rw, t, DEPTHS[-1]) in got:
                    s.res.add(f"{prefix}_scaling_{rw}", t,
                              got[(rw, t, DEPTHS[-1])] / got[(rw, t, 1)])
                elif (rw, t, 1) not in got:
                    s.res.set_na(f"{prefix}_scaling_{rw}", t, "O_DIRECT refused")
        log(f"  {prefix} rep {r + 1}: " + ", ".join(
            f"{t} {got.get(('randread', t, 16), 0) / max(got.get(('randread', t, 1), 0), 1):.2f}x"
            for t in s.targets) + " (randread d16/d1)")


def measure(s: Suite) -> None:
    with s.busy_hog():
        _measure(s)


def _measure(s: Suite) -> None:
    if not s.have["fio"]:
        for fid in qd_fids("qd") + qd_fids("qdext4") + ["qdjobs_randread", "qdjobs_randwrite"]:
            s.res.set_na(fid, "vdiskfs", "fio not installed (make bench installs it)")
        return
    s.mount_targets()
    cfg = s.cfg
    size = cfg.qd_bytes
    rt = cfg.fio_runtime

    # ---- 1 GiB file on each target
    paths = {t: s.file(t, "qd") for t in s.targets}
    for t, p in paths.items():
        s.data.write_file(p, size, MiB)
        settle(p)
    depth_runs(s, "qd", paths, size)
    for t in s.targets:
        s.removed(t, "qd")
    for fid in [f"qd_cpu_{rw}_d{d}" for rw in RWS for d in (1, DEPTHS[-1])]:
        s.res.note(fid, "utime+stime of the daemon process (vdiskfs, pyfloor) over the qd "
                   "run / its requests (IOPS x runtime; for writes the IOPS include the "
                   "fsync after fio), microseconds")
    for fid in qd_fids("qd"):
        s.res.note(fid, f"fio libaio O_DIRECT on a {size // MiB} MiB file of random data, "
                   f"{rt} s runs, caches dropped before each; write IOPS incl. an fsync "
                   "after fio; scaling = IOPS at iodepth 16 / at iodepth 1, per rep")

    # ---- 4 jobs on 4 files (VDisks) at once
    per = size // JOBS
    jpaths = {t: [s.file(t, f"qdj{i}") for i in range(JOBS)] for t in s.targets}
    for t, ps in jpaths.items():
        for p in ps:
            s.data.write_file(p, per, MiB)
        for p in ps:
            settle(p)
    for r in range(cfg.reps):
        for rw in RWS:
            for t in s.rotated(r):
                fio_record(s.res, f"qdjobs_{rw}", t, jpaths[t], rw, 1, per, runtime=rt,
                           engine="libaio", iodepth=JOB_DEPTH)
        log(f"  qdjobs rep {r + 1}: done")
    for t in s.targets:
        for i in range(JOBS):
            s.removed(t, f"qdj{i}")
    for rw in RWS:
        s.res.note(f"qdjobs_{rw}", f"{JOBS} fio jobs at once, one per {per // MiB} MiB file "
                   f"(vdiskfs: {JOBS} VDisks), libaio O_DIRECT iodepth {JOB_DEPTH} each, "
                   f"{rt} s, caches dropped first; IOPS of all jobs together")

    # ---- ext4 on a loop device with --direct-io=on, on an image on each target
    img_size = size + 256 * MiB
    dio = {}
    with contextlib.ExitStack() as st:
        epaths = {}
        for t in s.targets:
            image = s.file(t, "qdext4img")
            fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, img_size)
            finally:
                os.close(fd)
            st.callback(s.removed, t, "qdext4img")
            dev = st.enter_context(loop_device(image, direct_io=True))
            dio[t] = loop_dio(dev)
            timed_run(["mkfs.ext4", "-q", "-F", "-E",
                       "lazy_itable_init=0,lazy_journal_init=0", dev])
            mnt = st.enter_context(mounted(dev, s.p(f"qdext4-{t}")))
            epaths[t] = os.path.join(mnt, "fio")
            s.data.write_file(epaths[t], size, MiB)
            syncfs(mnt)
        for p in epaths.values():
            settle(p)
        s.res.info["qdext4_loop_dio"] = dio
        depth_runs(s, "qdext4", epaths, size)
        drop_caches()
    off = [t for t, v in dio.items() if not v]
    for fid in qd_fids("qdext4"):
        s.res.note(fid, f"ext4 (eager init) on a loop device attached with --direct-io=on on a "
                   f"{img_size // MiB} MiB image on each target; fio libaio O_DIRECT on a "
                   f"{size // MiB} MiB file in it, {rt} s runs, caches dropped before each"
                   + (f"; loop direct I/O refused by the backing file on {', '.join(off)} "
                      "(buffered loop there)" if off else "; loop direct I/O on for all"))
