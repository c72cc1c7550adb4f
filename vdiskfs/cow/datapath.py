"""The data path: reading a VDisk's bytes and writing them, chunk by chunk.

A write is planned, then done, then published:

1. *plan* (``_Plan``): per chunk, decide where the bytes go, without changing metadata:
   - the chunk is exclusive and stable (refcount 1, no undurable drop: ``Space.stable``)
     → in place, into its slot (a partial slot also records the blocks it now holds:
     ``pmask``);
   - it is a hole or shared → a fresh slot (``Space.alloc_slot``) mapped by ``eset``;
     a small write into a shared whole chunk writes only its blocks to a *partial* slot
     (``pset``: the other blocks stay in the old slot, its *base*);
   - a write that leaves the chunk all zeros frees it instead (``eset`` to 0);
   - a page that is missing or shared first gets a private copy (``pcow``, a new page id).
2. *do*: reserve the fresh slots' space (one fallocate per run), write every run of
   consecutive data-file positions with one pwritev. On failure the fresh slots and page
   ids go back to the space map and nothing was published.
3. *publish*: the caller applies the plan's ops, in order, in its transaction. Nothing
   ever points at data that is not written yet.

Reads merge runs of consecutive slots into one pread; holes read as zeros, partial slots
read their blocks from the slot and the rest from the base.
"""

from __future__ import annotations

from typing import Callable

from .chunkstore import ChunkStore
from .meta import Metadata, VDisk
from .space import Space


class DataPath:
    def __init__(self, meta: Metadata, space: Space, store: ChunkStore):
        self.meta = meta
        self.space = space
        self.store = store
        self.cs = meta.chunk_size
        self.pe = meta.page_entries
        self.zero = bytes(self.cs)

    # ------------------------------------------------------------ reads
    def read(self, vd: VDisk, off: int, size: int) -> bytes | bytearray:
        """Bytes [off, off + size) of the VDisk's address space (the caller clips to its
        size)."""
        cs, pe = self.cs, self.pe
        store, partial = self.store, self.meta.partial
        cidx, coff = divmod(off, cs)
        if coff + size <= cs:                       # within one chunk (small reads)
            slot = self.meta.slot_of(vd, cidx)
            if not slot:
                return bytes(size)
            if slot not in partial:
                return _padded(store.pread(slot, coff, size), size)
        ptab, pages = vd.ptab, self.meta.pages
        runs = []   # [buffer position, slot, offset in slot, length]: consecutive slots merged
        pos = 0
        while pos < size:
            cidx, coff = divmod(off + pos, cs)
            n = min(cs - coff, size - pos)
            pidx = cidx // pe
            pid = ptab[pidx] if pidx < len(ptab) else 0
            slot = pages[pid][cidx % pe] if pid else 0
            if slot:
                for src, soff, ln in (self._sources(slot, coff, n) if slot in partial
                                      else ((slot, coff, n),)):
                    last = runs[-1] if runs else None
                    if (last and last[0] + last[3] == pos
                            and last[1] * cs + last[2] + last[3] == src * cs + soff):
                        last[3] += ln
                    else:
                        runs.append([pos, src, soff, ln])
                    pos += ln
            else:
                pos += n
        if len(runs) == 1 and runs[0][3] == size:
            # One run (most requests): one pread, no zero-filled buffer to fill.
            return _padded(store.pread(runs[0][1], runs[0][2], size), size)
        out = bytearray(size)
        mv = memoryview(out)
        for pos, slot, coff, n in runs:
            store.readinto(slot, coff, mv[pos:pos + n])
        return out

    def read_chunk(self, slot: int) -> bytearray:
        """A chunk's whole contents (partial slots merged with their base)."""
        if slot not in self.meta.partial:
            return self.store.read(slot)
        buf = bytearray(self.cs)
        mv = memoryview(buf)
        for src, off, n in self._sources(slot, 0, self.cs):
            self.store.readinto(src, off, mv[off:off + n])
        return buf

    def _sources(self, slot: int, coff: int, n: int) -> list[tuple[int, int, int]]:
        """Where bytes [coff, coff + n) of a partial slot's chunk are: (slot, offset,
        length) pieces, from the slot for the blocks it holds, else from its base."""
        base, mask = self.meta.partial[slot]
        bs = self.meta.block_size
        out = []
        pos, end = coff, coff + n
        while pos < end:
            held = mask >> (pos // bs) & 1
            stop = min(end, (pos // bs + 1) * bs)
            while stop < end and (mask >> (stop // bs) & 1) == held:
                stop = min(end, stop + bs)
            out.append((slot if held else base, pos, stop - pos))
            pos = stop
        return out

    def _block(self, slot: int, off: int) -> bytes:
        bs = self.meta.block_size
        return _padded(self.store.pread(slot, off, bs), bs)

    # ------------------------------------------------------------ writes
    def in_place(self, pid: int, slot: int) -> bool:
        """May ``slot`` (on page ``pid``) be overwritten in place? Only when exclusive
        (page and slot refcount 1) and stable (no drop of either awaits its commit)."""
        m = self.meta
        return m.page_ref[pid] == 1 and m.slot_ref[slot] == 1 and self.space.stable(pid, slot)

    def write(self, vd: VDisk, off: int, mv: memoryview) -> list[list]:
        """Write ``mv`` at ``off`` (within the VDisk's page table); returns the ops that
        publish it, for the caller's transaction."""
        plan = _Plan(self)
        cs = self.cs
        pos = 0
        while pos < len(mv):
            cidx, coff = divmod(off + pos, cs)
            n = min(cs - coff, len(mv) - pos)
            self._plan_chunk(plan, vd, cidx, coff, mv[pos:pos + n])
            pos += n
        return plan.do()

    def zero_tail(self, vd: VDisk) -> list[list]:
        """Zero the last chunk past the end (before the VDisk grows, or after it shrank):
        those bytes are junk, left by a shrink or by an in-place write whose size change a
        crash lost. Frees the chunk if only zeros remain."""
        tail = vd.size % self.cs
        if not tail or not self.meta.slot_of(vd, vd.size // self.cs):
            return []
        return self.write(vd, vd.size, memoryview(self.zero)[:self.cs - tail])

    def unmap(self, vd: VDisk, first: int, end: int) -> list[list]:
        """Ops that turn chunks [first, end) into holes (a shrink)."""
        plan = _Plan(self)
        for cidx in range(first, end):
            if self.meta.slot_of(vd, cidx):
                plan.private_page(vd, cidx // self.pe)
                plan.ops.append(["eset", vd.vid, cidx, 0])
        return plan.do()

    def _plan_chunk(self, plan: "_Plan", vd: VDisk, cidx: int, coff: int,
                    piece: memoryview) -> None:
        m, cs = self.meta, self.cs
        pidx, i = divmod(cidx, self.pe)
        pid = vd.ptab[pidx]
        slot = m.pages[pid][i] if pid else 0
        n = len(piece)
        zero = self.zero.startswith(piece)
        if slot and self.in_place(pid, slot):
            p = m.partial.get(slot)
            if zero and (n == cs or self._zero_after(slot, coff, piece)):
                plan.ops.append(["eset", vd.vid, cidx, 0])   # zero detection frees it
            elif p is None:
                plan.add(slot, coff, piece)                  # the fast path
            else:                                            # filling in blocks
                base, mask = p
                start, view, bits = self._span(coff, piece, lambda b: self._block(
                    slot if mask >> (b // m.block_size) & 1 else base, b))
                plan.add(slot, start, view,
                         ["pmask", slot, mask | bits] if mask | bits != mask else None)
            return
        # A hole or shared: the new contents go to a fresh slot.
        if slot and n < cs and not zero and m.full_mask > 1 and slot not in m.partial:
            # A small write into a shared chunk: a partial slot with just the blocks
            # written; the rest stays in the old slot (no read, no copy of the chunk).
            plan.private_page(vd, pidx)
            new = self.space.alloc_slot()
            start, view, bits = self._span(coff, piece, lambda b: self._block(slot, b))
            if bits == m.full_mask:
                plan.add(new, 0, view, ["eset", vd.vid, cidx, new], fresh=True)
            else:
                plan.add(new, start, view, ["pset", vd.vid, cidx, new, slot, bits],
                         fresh=True)
            return
        if slot and n < cs:
            chunk = self.read_chunk(slot)              # copy-on-write of the whole chunk
            chunk[coff:coff + n] = piece
            piece, coff = memoryview(chunk), 0
            zero = self.zero.startswith(chunk)
        if zero:
            if slot:
                plan.private_page(vd, pidx)
                plan.ops.append(["eset", vd.vid, cidx, 0])
            return                                      # zeros into a hole: nothing to do
        plan.private_page(vd, pidx)
        new = self.space.alloc_slot()
        if len(piece) < cs and not self.store.known_zero(new):
            buf = bytearray(cs)                         # a reused slot may hold old bytes
            buf[coff:coff + len(piece)] = piece
            piece, coff = memoryview(buf), 0
        plan.add(new, coff, piece, ["eset", vd.vid, cidx, new], fresh=True)

    def _span(self, coff: int, piece: memoryview,
              fill: Callable[[int], bytes]) -> tuple[int, memoryview, int]:
        """Widen a write of ``piece`` at ``coff`` to whole blocks: (start, data, block
        mask). ``fill(block_offset)`` gives the current bytes of a partly written block."""
        bs = self.meta.block_size
        end = coff + len(piece)
        start, stop = coff // bs * bs, -(-end // bs) * bs
        bits = ((1 << ((stop - start) // bs)) - 1) << (start // bs)
        if start == coff and stop == end:
            return start, piece, bits
        buf = bytearray(stop - start)
        if start < coff:
            buf[:bs] = fill(start)
        if stop > end and (stop - bs > start or start == coff):
            buf[-bs:] = fill(stop - bs)
        buf[coff - start:end - start] = piece
        return start, memoryview(buf), bits

    def _zero_after(self, slot: int, coff: int, piece: memoryview) -> bool:
        """After writing zeros ``piece`` at ``coff``, is the whole chunk zero?"""
        buf = self.read_chunk(slot)
        buf[coff:coff + len(piece)] = piece
        return self.zero.startswith(buf)


class _Plan:
    """One request's writes: runs of consecutive data-file positions, the fresh slots and
    page ids they take, and the ops that publish them (in order)."""

    __slots__ = ("dp", "runs", "fresh", "pids", "ops", "private", "end")

    def __init__(self, dp: DataPath):
        self.dp = dp
        self.runs: list[tuple[int, int, list[memoryview]]] = []   # (slot, offset, views)
        self.end = -1                      # data-file position where the last run ends
        self.fresh: list[int] = []         # slots to reserve, given back on failure
        self.pids: list[int] = []          # page ids taken by pcow, likewise
        self.ops: list[list] = []
        self.private: set[int] = set()     # page indexes given a pcow in this plan

    def private_page(self, vd: VDisk, pidx: int) -> None:
        """The page of ``pidx`` must be private before its entries change."""
        if pidx in self.private:
            return
        pid = vd.ptab[pidx]
        if not pid or self.dp.meta.page_ref[pid] != 1:
            new = self.dp.space.alloc_pid()
            self.pids.append(new)
            self.ops.append(["pcow", vd.vid, pidx, new])
        self.private.add(pidx)

    def add(self, slot: int, off: int, view: memoryview, op: list | None = None,
            fresh: bool = False) -> None:
        pos = slot * self.dp.cs + off
        if pos == self.end:
            self.runs[-1][2].append(view)
        else:
            self.runs.append((slot, off, [view]))
        self.end = pos + len(view)
        if fresh:
            self.fresh.append(slot)
        if op is not None:
            self.ops.append(op)

    def do(self) -> list[list]:
        """Write the data; returns the ops to publish it."""
        store = self.dp.store
        try:
            if self.fresh:
                store.reserve(sorted(self.fresh))
            for slot, off, views in self.runs:
                store.writev(slot, off, views)
        except BaseException:              # ENOSPC, EIO: nothing points at them yet
            self.dp.space.give_back(self.fresh, self.pids)
            raise
        return self.ops


def _padded(data: bytes, size: int) -> bytes:
    """A read that ended at the data file's end: the rest reads as zeros."""
    return data if len(data) == size else data + bytes(size - len(data))
