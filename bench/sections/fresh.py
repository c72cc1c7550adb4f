"""Section fresh (vdiskfs only): writes into a freshly cloned VDisk, whose first writes
copy on write, against the same on an unshared VDisk: sequential overwrite + cold read,
fio random 4 KiB writes, ext4 rewriting its files in place."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from bench.common import KiB, MiB, drop_caches, fsync_dir, fsync_path, log, read_file, settle
from bench.mounts import clone, loop_mount
from bench.sections.ext4 import ext4_write, mkfs_ext4
from bench.sections.fio import fio_record

if TYPE_CHECKING:
    from bench.suite import Suite


def unlink_vdisk(mnt: str, name: str) -> None:
    """Remove a VDisk and commit, so that its chunks are freed before what follows."""
    os.unlink(os.path.join(mnt, name))
    fsync_dir(mnt)


def measure(s: Suite) -> None:
    s.mount_targets()
    mnt = s.main_mnt
    n = s.cfg.fresh_bytes
    chunks = n // (256 * KiB)   # the default chunk size: one 4K write per chunk on average
    a = os.path.join(mnt, "A")
    s.data.write_file(a, n, MiB)
    # ext4 image VDisk E holding the workload's files
    e = os.path.join(mnt, "E")
    emnt = s.p("ext4mnt")
    mkfs_ext4(s.cfg, e)
    with loop_mount(e, emnt):
        ext4_write(s, emnt)
    fsync_path(e)
    for r in range(s.cfg.reps):
        # sequential: unshared A, then a fresh clone of it
        s.res.add("fresh_seq_write", "unshared",
                  n / MiB / s.data.write_file(a, n, MiB, create=False, trunc=False))
        settle(a)
        drop_caches()
        s.res.add("fresh_seq_read", "unshared", n / MiB / read_file(a)[0])
        c = f"C{r}"
        clone(mnt, "A", c)
        cp = os.path.join(mnt, c)
        drop_caches()
        s.res.add("fresh_seq_read", "vdiskfs", n / MiB / read_file(cp)[0])
        s.res.add("fresh_seq_write", "vdiskfs",
                  n / MiB / s.data.write_file(cp, n, MiB, create=False, trunc=False))
        unlink_vdisk(mnt, c)
        # fio: the section-2 job (timed runs), then the worst case: as many random 4K
        # writes as the VDisk has chunks, so that most are a chunk's first
        if s.have["fio"]:
            for direct, fid, ios in ((1, "fresh_fio_randwrite_direct", None),
                                     (0, "fresh_fio_randwrite_buffered", None),
                                     (1, "fresh_randwrite_direct", chunks),
                                     (0, "fresh_randwrite_buffered", chunks)):
                runtime = None if ios else s.cfg.fio_runtime
                fio_record(s.res, fid, "unshared", a, "randwrite", direct, n, runtime, ios)
                d = f"D{r}{direct}"
                clone(mnt, "A", d)
                fio_record(s.res, fid, "vdiskfs", os.path.join(mnt, d), "randwrite", direct, n,
                           runtime, ios)
                unlink_vdisk(mnt, d)
        # ext4: rewrite the files in place, on E unshared, then on a fresh clone of E
        with loop_mount(e, emnt):
            s.res.add("fresh_ext4_rewrite", "unshared", ext4_write(s, emnt, rewrite=True))
        fsync_path(e)
        f = f"F{r}"
        clone(mnt, "E", f)
        with loop_mount(os.path.join(mnt, f), emnt):
            s.res.add("fresh_ext4_rewrite", "vdiskfs", ext4_write(s, emnt, rewrite=True))
        unlink_vdisk(mnt, f)
        log(f"  fresh-clone rep {r + 1}: done")
    for x in ("A", "E"):
        os.unlink(os.path.join(mnt, x))
    fsync_dir(mnt)
    s.res.note("fresh_seq_write", f"{n // MiB} MiB VDisk of random data, overwritten "
               "in 1 MiB writes + fsync; vdiskfs = a clone made just before")
    s.res.note("fresh_seq_read", "caches dropped (unshared: after a settling read)")
    for fid in ("fresh_fio_randwrite_direct", "fresh_fio_randwrite_buffered"):
        s.res.note(fid, f"the fio job of section 2 ({s.cfg.fio_runtime} s, caches "
                   f"dropped, IOPS incl. a final fsync) on the {n // MiB} MiB VDisk; "
                   "vdiskfs = on a clone made just before")
    for fid in ("fresh_randwrite_direct", "fresh_randwrite_buffered"):
        s.res.note(fid, f"the worst case: {chunks} random 4K writes (one per 256 KiB), "
                   "caches dropped before, so most writes copy a cold chunk; IOPS "
                   "incl. a final fsync")
    s.res.note("fresh_ext4_rewrite", "the ext4 workload's files rewritten in place")
