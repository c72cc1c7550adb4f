"""Helpers of the engine tests (no FUSE): the small geometry the t1 modules share, the
in-memory fsck of a Pool, crashes, data patterns.

Small geometry (4 KiB chunks, 4 entries per page) so that a few KiB of data cross chunk
and page boundaries and shared pages appear with a handful of chunks.
"""

from __future__ import annotations

import os
import random

from vdiskfs.cow.fsck import Report, check_page_refs, check_slot_refs, check_vdisks
from vdiskfs.cow.pool import Pool, create_pool

CS = 4096
PE = 4
SPAN = CS * PE          # bytes mapped by one page


def new_pool(tmp_path, chunk_size: int = CS, page_entries: int = PE) -> str:
    """Create a pool at TMP_PATH/pool with this geometry; returns its path."""
    p = str(tmp_path / "pool")
    create_pool(p, chunk_size, page_entries=page_entries)
    return p


def check(pool: Pool) -> Report:
    """Every refcount equals its references (fsck's checks, in memory) and nalloc is right."""
    r = Report()
    m = pool.meta
    check_vdisks(m, r)
    check_page_refs(m, r)
    check_slot_refs(m, os.fstat(pool.store.fd).st_size, r)
    assert not r.errors, r.errors
    for vd in m.vdisks.values():
        mapped = sum(PE - m.pages[pid].count(0) for pid in vd.ptab if pid)
        assert vd.nalloc == mapped, f"{vd.name}: nalloc {vd.nalloc} != {mapped} mapped"
    # No slot is handed out twice and no free-listed slot is in use.
    for s in pool.free_slots:
        assert s >= len(m.slot_ref) or m.slot_ref[s] == 0, f"free slot {s} is in use"
    assert len(set(pool.free_slots)) == len(pool.free_slots)
    return r


def crash(pool: Pool) -> None:
    """Drop the pool as a kill -9 would: no checkpoint, no commit of buffered records.
    ``close(commit=False)`` does exactly that: it closes the chunk store, the journal and
    the lock (``_lock_fd`` becomes -1) and writes nothing."""
    pool.close(commit=False)


def reopen_after_crash(pool: Pool) -> Pool:
    """crash() the pool, then open it again as the next mount would (journal replay)."""
    crash(pool)
    return Pool(pool.path)


def pattern(n: int, seed: int) -> bytes:
    """n bytes with no zero byte, different for each seed."""
    rnd = random.Random(seed)
    block = bytes(rnd.randrange(1, 256) for _ in range(997))
    return (block * (n // 997 + 1))[:n]


def slot(pool: Pool, vd, cidx: int) -> int:
    return pool.meta.slot_of(vd, cidx)


def read_all(pool: Pool, vd) -> bytes:
    return bytes(pool.read(vd, 0, vd.size + 3 * CS))

