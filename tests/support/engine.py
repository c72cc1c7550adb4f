"""Helpers of the engine tests (no FUSE): the small geometry the t1 modules share, the
in-memory fsck of a Pool, crashes, data patterns.

Small geometry (4 KiB chunks, 4 entries per page) so that a few KiB of data cross chunk
and page boundaries and shared pages appear with a handful of chunks.
"""

from __future__ import annotations

import os
import random

from support.common import flip_byte

from vdiskfs.cow import layout
from vdiskfs.cow.fsck import Report, check_pool
from vdiskfs.cow.pool import Pool, create_pool

CS = 4096
PE = 4
SPAN = CS * PE          # bytes mapped by one page


# Where new pools keep their chunks: None for the pool directory (the default), or a
# function giving a store record (vdiskfs.rados.cluster.Where) for each new pool; the
# RADOS runs of the engine tests set it (t2_rados_engine.py).
STORE = None


def new_pool(tmp_path, chunk_size: int = CS, page_entries: int = PE) -> str:
    """Create a pool at TMP_PATH/pool with this geometry; returns its path."""
    p = str(tmp_path / "pool")
    create_pool(p, chunk_size, page_entries=page_entries,
                store=STORE() if STORE is not None else None)
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



_ioctxs: dict = {}     # RADOS handles of flip_chunk_byte, one per namespace


def flip_chunk_byte(pool_path: str, pos: int, mask: int, name: str = layout.DATA) -> None:
    """Damage one byte of the pool's chunk data (``name`` DATA: data-file position
    ``pos``; SUMS: byte ``pos`` of the sums), wherever the chunks live: in the pool
    directory's file, or in the slot's RADOS object (vdiskfs/rados/chunks.py)."""
    hdr = layout.read_header(pool_path)
    if "store" not in hdr:
        flip_byte(os.path.join(pool_path, name), pos, mask)
        return
    from vdiskfs.rados.chunks import oid
    from vdiskfs.rados.cluster import Where, connect, open_ioctx
    where = Where.from_record(hdr["store"])
    cs = hdr["chunk_size"]
    if name == layout.DATA:
        slot, off = divmod(pos, cs)
    else:
        g, r = divmod(pos, 8)
        slot, b = divmod(g, cs // 4096)
        off = cs + b * 8 + r
    if where not in _ioctxs:
        _ioctxs[where] = open_ioctx(connect(where), where)
    io = _ioctxs[where]
    old = io.read(oid(slot), 1, off) or b"\0"
    io.write(oid(slot), bytes([old[0] ^ mask]), off)
