"""Section fio: fio 4 KiB random writes and reads, O_DIRECT and buffered, on a file of
random data on the four file targets; fio_record is also the fresh section's job."""

from __future__ import annotations

import json
import subprocess
from typing import TYPE_CHECKING

from bench.common import MiB, Results, drop_caches, fsync_path, log, settle

if TYPE_CHECKING:
    from bench.suite import Suite

RUNS = [("randwrite", 1, "fio_randwrite_direct"), ("randread", 1, "fio_randread_direct"),
        ("randwrite", 0, "fio_randwrite_buffered"), ("randread", 0, "fio_randread_buffered")]


def fio(path: str | list[str], rw: str, direct: int, size: int,
        runtime: float | None = None, number_ios: int | None = None, *,
        engine: str = "psync", iodepth: int = 1, randommap: bool = False,
        extra: tuple[str, ...] = ()) -> dict:
    """One fio run (one job per file when ``path`` is a list, reported as a group);
    returns {"iops", "ios", "runtime_s"} or {"na": reason}. ``size`` is per file."""
    paths = [path] if isinstance(path, str) else list(path)
    cmd = ["fio", f"--size={size}", f"--rw={rw}", "--bs=4k", f"--ioengine={engine}",
           f"--iodepth={iodepth}", f"--direct={direct}", "--randrepeat=0",
           "--allow_file_create=0", "--output-format=json", "--group_reporting"]
    if not randommap:
        cmd.append("--norandommap")
    if runtime:
        cmd += [f"--runtime={runtime}", "--time_based"]
    if number_ios:
        cmd += [f"--number_ios={number_ios}"]
    cmd += list(extra)
    for i, fp in enumerate(paths):   # global options above, one job per file below
        cmd += [f"--name=bench{i}", f"--filename={fp}"]
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
        raise RuntimeError(f"fio {rw} direct={direct} on {paths[0]} failed: {err}")
    side = job["write" if "write" in rw else "read"]
    return {"iops": side["iops"], "ios": side["total_ios"], "runtime_s": side["runtime"] / 1000}


def fio_record(res: Results, fid: str, target: str, path: str | list[str], rw: str,
               direct: int, size: int, runtime: float | None = None,
               number_ios: int | None = None, drop: bool = True, **kw) -> float | None:
    """One measurement of ``fid`` for ``target``, or n/a if it refuses O_DIRECT: IOPS (for
    writes: the I/Os over fio's runtime plus an fsync of the file after it: write-back
    included); caches dropped first (unless ``drop`` is false). ``kw`` goes to fio().
    Returns the value recorded (None: n/a)."""
    if drop:
        drop_caches()
    r = fio(path, rw, direct, size, runtime, number_ios, **kw)
    if "na" in r:
        res.set_na(fid, target, r["na"])
        return None
    if "write" in rw:
        paths = [path] if isinstance(path, str) else path
        v = r["ios"] / (r["runtime_s"] + sum(fsync_path(p) for p in paths))
    else:
        v = r["iops"]
    res.add(fid, target, v)
    return v


def measure(s: Suite) -> None:
    with s.busy_hog():
        _measure(s)


def _measure(s: Suite) -> None:
    if not s.have["fio"]:
        for _, _, fid in RUNS:
            s.res.set_na(fid, "vdiskfs", "fio not installed (make bench installs it)")
        return
    s.mount_targets()
    size = s.cfg.fio_bytes
    for t in s.targets:
        s.data.write_file(s.file(t, "fio"), size, MiB)
        settle(s.file(t, "fio"))
    for r in range(s.cfg.reps):
        for rw, direct, fid in RUNS:
            for t in s.rotated(r):
                fio_record(s.res, fid, t, s.file(t, "fio"), rw, direct, size,
                           runtime=s.cfg.fio_runtime)
        log(f"  fio rep {r + 1}: done")
    for t in s.targets:
        s.removed(t, "fio")
    for rw, _, fid in RUNS:
        s.res.note(fid, f"{size // MiB} MiB file of random data, {s.cfg.fio_runtime} s"
                   " runs, caches dropped before each"
                   + ("; IOPS incl. an fsync after fio" if "write" in rw else ""))
