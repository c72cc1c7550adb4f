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


def fio_record(res: Results, fid: str, target: str, path: str, rw: str, direct: int,
               size: int, runtime: float | None = None, number_ios: int | None = None) -> None:
    """One measurement of ``fid`` for ``target``, or n/a if it refuses O_DIRECT: IOPS (for
    writes: the I/Os over fio's runtime plus an fsync of the file after it: write-back
    included); caches dropped first."""
    drop_caches()
    r = fio(path, rw, direct, size, runtime, number_ios)
    if "na" in r:
        res.set_na(fid, target, r["na"])
    elif "write" in rw:
        res.add(fid, target, r["ios"] / (r["runtime_s"] + fsync_path(path)))
    else:
        res.add(fid, target, r["iops"])


def measure(s: Suite) -> None:
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
