"""What the sections share in one run: the configuration, the results, the work directory,
the exit stack that undoes the mounts, the random data, which baseline tools are
installed, and the four file targets (native, bindfs, pyfloor, vdiskfs) mounted once for
the sections that compare them."""

from __future__ import annotations

import contextlib
import os
import shutil

from bench import mounts, pools
from bench.common import (GiB, Config, RandomData, Results, cpu_hog, disk_read_ahead, fsync_dir,
                          log, read_ahead_kb)

TOOLS = ("bindfs", "fio", "mkfs.xfs", "qemu-img")


class Suite:
    def __init__(self, cfg: Config, workdir: str, res: Results, stack: contextlib.ExitStack):
        self.cfg = cfg
        self.w = workdir
        self.res = res
        self.stack = stack
        self.data = RandomData()
        self.have = {t: shutil.which(t) is not None for t in TOOLS}
        self.targets: dict[str, str] = {}   # target -> directory where its files go
        self.pids: dict[str, int] = {}      # the Python daemons' pids (CPU per request)
        self.main_pool = os.path.join(workdir, "pool-main")
        self.main_mnt = os.path.join(workdir, "vd")

    def p(self, *parts: str) -> str:
        return os.path.join(self.w, *parts)

    def rotated(self, r: int) -> list[str]:
        names = list(self.targets)
        k = r % len(names)
        return names[k:] + names[:k]

    def busy_hog(self):
        """With --busy: a plain CPU hog (one core) for the duration of the block (the 4K
        rows), killed by its pid afterwards; otherwise nothing."""
        return cpu_hog(self.res) if self.cfg.busy else contextlib.nullcontext()

    def big_pool(self) -> str:
        """The engine-built pool of the mount and lat sections (16 VDisks x 64 GiB, 4 GiB
        mapped each), built on first use."""
        pool = self.p("pool-big")
        if os.path.exists(pool):
            return pool
        c = self.cfg
        specs = [(f"V{i:02d}", c.big_vdisk_size, c.big_mapped, False)
                 for i in range(c.big_vdisks)]
        bt = self.build_pool(pool, specs)
        space = c.big_vdisks * c.big_vdisk_size
        mapped = c.big_vdisks * c.big_mapped
        self.res.info["big_pool"] = {"build_s": bt, "vdisks": c.big_vdisks,
                                     "space_bytes": space, "mapped_bytes": mapped}
        log(f"  big pool built in {bt:.1f} s ({space / GiB:.0f} GiB space, "
            f"{mapped / GiB:.0f} GiB mapped)")
        return pool

    def vdiskfs_mount(self, pool: str, mnt: str, *extra: str) -> mounts.VdiskfsMount:
        """A mount of ``pool``; a pool it creates gets the run's --chunk-size."""
        return mounts.VdiskfsMount(pool, mnt, *extra, chunk_size=self.cfg.chunk_size)

    def build_pool(self, path: str, specs: list[tuple[str, int, int, bool]]) -> float:
        """pools.build_pool with the run's random data and --chunk-size."""
        return pools.build_pool(path, specs, self.data, self.cfg.chunk_size)

    # ---------------------------------------------------------- the four file targets
    def mount_targets(self) -> None:
        if self.targets:
            return
        st = self.stack
        native = self.p("native")
        os.makedirs(native)
        self.targets["native"] = native
        if self.have["bindfs"]:
            how = st.enter_context(mounts.bindfs_mount(self.p("bindfs-src"), self.p("bindfs"),
                                                       self.p("bindfs.log")))
            self.targets["bindfs"] = self.p("bindfs")
            self.res.info["bindfs_mount"] = how
        else:
            self.res.info["bindfs_mount"] = "bindfs not installed (make bench installs it)"
        self.pids["pyfloor"] = st.enter_context(mounts.passthrough_mount(
            self.p("pt-src"), self.p("pt"), self.p("pt.log")))
        self.targets["pyfloor"] = self.p("pt")
        self.pids["vdiskfs"] = st.enter_context(
            self.vdiskfs_mount(self.main_pool, self.main_mnt)).pid
        self.targets["vdiskfs"] = self.main_mnt
        self.res.info["read_ahead_kb"] = {t: read_ahead_kb(d) for t, d in self.targets.items()
                                          if t != "native"}
        self.res.info["read_ahead_kb"]["native"] = disk_read_ahead(native)

    def file(self, target: str, name: str) -> str:
        return os.path.join(self.targets[target], name)

    def removed(self, target: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file(target, name))
        fsync_dir(self.targets[target])
