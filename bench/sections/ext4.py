"""Section ext4: ext4 on a loop device on an image file on each file target: mkfs, write
the workload's files + syncfs, cold read back. The workload and mkfs are also the fresh
section's."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from bench.common import KiB, MiB, Config, drop_caches, log, read_file, syncfs, timed_run
from bench.mounts import loop_mount

if TYPE_CHECKING:
    from bench.suite import Suite


def ext4_files(cfg: Config) -> list[tuple[str, int]]:
    (nb, sb), (ns, ss) = cfg.ext4_big, cfg.ext4_small
    return ([(f"big/{i:03d}", sb) for i in range(nb)]
            + [(f"small/{i // 250:02d}/{i:04d}", ss) for i in range(ns)])


def ext4_write(s: Suite, root: str, rewrite: bool = False) -> float:
    """Write (or rewrite in place) the workload's files and syncfs: seconds."""
    t = time.perf_counter()
    off = 7 * MiB + 4096 if rewrite else 0   # other bytes than the first write
    for name, size in ext4_files(s.cfg):
        path = os.path.join(root, name)
        if not rewrite:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | (0 if rewrite else os.O_CREAT | os.O_TRUNC), 0o644)
        try:
            s.data.write_fd(fd, size, MiB, off)
        finally:
            os.close(fd)
        off += size + 4096
    syncfs(root)
    return time.perf_counter() - t


def ext4_read(cfg: Config, root: str) -> float:
    t = time.perf_counter()
    total = 0
    for name, size in ext4_files(cfg):
        total += read_file(os.path.join(root, name))[1]
    expect = sum(s for _, s in ext4_files(cfg))
    if total != expect:
        raise RuntimeError(f"ext4 read back {total} bytes of {expect}")
    return time.perf_counter() - t


def mkfs_ext4(cfg: Config, image: str) -> float:
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, cfg.ext4_image)
    finally:
        os.close(fd)
    return timed_run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                      image])


def measure(s: Suite) -> None:
    s.mount_targets()
    cfg = s.cfg
    mnt = s.p("ext4mnt")
    for r in range(cfg.reps):
        for t in s.rotated(r):
            image = s.file(t, "ext4img")
            s.res.add("ext4_mkfs", t, mkfs_ext4(cfg, image))
            with loop_mount(image, mnt):
                w = ext4_write(s, mnt)
                drop_caches()
                ext4_read(cfg, mnt)   # settling read, see common.settle()
                drop_caches()
                rd = ext4_read(cfg, mnt)
            s.res.add("ext4_write", t, w)
            s.res.add("ext4_read", t, rd)
            s.res.add("ext4_total", t, w + rd)
            s.removed(t, "ext4img")
            log(f"  ext4 rep {r + 1} {t}: write {w:.2f} s, read {rd:.2f} s")
    total = sum(size for _, size in ext4_files(cfg)) / MiB
    (nb, sb), (ns, ss) = cfg.ext4_big, cfg.ext4_small
    s.res.note("ext4_total", f"{cfg.ext4_image // MiB} MiB image, {nb} x "
               f"{sb // MiB} MiB + {ns} x {ss // KiB} KiB files ({total:.0f} MiB)")
    s.res.note("ext4_read", "caches dropped; the second read after writing")
