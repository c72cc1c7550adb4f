"""``.ctl/vdisks``: every VDisk and the pool's summary as one JSON document.

What ``vdiskfs list`` and ``vdiskfs info`` show, read through the mount (the pool itself
belongs to the daemon). Documented in docs/SPEC.md; ``format`` changes only when a field
changes meaning or goes away (new fields may be added).

A VDisk's ``state`` is the first that applies of: ``Error`` (reads failed their checksum
since the mount, or the last scrub found damage in it), ``cloning`` (an unfinished clone; ``progress`` holds its percent),
``clone source`` (a clone from it is running), ``in use`` (open, e.g. by a loop device)
and ``ok``.
"""

from __future__ import annotations

import json

from ..cow.meta import VDisk
from ..cow.pool import Pool
from .capacity import Capacity, provisioned

FORMAT = 1


def vdisk_state(pool: Pool, vd: VDisk, percent: dict[int, str],
                damaged: set[str] = frozenset()) -> tuple[str, int | None]:
    """(state, clone percent or None); ``percent``: job id -> what .ctl/status shows;
    ``damaged``: the VDisks the last scrub found damage in."""
    job_id = vd.props.get("clone_job")
    progress = None
    if job_id is not None:
        shown = percent.get(job_id, "0%")
        progress = int(shown[:-1]) if shown.endswith("%") else 99
    if pool.data.damage.errors.get(vd.vid) or vd.name in damaged:
        return "Error", progress
    if progress is not None:
        return "cloning", progress
    if pool.clones.busy_source(vd):
        return "clone source", None
    if pool.open_count.get(vd.vid):
        return "in use", None
    return "ok", None


def vdisk_record(pool: Pool, vd: VDisk, percent: dict[int, str], damaged: set[str],
                 nbd: dict[int, int]) -> dict:
    state, progress = vdisk_state(pool, vd, percent, damaged)
    usage = pool.usage(vd)
    return {
        "name": vd.name, "size": vd.size, "allocated": usage["allocated"],
        "unique": usage["unique"], "shared": usage["shared"],
        "lba_size": vd.props["lba_size"], "serial": vd.props["serial"],
        "state": state, "progress": progress,
        "errors": pool.data.damage.errors.get(vd.vid, 0),
        "open": pool.open_count.get(vd.vid, 0),
        "nbd": nbd.get(vd.vid, 0),               # NBD connections serving it (in "open")
        "mtime_ns": vd.props["mtime_ns"], "ctime_ns": vd.props["ctime_ns"],
    }


def render(pool: Pool, capacity: Capacity, percent: dict[int, str],
           damaged: set[str] = frozenset(), nbd: dict[int, int] | None = None) -> bytes:
    vdisks = [vdisk_record(pool, vd, percent, damaged, nbd or {})
              for vd in sorted(pool.vdisks(), key=lambda v: v.name)]
    b = capacity.check()
    stored = pool.meta.slots_in_use() * pool.chunk_size
    referenced = sum(v["allocated"] for v in vdisks)
    summary = {
        "path": pool.path, "uuid": pool.uuid, "chunk_size": pool.chunk_size,
        "vdisks": len(vdisks),
        "provisioned": provisioned(pool),      # sizes added up
        "referenced": referenced,              # allocated added up (shared counted per VDisk)
        "stored": stored,                      # chunk data, each shared chunk once
        "saved": max(referenced - stored, 0),  # what sharing saves
        "used": pool.used_bytes(),             # chunk data + metadata on the backing fs
        "backing_capacity": b.capacity, "backing_used": b.used, "backing_avail": b.avail,
        "backing_percent": round(b.percent, 1),
        "warnings": capacity.warnings(b),
    }
    doc = {"format": FORMAT, "pool": summary, "vdisks": vdisks}
    return (json.dumps(doc, indent=1) + "\n").encode()
