"""Section thin: space that comes back and holes that show, vdiskfs against an image file
on the native filesystem (a sparse file through loop, as XFS/ext4 users run VMs).

- fstrim: ext4 on an 8 GiB image (quick: 2 GiB); a 4 GiB file (quick: 1 GiB) is written
  and synced, deleted, then ``fstrim`` runs: its time, and the share of the file's space
  the image gave back (st_blocks before the delete and after fstrim + fsync).
- mkfs.ext4 of a 100 GiB image with mke2fs's defaults (discard, lazy init): time and the
  space the image then holds.
- cp --sparse=auto of a 64 GiB image holding 256 MiB, and holding 1 GiB (random data in
  1 MiB extents spread over the image), to a file on the native filesystem: the time must
  follow the data held, not the size (SEEK_DATA/SEEK_HOLE)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from bench.common import GiB, MiB, fsync_path as _fsync, log, run, syncfs, timed_run
from bench.mounts import loop_mount

if TYPE_CHECKING:
    from bench.suite import Suite

TARGETS = ("native", "vdiskfs")


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def _new_image(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def fstrim(s: Suite, target: str) -> tuple[float, float]:
    """(fstrim seconds, share of the deleted file's space returned)."""
    image_size, file_size = (2 * GiB, 1 * GiB) if s.cfg.quick else (8 * GiB, 4 * GiB)
    image = s.file(target, "thinimg")
    _new_image(image, image_size)
    run(["mkfs.ext4", "-q", "-F", image])
    mnt = s.p("thinmnt")
    with loop_mount(image, mnt):
        s.data.write_file(os.path.join(mnt, "big"), file_size, MiB)
        syncfs(mnt)
        _fsync(image)
        before = _allocated(image)
        os.unlink(os.path.join(mnt, "big"))
        syncfs(mnt)
        secs = timed_run(["fstrim", mnt])
    _fsync(image)
    returned = (before - _allocated(image)) / file_size
    s.removed(target, "thinimg")
    return secs, returned


def mkfs_100g(s: Suite, target: str) -> tuple[float, int]:
    image = s.file(target, "thin100g")
    _new_image(image, 100 * GiB)
    secs = timed_run(["mkfs.ext4", "-q", "-F", image])
    _fsync(image)
    alloc = _allocated(image)
    s.removed(target, "thin100g")
    return secs, alloc


def cp_sparse(s: Suite, target: str, held: int) -> float:
    image = s.file(target, "thin64g")
    _new_image(image, 64 * GiB)
    extents = held // MiB
    stride = 64 * GiB // extents
    fd = os.open(image, os.O_WRONLY)
    try:
        for i in range(extents):
            os.pwrite(fd, s.data.piece(i * MiB, MiB), i * stride)
        os.fsync(fd)
    finally:
        os.close(fd)
    out = s.p("thin-copy")
    secs = timed_run(["cp", "--sparse=auto", image, out])
    copied = _allocated(out)
    os.unlink(out)
    s.removed(target, "thin64g")
    if copied > 2 * held:
        raise RuntimeError(f"cp --sparse=auto of {target} wrote {copied} bytes for "
                           f"{held} held: it saw no holes")
    return secs


def measure(s: Suite) -> None:
    s.mount_targets()
    for r in range(s.cfg.reps):
        for t in [x for x in s.rotated(r) if x in TARGETS]:
            trim, returned = fstrim(s, t)
            s.res.add("thin_fstrim", t, trim)
            s.res.add("thin_fstrim_returned", t, 100 * returned)
            secs, alloc = mkfs_100g(s, t)
            s.res.add("thin_mkfs_100g", t, secs)
            s.res.add("thin_mkfs_100g_alloc", t, alloc / MiB)
            for held, fid in ((256 * MiB, "thin_cp_sparse_256m"), (GiB, "thin_cp_sparse_1g")):
                s.res.add(fid, t, cp_sparse(s, t, held))
            log(f"  thin rep {r + 1} {t}: fstrim {trim:.2f} s, {100 * returned:.0f}% back, "
                f"mkfs 100G {secs:.2f} s holding {alloc / MiB:.0f} MiB")
    big = "1 GiB file in a 2 GiB" if s.cfg.quick else "4 GiB file in an 8 GiB"
    s.res.note("thin_fstrim", f"ext4 on a loop device: {big} image, deleted, then fstrim")
    s.res.note("thin_fstrim_returned", "share of the deleted file's bytes the image "
               "gave back (st_blocks), after fstrim and an fsync of the image")
    s.res.note("thin_mkfs_100g", "mkfs.ext4 with its defaults (discard, lazy init)")
    s.res.note("thin_cp_sparse_256m", "cp --sparse=auto of a 64 GiB image holding 1 MiB "
               "extents spread evenly, to the native filesystem")
