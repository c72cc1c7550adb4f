"""Section scrub: ``vdiskfs scrub`` of a VDisk holding 1 GiB (quick: 256 MiB) of random
data against ``cat`` of the same VDisk through the mount, both from cold caches."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from bench.common import MiB, drop_caches, log, read_file, run
from bench.mounts import VDISKFS, VDISKFS_ENV

if TYPE_CHECKING:
    from bench.suite import Suite


def measure(s: Suite) -> None:
    size = s.cfg.seq_bytes
    pool, mnt = s.p("pool-scrub"), s.p("vs")
    with s.vdiskfs_mount(pool, mnt):
        path = os.path.join(mnt, "S")
        s.data.write_file(path, size, MiB)
        for r in range(s.cfg.reps):
            drop_caches()
            secs, n = read_file(path)
            s.res.add("scrub", "cat", n / MiB / secs)
            drop_caches()
            t = time.perf_counter()
            run(VDISKFS + ["scrub", "--mount", mnt], env=VDISKFS_ENV)
            s.res.add("scrub", "vdiskfs", size / MiB / (time.perf_counter() - t))
            log(f"  scrub rep {r + 1}: done")
        os.unlink(path)
    s.res.note("scrub", f"{size // MiB} MiB of random data, caches dropped before each: "
               "vdiskfs scrub (reads and checks every block in the daemon) against cat of "
               "the VDisk through the mount")
