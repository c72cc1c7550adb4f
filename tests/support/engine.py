"""Helpers of the engine tests (no FUSE): the small geometry the t1 modules share, the
in-memory fsck of a Pool, crashes, data patterns.

Small geometry (4 KiB chunks, 4 entries per page) so that a few KiB of data cross chunk
and page boundaries and shared pages appear with a handful of chunks.
"""

from __future__ import annotations

import os
import random

from vdiskfs.cow.fsck import Report, check_pool
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
    """Every invariant fsck checks, on the live pool (refcounts, partial slots, clone jobs,
    nalloc, the space map)."""
    r = check_pool(pool)
    assert r.clean, r.errors
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


def seek_model(chunks: list[bool], size: int, off: int, whence: int, cs: int) -> int | None:
    """What lseek SEEK_DATA / SEEK_HOLE from ``off`` answers at chunk granularity, given
    which chunks (of ``cs`` bytes) hold data; None for ENXIO."""
    if not 0 <= off < size:
        return None
    c = off // cs
    while c * cs < size and chunks[c] != (whence == os.SEEK_DATA):
        c += 1
    if whence == os.SEEK_HOLE:
        return min(max(off, c * cs), size)
    return max(off, c * cs) if c * cs < size else None


def read_all(pool: Pool, vd) -> bytes:
    return bytes(pool.read(vd, 0, vd.size + 3 * CS))

