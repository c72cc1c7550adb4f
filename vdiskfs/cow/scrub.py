"""Scrub: read every block of chunk data a VDisk can reach and check it against its sum.

Used online (``vdiskfs scrub``: the daemon runs it in steps between requests) and
offline (``vdiskfs fsck --data``, on a pool opened read-only). It walks the slots in use
in data-file order, a run of consecutive slots per step, from the disk (the data file's
cached pages are dropped first, unless dirty), and for each block that fails its sum:

- in a *suspect* slot (hot when the pool was opened: an in-place write the crash cut
  short) the bytes are accepted as they are when the pool is writable (logged, counted
  as ``torn``), reported only when it is not; once all its blocks were checked the slot
  is no longer suspect;
- anywhere else it is damage: counted, and reported as the ranges of every VDisk that
  reads that block (shared slots belong to several).

Blocks a partial slot does not hold are not its data (they are read from its base) and
are skipped.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from . import checksum
from .checksum import BLOCK
from .pool import Pool

STEP = 4 << 20


@dataclass
class Damaged:
    vdisk: str
    start: int          # VDisk byte range [start, end)
    end: int


@dataclass
class Scrub:
    pool: Pool
    accept: bool = True                   # accept torn blocks of suspect slots
    slots: list[int] = field(default_factory=list)
    pos: int = 0                          # index in ``slots`` of the next one to check
    checked: int = 0                      # bytes checked
    total: int = 0                        # bytes to check
    bad: list[int] = field(default_factory=list)       # damaged data-file blocks
    torn: int = 0                         # suspect blocks accepted (or found, read-only)
    torn_blocks: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        ref = self.pool.meta.slot_ref
        self.slots = [s for s in range(1, len(ref)) if ref[s]]
        self.total = len(self.slots) * self.pool.chunk_size

    @property
    def finished(self) -> bool:
        return self.pos >= len(self.slots)

    def step(self, max_bytes: int = STEP) -> None:
        """Check the next run of consecutive slots (at most ``max_bytes``)."""
        p = self.pool
        cs, meta, store = p.chunk_size, p.meta, p.store
        nb = cs // BLOCK
        first = self.slots[self.pos]
        n = 1
        while (self.pos + n < len(self.slots) and self.slots[self.pos + n] == first + n
               and (n + 1) * cs <= max_bytes):
            n += 1
        self.pos += n
        self.checked += n * cs
        run = [s for s in range(first, first + n) if meta.slot_ref[s]]   # still in use
        if not run:
            return
        at, size = first * cs, n * cs
        store.drop_cache(at, size)                  # from the disk, not the page cache
        data = memoryview(store.read_at(at, size))
        for i in checksum.mismatches(data, store.read_sums(first * nb, n * nb)):
            g = first * nb + i
            slot, b = divmod(g, nb)
            if slot not in run or not self._holds(slot, b):
                continue
            if slot in p.data.suspect:
                self.torn += 1
                self.torn_blocks.append(g)
                if self.accept:
                    block = data[i * BLOCK:(i + 1) * BLOCK]
                    store.write_sums(g, array("Q", [checksum.sum_of(block)]))
            else:
                self.bad.append(g)
        if self.accept:
            p.data.suspect.difference_update(run)

    def _holds(self, slot: int, b: int) -> bool:
        """Does ``slot`` hold its block ``b`` (a partial slot reads the rest from its base)?"""
        part = self.pool.meta.partial.get(slot)
        return part is None or bool(part[1] >> (b * BLOCK // self.pool.meta.block_size) & 1)

    def run(self) -> "Scrub":
        while not self.finished:
            self.step()
        return self

    def damaged(self, blocks: list[int] | None = None) -> list[Damaged]:
        """The VDisk ranges that read the damaged blocks, merged where adjacent."""
        blocks = self.bad if blocks is None else blocks
        if not blocks:
            return []
        p = self.pool
        cs, pe, meta = p.chunk_size, p.page_entries, p.meta
        nb = cs // BLOCK
        want: dict[int, list[int]] = {}
        for g in blocks:
            want.setdefault(g // nb, []).append(g % nb)
        out: list[Damaged] = []
        for vd in sorted(meta.vdisks.values(), key=lambda v: v.vid):
            name = vd.name or str(vd.vid)
            hits = []
            for pidx, pid in sorted(vd.ptab.items()):
                for i, slot in enumerate(meta.pages[pid]):
                    base = (pidx * pe + i) * cs
                    # The chunk reads block b from its slot if the slot holds it, else
                    # from the partial slot's base.
                    hits += [base + b * BLOCK for b in want.get(slot, ())
                             if self._holds(slot, b)]
                    if slot in meta.partial:
                        hits += [base + b * BLOCK for b in want.get(meta.partial[slot][0], ())
                                 if not self._holds(slot, b)]
            for off in sorted(hits):
                if out and out[-1].vdisk == name and out[-1].end == off:
                    out[-1].end = off + BLOCK
                else:
                    out.append(Damaged(name, off, off + BLOCK))
        return out
