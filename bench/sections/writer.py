"""Section writer: a concurrent writer (1 MiB O_DIRECT writes to another VDisk) while
clones of a 64 GiB-mapped VDisk run back to back, against the writer alone. The writer
is a process of its own (``run.py --_writer``: no GIL shared with the clone loop)."""

from __future__ import annotations

import mmap
import os
import subprocess
import time
from typing import TYPE_CHECKING

from bench.common import BENCH, GiB, MiB, PY, fsync_dir, log
from bench.mounts import clone, ctl

if TYPE_CHECKING:
    from bench.suite import Suite


def measure(s: Suite) -> None:
    g = s.cfg.clone_gib[-1]
    pool, mnt = s.p("pool-writer"), s.p("vw")
    s.build_pool(pool, [(f"S{g}", g * GiB, g * GiB, False)])
    with s.vdiskfs_mount(pool, mnt):
        writer_part(s, mnt, f"S{g}")


def writer_part(s: Suite, mnt: str, src: str) -> None:
    wpath = os.path.join(mnt, "W")
    size = 256 * MiB
    s.data.write_file(wpath, size, MiB)
    secs = s.cfg.writer_seconds
    for r in range(s.cfg.reps):
        s.res.add("writer", "alone", WriterProc(wpath, secs, size).wait_result())
        w = WriterProc(wpath, secs, size)
        n = 0
        while w.running():
            clone(mnt, src, f"X{n}")
            os.unlink(os.path.join(mnt, f"X{n}"))
            n += 1
            if n % 10 == 0:
                ctl(mnt, "purge")
        s.res.add("writer", "vdiskfs", w.wait_result())
        s.res.add("writer_clones", "vdiskfs", n)
        ctl(mnt, "purge")
        log(f"  writer rep {r + 1}: {n} clones")
    os.unlink(wpath)
    fsync_dir(mnt)
    s.res.note("writer", f"{secs:.0f} s of 1 MiB O_DIRECT writes cycling over a 256 MiB "
               f"VDisk (fsync at the end), while clones of {src} run back to back; "
               "the baseline is the writer alone")


class WriterProc:
    """The concurrent writer runs in its own process (no GIL shared with the clone loop)."""

    def __init__(self, path: str, secs: float, size: int):
        self.proc = subprocess.Popen([PY, os.path.join(BENCH, "run.py"), "--_writer", path,
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
    """The writer process (run.py --_writer PATH SECONDS SIZE): prints MiB/s."""
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
