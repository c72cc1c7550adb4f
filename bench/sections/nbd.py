"""Section nbd: the NBD server (docs/NBD.md) against the FUSE file of the same VDisk, in
one mount of a new pool served with ``--nbd unix:SOCK``: nbdcopy of a 1 GiB VDisk of
random data out (to /dev/null) and in (from a native file), against ``dd`` of the file
through the mount (cold, 1 MiB blocks; in: conv=fsync); and fio 4 KiB random reads and
writes at queue depth 1 and 16: fio's nbd engine (libnbd) against libaio O_DIRECT on the
file. Target "vdiskfs" is NBD, target "fuse" the file."""

from __future__ import annotations

import os
import shutil
import time
from typing import TYPE_CHECKING

from bench.common import MiB, drop_caches, log, run
from bench.sections.fio import fio, fio_record

if TYPE_CHECKING:
    from bench.suite import Suite

DEPTHS = (1, 16)


def measure(s: Suite) -> None:
    if shutil.which("nbdcopy") is None:
        for fid in ("nbd_copy_out", "nbd_copy_in"):
            s.res.set_na(fid, "vdiskfs", "nbdcopy not installed (libnbd-bin)")
        return
    n = s.cfg.qd_bytes
    sock = s.p("nbd.sock")
    mnt = s.p("nbd-mnt")
    src = s.p("nbd-src.img")
    s.data.write_file(src, n, MiB)
    with s.vdiskfs_mount(s.p("pool-nbd"), mnt, "--nbd", f"unix:{sock}"):
        uri = f"nbd+unix:///BIG?socket={sock}"
        big = os.path.join(mnt, "BIG")
        s.data.write_file(big, n, MiB)
        for r in range(s.cfg.reps):
            drop_caches()
            t = time.perf_counter()
            run(["nbdcopy", uri, "null:"])
            s.res.add("nbd_copy_out", "vdiskfs", n / MiB / (time.perf_counter() - t))
            drop_caches()
            t = time.perf_counter()
            run(["dd", f"if={big}", "of=/dev/null", "bs=1M", "status=none"])
            s.res.add("nbd_copy_out", "fuse", n / MiB / (time.perf_counter() - t))
            for target in ("vdiskfs", "fuse"):
                name = f"IN{r}{target}"
                path = os.path.join(mnt, name)
                with open(path, "wb") as f:
                    f.truncate(n)
                drop_caches()
                t = time.perf_counter()
                if target == "vdiskfs":
                    run(["nbdcopy", src, f"nbd+unix:///{name}?socket={sock}"])
                else:
                    run(["dd", f"if={src}", f"of={path}", "bs=1M", "conv=notrunc,fsync",
                         "status=none"])
                s.res.add("nbd_copy_in", target, n / MiB / (time.perf_counter() - t))
                os.unlink(path)
            for rw in ("randread", "randwrite"):
                for d in DEPTHS:
                    fid = f"nbd_{rw}_d{d}"
                    drop_caches()
                    got = fio("BIG", rw, 0, n, s.cfg.fio_runtime, engine="nbd", iodepth=d,
                              extra=(f"--uri={uri}", "--end_fsync=1"))
                    if "na" in got:
                        s.res.set_na(fid, "vdiskfs", got["na"])
                    else:       # writes: end_fsync is an NBD FLUSH
                        s.res.add(fid, "vdiskfs", got["ios"] / got["runtime_s"])
                    fio_record(s.res, fid, "fuse", big, rw, 1, n, runtime=s.cfg.fio_runtime,
                               engine="libaio", iodepth=d)
            log(f"  nbd rep {r + 1}: done")
    os.unlink(src)
    s.res.note("nbd_copy_out", f"{n // MiB} MiB of random data: nbdcopy to null: vs dd of "
               "the file to /dev/null, cold")
    s.res.note("nbd_copy_in", f"{n // MiB} MiB: nbdcopy from a native file vs dd "
               "conv=fsync into the file")
