"""Section clone: time from the clone command to Completed for 1 GiB of random data and
16 and 64 GiB mapped (engine-built, see pools.build_pool); clone of a clone; metadata
bytes per clone; baselines: XFS reflink (cp and FICLONE), a full cp, a qcow2 overlay."""

from __future__ import annotations

import fcntl
import os
import time
from typing import TYPE_CHECKING

from bench.common import KiB, MiB, GiB, fsync_dir, fsync_path, log, meta_bytes, run, timed_run
from bench.mounts import clone, ctl, loop_mount

if TYPE_CHECKING:
    from bench.suite import Suite

FICLONE = 0x40049409   # _IOW(0x94, 9, int)


def measure(s: Suite) -> None:
    gibs = s.cfg.clone_gib
    pool, mnt = s.p("pool-clone"), s.p("vc")
    specs = [(f"S{g}", g * GiB, g * GiB, g == 1) for g in gibs]
    bt = s.build_pool(pool, specs)
    s.res.info["clone_pool_build_s"] = bt
    log(f"  clone pool built in {bt:.1f} s ({sum(gibs)} GiB mapped)")
    # metadata per clone: journal growth, and growth of the checkpointed state
    for g in gibs:
        with s.vdiskfs_mount(pool, mnt):
            m0 = meta_bytes(pool)
            clone(mnt, f"S{g}", f"M{g}")
            m1 = meta_bytes(pool)
        with s.vdiskfs_mount(pool, mnt):
            m2 = meta_bytes(pool)
        s.res.add(f"clone_meta_journal_{g}g", "vdiskfs", m1 - m0)
        s.res.add(f"clone_meta_ckpt_{g}g", "vdiskfs", m2 - m0)
    # times: clone, clone of a clone (of M{g})
    with s.vdiskfs_mount(pool, mnt):
        for r in range(s.cfg.reps):
            for g in gibs:
                s.res.add(f"clone_{g}g", "vdiskfs", 1000 * clone(mnt, f"S{g}", f"T{g}_{r}"))
                s.res.add(f"clone2_{g}g", "vdiskfs", 1000 * clone(mnt, f"M{g}", f"U{g}_{r}"))
                for x in (f"T{g}_{r}", f"U{g}_{r}"):
                    os.unlink(os.path.join(mnt, x))
                fsync_dir(mnt)
            ctl(mnt, "purge")
            log(f"  clone rep {r + 1}: done")
    for g in gibs:
        what = ("random data" if g == 1 else
                "engine-built, every chunk mapped, sparse data file (see build_pool)")
        s.res.note(f"clone_{g}g", f"{g} GiB mapped, {what}; command to Completed")
    baselines(s)


def baselines(s: Suite) -> None:
    reps = s.cfg.reps
    # full copy and qcow2 overlay of a 1 GiB file of random data on the backing fs
    src = s.p("native-clone", "src1")
    os.makedirs(os.path.dirname(src), exist_ok=True)
    s.data.write_file(src, GiB, MiB)
    for r in range(reps):
        dst = s.p("native-clone", f"copy{r}")
        s.res.add("clone_1g", "cp-full", 1000 * timed_run(["cp", "--sparse=always", src, dst]))
        os.unlink(dst)
        if s.have["qemu-img"]:
            q = s.p("native-clone", f"ovl{r}.qcow2")
            s.res.add("clone_1g", "qemu-img", 1000 * timed_run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", src, "-F", "raw", q]))
            os.unlink(q)
    if not s.have["qemu-img"]:
        s.res.set_na("clone_1g", "qemu-img", "qemu-img not installed")
    s.res.note("clone_1g", "cp-full: cp --sparse=always of a 1 GiB file in the page "
               "cache; qemu-img: create -f qcow2 -b SRC -F raw")
    # XFS reflink
    if not s.have["mkfs.xfs"]:
        s.res.set_na("clone_1g", "xfs-reflink", "xfsprogs not installed")
        return
    img, xmnt = s.p("xfs.img"), s.p("xfs")
    with open(img, "wb") as f:
        f.truncate(24 * GiB)
    run(["mkfs.xfs", "-q", "-m", "reflink=1", img])
    with loop_mount(img, xmnt):
        s1 = os.path.join(xmnt, "src1")
        s.data.write_file(s1, GiB, MiB)
        s1f = sparse_mapped(os.path.join(xmnt, "src1f"), GiB)
        s16 = sparse_mapped(os.path.join(xmnt, "src16"), 16 * GiB)
        s.res.info["xfs_data_extents"] = {os.path.basename(x): xfs_extents(x)
                                          for x in (s1, s1f, s16)}
        for r in range(reps):
            for fid, src, name in (("clone_1g", s1, "xfs-reflink"),
                                   ("clone_1g", s1f, "xfs-reflink-frag"),
                                   ("clone_16g", s16, "xfs-reflink")):
                d = os.path.join(xmnt, f"r{r}")
                t = timed_run(["cp", "--reflink=always", src, d])
                t2 = t + fsync_path(d)
                s.res.add(fid, name, 1000 * t)
                os.unlink(d)
                if name == "xfs-reflink":
                    s.res.add(fid, "xfs-reflink+fsync", 1000 * t2)
                    s.res.add(fid, "xfs-ficlone+fsync", 1000 * ficlone(src, d))
                    os.unlink(d)
    s.res.note("clone_1g", "xfs-reflink: cp --reflink=always of a 1 GiB file written "
               "sequentially (few extents: the best case for XFS); -frag: of a 1 GiB "
               "file with one 4 KiB block per 256 KiB (4096 extents: as many as vdiskfs "
               "has chunks)")
    s.res.note("clone_1g", "xfs-ficlone+fsync: the FICLONE ioctl and an fsync in this "
               "process (no cp to start; durable, like a vdiskfs clone)")
    s.res.note("clone_16g", "xfs-reflink: a 16 GiB file with one 4 KiB block written per "
               "256 KiB (as many extents as vdiskfs has mapped chunks)")


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


def xfs_extents(path: str) -> int | None:
    """Data extents (mapping records, holes not counted) of a file on XFS."""
    p = run(["xfs_bmap", path], check=False)
    if p.returncode:
        return None
    return sum(1 for ln in p.stdout.splitlines()[1:] if "hole" not in ln)
