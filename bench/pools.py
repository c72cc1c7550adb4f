"""Engine-built pools for the clone, mount and writer sections: VDisks with every chunk
mapped (the maps, refcounts and checkpoint of that much data) in a sparse data file."""

from __future__ import annotations

import os
import time
from array import array

from bench.common import MiB, RandomData
from vdiskfs.cow.checksum import zero_sums
from vdiskfs.cow.chunkstore import ChunkStore
from vdiskfs.cow.pool import Pool, create_pool


class SparseBuildStore(ChunkStore):
    """The chunk store of build_pool: a pool's maps, refcounts and checkpoint as if it held
    its data, in a sparse data file.

    While ``sparse`` is set, ``writev_at`` stores nothing: it only extends the file (by
    ftruncate: a hole) over the written range, so that the slots lie inside the data file
    (fsck checks that) and ``eof`` (which ``known_zero`` reads) and ``unsynced`` (which the
    commits read) are what the real write would have left. Storing the builder's one byte
    per chunk would cost a 4 KiB extent per chunk (1 GiB of disk per 64 GiB mapped at
    256 KiB chunks), which on this discard-mounted disk takes ~13 s per 16 GiB mapped
    just to delete. With ``sparse`` off (the random-data VDisks) writes are stored. The
    block sums are those of the zeros the data file reads there, so those VDisks read as
    zeros without failing their checksums.

    ``reserve`` never fallocates (64 GiB mapped would reserve 64 GiB of disk): it keeps
    only the bookkeeping, that slots about to be written are no longer punched holes."""

    sparse = True

    def reserve(self, slots: list[int]) -> None:
        self.punched.difference_update(slots)

    def writev_at(self, pos: int, views: list[memoryview]) -> None:
        if not self.sparse:
            super().writev_at(pos, views)
            return
        self.unsynced = True
        end = pos + sum(len(v) for v in views)
        if end > self.eof:
            os.ftruncate(self.fd, end)
            self.eof = end

    def write_sums(self, g: int, sums: array) -> None:
        # What the data file holds there, zeros, is what the sums must say.
        super().write_sums(g, zero_sums(len(sums)) if self.sparse else sums)


def build_pool(path: str, specs: list[tuple[str, int, int, bool]], data: RandomData,
               chunk_size: int | None = None) -> float:
    """Engine-built pool: (name, size, mapped bytes, random data?) per VDisk; seconds.

    Random data is written for real. The others get one byte per chunk through the engine
    (every chunk mapped: the maps, refcounts and checkpoint are those of a VDisk holding
    that much data) into a SparseBuildStore, which stores none of it and only extends the
    data file over the slots (see there): the data file stays sparse. The pool is then
    closed (checkpointed) and reopened normally by the mounts; those VDisks are only
    cloned, mounted and read for the RSS figures (their chunks read as zeros), never
    checked for contents."""
    t = time.perf_counter()
    create_pool(path, **({"chunk_size": chunk_size} if chunk_size else {}))
    p = Pool(path, store_class=SparseBuildStore)
    try:
        cs = p.chunk_size
        for name, size, mapped, real in specs:
            vd = p.create(name, size)
            p.store.sparse = not real
            if real:
                for off in range(0, mapped, MiB):
                    p.write(vd, off, data.piece(off, MiB))
            else:
                for off in range(0, mapped, cs):
                    p.write(vd, off, b"\x01")
    finally:
        p.close()
    return time.perf_counter() - t
