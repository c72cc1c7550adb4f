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
  qd      fio 4 KiB randread/randwrite, O_DIRECT, libaio, iodepth 1, 4 and 16, cold, on
          a 1 GiB file of random data: the four file targets, and the scaling qd16/qd1
          per target (target: vdiskfs >= half of native's, reads); the same through ext4
          on a loop device attached with --direct-io=on on an image on each target; 4
          fio jobs at once on 4 files (vdiskfs: 4 VDisks), iodepth 4 each
  cache   buffered 4 KiB random reads, psync: warm (after a full read, --norandommap
          --invalidate=0) and cold misses (caches dropped, random map, --invalidate=1,
          fadvise RANDOM, 1 GiB file: no read twice, no read-ahead)
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
  lat     max and p99 of 4 KiB O_DIRECT write latencies while the daemon runs a
          journal-size checkpoint of the mount section's pool (journal grown past 64 MiB
          by renames before the mount), against the same writer without a checkpoint;
          the umount case is n/a (umount refuses while a VDisk is open)
  writer  a concurrent writer (1 MiB O_DIRECT writes to another VDisk) while clones of a
          64 GiB-mapped VDisk run back to back, against the writer alone
  scrub   vdiskfs scrub of 1 GiB (quick: 256 MiB) against cat of it, cold
  thin    fstrim of a deleted 4 GiB file (quick: 1 GiB) in an ext4 guest (time, space
          given back), mkfs.ext4 of 100 GiB (time, space held), cp --sparse=auto of a
          64 GiB image holding 256 MiB and 1 GiB; against an image on the native fs

--busy keeps one core loaded with a plain CPU hog (python -c 'while True: pass', killed
by its pid afterwards) during the 4K rows (sections fio, qd, cache); the JSON records it
(info.busy) and the 4K rows' target becomes vdiskfs >= 0.9x pyfloor.

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
import datetime
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
from bench import common  # noqa: E402
from bench.common import (GiB, RESULTS, Config, Results, fs_type, loadavg, log, run,  # noqa: E402
                          tail, tool_version)
from bench.report import render_table  # noqa: E402
from bench.sections import SECTIONS, measure_fn  # noqa: E402
# bench.mounts, bench.suite and the sections (and with them the engine) are imported in
# main() once it is a run: the writer process (--_writer) starts as lightly as before.


def run_section(res: Results, name: str, suite) -> None:
    log(f"section {name}")
    t = time.perf_counter()
    try:
        measure_fn(name)(suite)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        res.errors[name] = f"{type(e).__name__}: {e}"
        log(f"section {name} FAILED: {e}")
        traceback.print_exc()
    finally:
        res.section_seconds[name] = round(time.perf_counter() - t, 1)


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
    ap.add_argument("--busy", action="store_true",
                    help="a CPU hog on one core during the 4K rows (fio, qd, cache)")
    ap.add_argument("--dir", default="/var/tmp", help="where the work directory goes")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<time>.json)")
    ap.add_argument("--compare", default=None, metavar="OLD.json",
                    help="also print the change of each median against an earlier run")
    ap.add_argument("--show", default=None, metavar="RUN.json",
                    help="print the table of an earlier run and exit")
    ap.add_argument("--_writer", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._writer:
        from bench.sections.writer import writer_main
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
    from bench import mounts
    from bench.suite import TOOLS, Suite
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        log(f"warning: {', '.join(missing)} missing: those baselines will be n/a "
            "(`make bench` installs them)")

    cfg = Config.make(args.quick, args.reps)
    if args.chunk_size:
        from vdiskfs.cli import parse_size
        cfg.chunk_size = parse_size(args.chunk_size)
    cfg.busy = args.busy
    res = Results(cfg)
    if args.busy:
        res.info["busy"] = ("a CPU hog (python -c 'while True: pass') on one core during "
                            "the 4K rows (sections fio, qd, cache)")
    os.makedirs(args.dir, exist_ok=True)
    if fs_type(args.dir) == "tmpfs":
        log(f"warning: {args.dir} is a tmpfs: 'native' figures will be of memory")
    free = shutil.disk_usage(args.dir).free
    if free < 16 * GiB:
        log(f"warning: only {free / GiB:.1f} GiB free in {args.dir}; the suite needs ~12 GiB")
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="vdiskfs-bench-", dir=args.dir))
    common.WORKDIR = workdir
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
            suite = Suite(cfg, workdir, res, stack)
            for name in SECTIONS:
                if name in sections:
                    run_section(res, name, suite)
            log("unmounting")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        for name in ("pt.log", "bindfs.log"):
            text = tail(os.path.join(workdir, name), 2000)
            if text:
                res.info[name.replace(".", "_")] = text
        left = mounts.sweep(workdir)
        if left:
            log(f"warning: had to force-clean {left}")
            res.info["force_cleaned"] = left
        shutil.rmtree(workdir, ignore_errors=True)
    res.info["seconds"] = round(time.perf_counter() - t0, 1)
    res.info["daemon_log_warnings"] = mounts.DAEMON_WARNINGS
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
