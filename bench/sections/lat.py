"""Section lat: latency of 4 KiB O_DIRECT writes (one writer thread, os.pwrite of an
aligned buffer at random 4 KiB offsets in a mapped VDisk of the 1 TiB / 64 GiB pool)
while the daemon checkpoints because its journal passed CHECKPOINT_JOURNAL_BYTES: max and
p99 of the writes overlapping the checkpoint, against the same writer on the same pool
without a checkpoint. The journal is grown past the limit with the engine before the
mount (renames of one VDisk between two 64-character names: records that leave the checkpointed
state as it was), so the daemon's first commit is a journal-size checkpoint of the whole
state; the bench triggers that commit with an fsync of another VDisk (one of the writer's own
would hold its inode lock in the kernel for the whole fsync).

The umount case is n/a: ``vdiskfs umount`` refuses while a VDisk is open, and its
checkpoint runs after the kernel has detached the mount, so no write can overlap it."""

from __future__ import annotations

import mmap
import os
import random
import statistics
import threading
import time
from typing import TYPE_CHECKING

from bench.common import MiB, log
from vdiskfs.cow import layout
from vdiskfs.cow.commit import CHECKPOINT_JOURNAL_BYTES
from vdiskfs.cow.pool import Pool

if TYPE_CHECKING:
    from bench.suite import Suite

PRE_S = 1.0          # writer alone before the fsync (well under the 5 s commit interval)
FIDS = ("lat_ckpt_max", "lat_ckpt_p99", "lat_ckpt_time", "lat_umount_max", "lat_umount_p99")


class Writer(threading.Thread):
    """4 KiB O_DIRECT pwrites at random aligned offsets below ``span``: (start, end)
    perf_counter pairs."""

    def __init__(self, path: str, span: int):
        super().__init__(daemon=True)
        self.path, self.span = path, span
        self.stop = threading.Event()
        self.times: list[tuple[float, float]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, 4096)
                buf.write(os.urandom(4096))
                rnd = random.Random(12)
                blocks = self.span // 4096
                while not self.stop.is_set():
                    off = rnd.randrange(blocks) * 4096
                    t0 = time.perf_counter()
                    os.pwrite(fd, buf, off)
                    self.times.append((t0, time.perf_counter()))
            finally:
                os.close(fd)
        except BaseException as e:   # reported by finish()
            self.error = e

    def finish(self) -> list[tuple[float, float]]:
        self.stop.set()
        self.join(60)
        if self.error:
            raise RuntimeError(f"writer: {self.error}")
        return self.times


def p99(lat_ms: list[float]) -> float:
    return statistics.quantiles(lat_ms, n=100, method="inclusive")[98] if len(lat_ms) > 1 \
        else lat_ms[0]


def last_checkpoint_line(pool: str) -> str | None:
    """The daemon's own account of its last checkpoint (size, time on the loop)."""
    try:
        with open(os.path.join(pool, layout.LOG), errors="replace") as f:
            lines = [ln.split(": ", 1)[-1].strip() for ln in f if "checkpoint: " in ln]
    except OSError:
        return None
    return lines[-1] if lines else None


def grow_journal(pool: str, name: str, beyond: int) -> int:
    """Rename ``name`` back and forth until the journal is ``beyond`` bytes; ends named
    ``name``. Returns the journal size."""
    jpath = os.path.join(pool, layout.JOURNAL)
    p = Pool(pool)
    try:
        vd = p.lookup(name)
        alt = ["R" + "a" * 63, "R" + "b" * 63]   # names: at most 64 characters
        i = 0
        while True:
            for _ in range(5000):
                p.rename(vd, alt[i % 2])
                i += 1
            p.rename(vd, name)
            p.sync()
            if os.path.getsize(jpath) > beyond:
                break
    finally:
        p.close(commit=False)   # no checkpoint: the journal stays for the daemon
    return os.path.getsize(jpath)


def measure(s: Suite) -> None:
    c = s.cfg
    pool, mnt = s.big_pool(), s.p("vl")
    jpath = os.path.join(pool, layout.JOURNAL)
    vd, spare = "V01", "V15"
    span = c.big_mapped
    for r in range(c.reps):
        # baseline: the same writer, no checkpoint (the ordinary 5 s commits may run)
        with s.vdiskfs_mount(pool, mnt):
            w = Writer(os.path.join(mnt, vd), span)
            w.start()
            time.sleep(PRE_S + c.lat_seconds)
            lat = [(b - a) * 1000 for a, b in w.finish()]
        s.res.add("lat_ckpt_max", "no-ckpt", max(lat))
        s.res.add("lat_ckpt_p99", "no-ckpt", p99(lat))

        js = grow_journal(pool, spare, CHECKPOINT_JOURNAL_BYTES + MiB)
        with s.vdiskfs_mount(pool, mnt) as m:
            j_mounted = os.path.getsize(jpath)
            s.res.info.setdefault("lat_mount_s_big_journal", []).append(round(m.mount_s, 2))
            if j_mounted <= CHECKPOINT_JOURNAL_BYTES:
                raise RuntimeError(f"journal {j_mounted} B right after mount: the mount "
                                   "checkpointed; nothing to measure")
            w = Writer(os.path.join(mnt, vd), span)
            w.start()
            time.sleep(PRE_S)
            # The fsync goes to another VDisk: it commits the whole pool all the same, and
            # an fsync of the writer's own file would hold that inode's lock in the kernel
            # (fuse_fsync) for its whole length: the writer would wait on the kernel, not on
            # the daemon.
            fd = os.open(os.path.join(mnt, spare), os.O_WRONLY)
            try:
                ta = time.perf_counter()
                os.fsync(fd)     # the commit that finds the journal past the limit
                tb = time.perf_counter()
            finally:
                os.close(fd)
            time.sleep(c.lat_seconds)
            times = w.finish()
            j_after = os.path.getsize(jpath)
        if j_after >= CHECKPOINT_JOURNAL_BYTES:
            raise RuntimeError(f"journal still {j_after} B after the fsync: no checkpoint")
        during = [(b - a) * 1000 for a, b in times if b >= ta and a <= tb]
        if not during:
            raise RuntimeError("no write overlapped the checkpoint")
        s.res.add("lat_ckpt_max", "vdiskfs", max(during))
        s.res.add("lat_ckpt_p99", "vdiskfs", p99(during))
        s.res.add("lat_ckpt_time", "vdiskfs", tb - ta)
        s.res.info.setdefault("lat_ckpt", []).append(
            {"journal_bytes": js, "writes_during": len(during), "checkpoint_s": tb - ta,
             "writes_total": len(times), "journal_after": j_after,
             "daemon": last_checkpoint_line(pool)})
        log(f"  lat rep {r + 1}: checkpoint {tb - ta:.2f} s, {len(during)} writes during it,"
            f" max {max(during):.1f} ms, p99 {p99(during):.1f} ms; without: max "
            f"{max(lat):.1f} ms; daemon: {s.res.info['lat_ckpt'][-1]['daemon']}")
    why = ("vdiskfs umount refuses while a VDisk is open, and its checkpoint runs after the "
           "kernel detached the mount: no write can overlap it (see umount_time)")
    for fid in ("lat_umount_max", "lat_umount_p99"):
        s.res.set_na(fid, "vdiskfs", why)
    label = (f"{c.big_vdisks} VDisks, {c.big_vdisks * c.big_vdisk_size >> 30} GiB space / "
             f"{c.big_vdisks * c.big_mapped >> 30} GiB mapped")
    for fid in ("lat_ckpt_max", "lat_ckpt_p99", "lat_ckpt_time"):
        s.res.note(fid, f"{label}; 4 KiB O_DIRECT pwrites at random offsets in {vd} "
                   f"({span >> 30} GiB mapped), one thread; vdiskfs: the writes overlapping "
                   f"the checkpoint the daemon ran because the journal was past "
                   f"{CHECKPOINT_JOURNAL_BYTES // MiB} MiB (grown by renames before the "
                   f"mount, triggered by an fsync of {spare}); no-ckpt: {PRE_S + c.lat_seconds:.0f} s of "
                   "the same writer on the same pool without a checkpoint; a write "
                   "that blocks for the whole checkpoint leaves few samples in the window "
                   "(info.lat_ckpt.writes_during), so p99 is then close to the max")
