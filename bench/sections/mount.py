"""Section mount: mount time, daemon RSS (after mount, and after ls -l, status and a read
of each VDisk) and metadata size of an engine-built pool of 16 VDisks x 64 GiB (1 TiB of
address space) with 4 GiB mapped each; umount (checkpoint) time."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from bench.common import GiB, MiB, drop_caches, log, meta_bytes, rss_mib, run

if TYPE_CHECKING:
    from bench.suite import Suite


def measure(s: Suite) -> None:
    c = s.cfg
    pool, mnt = s.big_pool(), s.p("vb")
    space = c.big_vdisks * c.big_vdisk_size
    mapped = c.big_vdisks * c.big_mapped
    s.res.add("mount_meta", "vdiskfs", meta_bytes(pool) / MiB)
    for r in range(c.reps):
        drop_caches()
        with s.vdiskfs_mount(pool, mnt) as m:
            dt, pid = m.mount_s, m.pid
            s.res.add("mount_time", "vdiskfs", dt)
            s.res.add("mount_rss", "vdiskfs", rss_mib(pid)[0])
            run(["ls", "-l", mnt])
            with open(os.path.join(mnt, ".ctl", "status")) as f:
                f.read()
            for i in range(c.big_vdisks):
                with open(os.path.join(mnt, f"V{i:02d}"), "rb") as f:
                    f.read(MiB)
            rss, hwm = rss_mib(pid)
            s.res.add("mount_rss_used", "vdiskfs", rss)
            s.res.info.setdefault("mount_vmhwm_mib", []).append(hwm)
            s.res.add("umount_time", "vdiskfs", m.umount())
        log(f"  mount rep {r + 1}: {dt:.2f} s")
    label = f"{space / GiB:.0f} GiB space / {mapped / GiB:.0f} GiB mapped"
    for fid in ("mount_time", "mount_rss", "mount_rss_used", "mount_meta", "umount_time"):
        s.res.note(fid, f"{c.big_vdisks} VDisks, {label}, engine-built")
