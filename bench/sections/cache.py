"""Section cache: buffered fio 4 KiB random reads (psync, iodepth 1) on the four file
targets, warm (after a full read of the file, --norandommap --invalidate=0: every read is
a page-cache hit where the cache was kept) and cold misses (caches dropped, fio's random
map so no block is read twice, --invalidate=1, fadvise RANDOM so no read-ahead, on a file
larger than one run touches)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.common import MiB, drop_caches, log, read_file, settle
from bench.sections.fio import fio_record

if TYPE_CHECKING:
    from bench.suite import Suite

FIDS = ("cache_randread_warm", "cache_randread_miss")


def measure(s: Suite) -> None:
    with s.busy_hog():
        _measure(s)


def _measure(s: Suite) -> None:
    if not s.have["fio"]:
        for fid in FIDS:
            s.res.set_na(fid, "vdiskfs", "fio not installed (make bench installs it)")
        return
    s.mount_targets()
    cfg = s.cfg
    wsize, msize, rt = cfg.fio_bytes, cfg.qd_bytes, cfg.fio_runtime
    for t in s.targets:
        s.data.write_file(s.file(t, "cachew"), wsize, MiB)
        s.data.write_file(s.file(t, "cachem"), msize, MiB)
        settle(s.file(t, "cachem"))
    touched = []
    for r in range(cfg.reps):
        for t in s.rotated(r):
            drop_caches()
            read_file(s.file(t, "cachew"))    # the full read that warms the cache
            fio_record(s.res, "cache_randread_warm", t, s.file(t, "cachew"), "randread", 0,
                       wsize, runtime=rt, drop=False, extra=("--invalidate=0",))
        for t in s.rotated(r):
            v = fio_record(s.res, "cache_randread_miss", t, s.file(t, "cachem"), "randread",
                           0, msize, runtime=rt, randommap=True,
                           extra=("--invalidate=1", "--fadvise_hint=random"))
            if v:
                touched.append(v * rt * 4096 / msize)
        log(f"  cache rep {r + 1}: done")
    for t in s.targets:
        s.removed(t, "cachew")
        s.removed(t, "cachem")
    s.res.note("cache_randread_warm", f"{wsize // MiB} MiB file read in full first (cat-like, "
               f"1 MiB reads), then fio psync --norandommap --invalidate=0, {rt} s; measures "
               "hits only where the target keeps the page cache across opens")
    s.res.note("cache_randread_miss", f"{msize // MiB} MiB file, caches dropped first, fio "
               f"psync with its random map (no block read twice), --invalidate=1, "
               f"--fadvise_hint=random (no read-ahead), {rt} s: every read a miss of the "
               f"target's page cache (what the target does below it, e.g. read-ahead in its "
               f"backing file, is part of the figure); one run touched at most "
               f"{max(touched, default=0):.0%} of the file")
