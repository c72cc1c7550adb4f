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

Checksums: every 4 KiB block of the data file has its sum in the sums file
(checksum.py). A write computes the sums of the blocks it writes (widening a write that
is not block-aligned by the current bytes of its edge blocks, themselves verified) and
writes them beside the data; a fresh slot gets the sums of all its blocks. Every read
verifies every block it returns. A block that fails is never served: the read fails with
EIO, the damage is logged once per block and counted (``Damage``). Only a *cold* slot is
trusted that far: a *hot* one (meta.py) may hold a block an in-place write was cutting
when the pool crashed, so in the slots that were hot when the pool was opened (the
*suspects*) a mismatch is an unacknowledged write cut short, and its bytes are accepted
as they are (logged and counted apart) until every block of the slot was checked.
In-place writes go only into hot slots; a write into a cold slot copies it on write
into a fresh slot, which is hot from birth.

Reads merge runs of consecutive slots into one pread; holes read as zeros, partial slots
read their blocks from the slot and the rest from the base.
"""

from __future__ import annotations

import errno
import logging
from array import array
from . import checksum
from .checksum import BLOCK
from .chunkstore import Chunks
from .errors import VDiskError
from .meta import Metadata, VDisk
from .space import Space

log = logging.getLogger(__name__)


class Damage:
    """Blocks that failed their checksum (and torn ones accepted), counted per VDisk."""

    def __init__(self):
        self.errors: dict[int, int] = {}     # vid -> blocks that failed a read
        self.logged: set[int] = set()        # data-file blocks found bad (logged once)
        self.torn_accepted = 0               # suspect blocks accepted as they are

    def bad(self, vd: VDisk, voff: int, g: int) -> None:
        self.errors[vd.vid] = self.errors.get(vd.vid, 0) + 1
        if g not in self.logged:
            self.logged.add(g)
            log.error("checksum mismatch: VDisk %s bytes %d-%d (data file block %d): "
                      "the read fails with EIO", vd.name or vd.vid, voff, voff + BLOCK - 1, g)

    def accepted(self, vd: VDisk, voff: int, g: int) -> None:
        self.torn_accepted += 1
        log.warning("VDisk %s bytes %d-%d (data file block %d): checksum mismatch in a "
                    "slot written in place when the pool crashed: an unacknowledged write "
                    "cut short; accepted as it is", vd.name or vd.vid, voff,
                    voff + BLOCK - 1, g)

    @property
    def bad_blocks(self) -> int:
        return len(self.logged)


class DataPath:
    def __init__(self, meta: Metadata, space: Space, store: Chunks):
        self.meta = meta
        self.space = space
        self.store = store
        self.cs = meta.chunk_size
        self.pe = meta.page_entries
        self.nb = self.cs // BLOCK           # sums per slot
        self.zero = bytes(self.cs)
        self.verify = True                   # False only for a format 2 pool read as it is
        self.accept = True                   # False read-only: fsck reports, never fixes
        self.suspect: set[int] = set()       # slots hot when the pool was opened
        self.damage = Damage()

    # ------------------------------------------------------------ reads
    def read(self, vd: VDisk, off: int, size: int) -> bytes | bytearray:
        """Bytes [off, off + size) of the VDisk's address space (the caller clips to its
        size), every block verified."""
        cs, pe = self.cs, self.pe
        partial = self.meta.partial
        cidx, coff = divmod(off, cs)
        if coff + size <= cs:                       # within one chunk (small reads)
            slot = self.meta.slot_of(vd, cidx)
            if not slot:
                return bytes(size)
            if slot not in partial:
                return self._read_run(vd, off, slot * cs + coff, size)
        ptab, pages = vd.ptab, self.meta.pages
        runs = []   # [buffer position, data-file position, length]: consecutive merged
        pos = 0
        while pos < size:
            cidx, coff = divmod(off + pos, cs)
            n = min(cs - coff, size - pos)
            pidx = cidx // pe
            pid = ptab.get(pidx)
            slot = pages[pid][cidx % pe] if pid else 0
            if slot:
                for src, soff, ln in (self._sources(slot, coff, n) if slot in partial
                                      else ((slot, coff, n),)):
                    at = src * cs + soff
                    last = runs[-1] if runs else None
                    if last and last[0] + last[2] == pos and last[1] + last[2] == at:
                        last[2] += ln
                    else:
                        runs.append([pos, at, ln])
                    pos += ln
            else:
                pos += n
        if len(runs) == 1 and runs[0][2] == size:
            # One run (most requests): one pread, no zero-filled buffer to fill.
            return self._read_run(vd, off, runs[0][1], size)
        out = bytearray(size)
        mv = memoryview(out)
        for pos, at, n in runs:
            if at % BLOCK or n % BLOCK:
                mv[pos:pos + n] = self._read_run(vd, off + pos, at, n)
            else:
                self.store.readinto_at(at, mv[pos:pos + n])
                self._verify(vd, off + pos, at // BLOCK, mv[pos:pos + n])
        return out

    def _read_run(self, vd: VDisk, voff: int, at: int, n: int) -> bytes:
        """``n`` verified bytes at data-file position ``at``, which holds VDisk byte
        ``voff``: whole blocks are read and checked, the range is cut out of them."""
        start, end = at // BLOCK * BLOCK, -(-(at + n) // BLOCK) * BLOCK
        data = self.store.read_at(start, end - start)
        self._verify(vd, voff - (at - start), start // BLOCK, memoryview(data))
        return data if (start, end) == (at, at + n) else data[at - start:at - start + n]

    def _verify(self, vd: VDisk, voff: int, g0: int, view: memoryview) -> None:
        """Check the blocks of ``view`` (data-file blocks from ``g0``, VDisk bytes from
        ``voff``) against their sums: EIO for a damaged one."""
        if not self.verify:
            return
        n = len(view) // BLOCK
        sums = self.store.sums(g0, n)
        if n == 1 and checksum.sum_of(view) == sums[0]:        # the common 4K read
            return
        bad = checksum.mismatches(view, sums)
        if not bad:
            return
        failed = False
        for i in bad:
            g = g0 + i
            if self.accept and g // self.nb in self.suspect:
                self.store.rehash(g, view[i * BLOCK:(i + 1) * BLOCK])
                self.damage.accepted(vd, voff + i * BLOCK, g)
            else:
                self.damage.bad(vd, voff + i * BLOCK, g)
                failed = True
        if failed:
            raise VDiskError(errno.EIO, f"checksum mismatch in VDisk {vd.name or vd.vid}")

    def read_chunk(self, vd: VDisk, cidx: int) -> bytearray:
        """Chunk ``cidx``'s whole contents, verified (partial slots merged with their base)."""
        return bytearray(self.read(vd, cidx * self.cs, self.cs))

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

    # ------------------------------------------------------------ writes
    def in_place(self, pid: int, slot: int) -> bool:
        """May ``slot`` (on page ``pid``) be overwritten in place? Only when exclusive
        (page and slot refcount 1), stable (no drop of either awaits its commit) and hot
        (a crash may leave its blocks unmatched by their sums: meta.py)."""
        m = self.meta
        return (m.page_ref[pid] == 1 and m.slot_ref[slot] == 1 and m.is_hot(slot)
                and self.space.stable(pid, slot))

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
        """Ops that turn chunks [first, end) into holes (a punch, a shrink). A page wholly
        inside loses this VDisk's reference (``pdrop``: a shared page is not copied, the
        other VDisks keep it); one cut by an edge gets a private copy whose entries go."""
        plan = _Plan(self)
        pe, pages = self.pe, self.meta.pages
        for pidx, pid, lo, hi in vd.spans(first, end, pe):
            if (lo, hi) == (0, pe):
                plan.ops.append(["pdrop", vd.vid, pidx])
                continue
            page = pages[pid]
            gone = [i for i in range(lo, hi) if page[i]]
            if gone:
                plan.private_page(vd, pidx)
                plan.ops.extend(["eset", vd.vid, pidx * pe + i, 0] for i in gone)
        return plan.do()

    def _plan_chunk(self, plan: "_Plan", vd: VDisk, cidx: int, coff: int,
                    piece: memoryview) -> None:
        m, cs = self.meta, self.cs
        pidx, i = divmod(cidx, self.pe)
        pid = vd.ptab.get(pidx, 0)
        slot = m.pages[pid][i] if pid else 0
        n = len(piece)
        zero = self.zero.startswith(piece)
        if slot and self.in_place(pid, slot):
            p = m.partial.get(slot)
            if zero and (n == cs or self.zero.startswith(
                    self._merged(vd, cidx, coff, piece))):
                plan.ops.append(["eset", vd.vid, cidx, 0])   # zero detection frees it
            elif p is None:                                  # the fast path
                start, view, _ = self._widen(vd, cidx, coff, piece, BLOCK, slot)
                plan.add(slot, start, view)
            else:                                            # filling in blocks
                start, view, bits = self._widen(vd, cidx, coff, piece, m.block_size,
                                                (slot, *p))
                mask = p[1] | bits
                plan.add(slot, start, view, ["pmask", slot, mask] if mask != p[1] else None)
            self.space.note_written(slot)
            return
        # A hole, shared, or cold: the new contents go to a fresh slot.
        if slot and n < cs and not zero and m.full_mask > 1 and slot not in m.partial:
            # A small write into a shared chunk: a partial slot with just the blocks
            # written; the rest stays in the old slot (no read, no copy of the chunk).
            plan.private_page(vd, pidx)
            new = self.space.alloc_slot()
            start, view, bits = self._widen(vd, cidx, coff, piece, m.block_size, slot)
            if bits == m.full_mask:
                plan.add(new, 0, view, ["eset", vd.vid, cidx, new], fresh=True)
            else:
                plan.add(new, start, view, ["pset", vd.vid, cidx, new, slot, bits],
                         fresh=True)
            return
        if slot and n < cs:
            chunk = self._merged(vd, cidx, coff, piece)   # copy-on-write of the whole chunk
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
        start, view, _ = self._widen(vd, cidx, coff, piece, BLOCK, 0)
        plan.add(new, start, view, ["eset", vd.vid, cidx, new], fresh=True)

    def _widen(self, vd: VDisk, cidx: int, coff: int, piece: memoryview, bs: int,
               src: int | tuple[int, int, int]) -> tuple[int, memoryview, int]:
        """Widen a write of ``piece`` at ``coff`` in chunk ``cidx`` to whole blocks of
        ``bs`` bytes: (start, data, block mask). A block it covers only in part is filled
        from the verified bytes of slot ``src`` (0: zeros; (slot, base, mask): a partial
        slot, its own blocks or its base's)."""
        end = coff + len(piece)
        start, stop = coff // bs * bs, -(-end // bs) * bs
        bits = ((1 << ((stop - start) // bs)) - 1) << (start // bs)
        if start == coff and stop == end:
            return start, piece, bits

        def fill(b: int) -> bytes:
            if not src:
                return bytes(bs)
            s = src if isinstance(src, int) else src[0] if src[2] >> (b // bs) & 1 else src[1]
            return self._read_run(vd, cidx * self.cs + b, s * self.cs + b, bs)

        buf = bytearray(stop - start)
        if start < coff:
            buf[:bs] = fill(start)
        if stop > end and (stop - bs > start or start == coff):
            buf[-bs:] = fill(stop - bs)
        buf[coff - start:end - start] = piece
        return start, memoryview(buf), bits

    def _merged(self, vd: VDisk, cidx: int, coff: int, piece: memoryview) -> bytearray:
        """Chunk ``cidx`` as it will be once ``piece`` is written at ``coff``."""
        chunk = self.read_chunk(vd, cidx)
        chunk[coff:coff + len(piece)] = piece
        return chunk


class _Plan:
    """One request's writes: runs of consecutive data-file positions with their sums, the
    fresh slots and page ids they take, and the ops that publish them (in order)."""

    __slots__ = ("dp", "runs", "sums", "fresh", "pids", "ops", "private", "end")

    def __init__(self, dp: DataPath):
        self.dp = dp
        self.runs: list[tuple[int, list[memoryview]]] = []   # (data-file position, views)
        self.sums: list[tuple[int, array]] = []   # (first data-file block, sums)
        self.end = -1                      # data-file position where the last run ends
        self.fresh: list[int] = []         # slots to reserve, given back on failure
        self.pids: list[int] = []          # page ids taken by pcow, likewise
        self.ops: list[list] = []
        self.private: set[int] = set()     # page indexes given a pcow in this plan

    def private_page(self, vd: VDisk, pidx: int) -> None:
        """The page of ``pidx`` must be private before its entries change."""
        if pidx in self.private:
            return
        pid = vd.ptab.get(pidx)
        if not pid or self.dp.meta.page_ref[pid] != 1:
            new = self.dp.space.alloc_pid()
            self.pids.append(new)
            self.ops.append(["pcow", vd.vid, pidx, new])
        self.private.add(pidx)

    def add(self, slot: int, off: int, view: memoryview, op: list | None = None,
            fresh: bool = False) -> None:
        """Write whole blocks ``view`` at ``off`` in ``slot``. A fresh slot gets the sums
        of all its blocks (the ones not written read as zeros or come from a base)."""
        dp = self.dp
        pos = slot * dp.cs + off
        sums = checksum.sums_of(view)
        if fresh and len(view) < dp.cs:
            whole = checksum.zero_sums(dp.nb)
            whole[off // BLOCK:off // BLOCK + len(sums)] = sums
            self._add_sums(slot * dp.nb, whole)
        else:
            self._add_sums(pos // BLOCK, sums)
        if pos == self.end:
            self.runs[-1][1].append(view)
        else:
            self.runs.append((pos, [view]))
        self.end = pos + len(view)
        if fresh:
            self.fresh.append(slot)
            dp.space.note_written(slot)
        if op is not None:
            self.ops.append(op)

    def _add_sums(self, g: int, sums: array) -> None:
        last = self.sums[-1] if self.sums else None
        if last and last[0] + len(last[1]) == g:
            last[1].extend(sums)
        else:
            self.sums.append((g, sums))

    def do(self) -> list[list]:
        """Write the data and its sums; returns the ops to publish it."""
        store = self.dp.store
        try:
            if self.fresh:
                store.reserve(sorted(self.fresh))
            for pos, views in self.runs:
                store.writev_at(pos, views)
            for g, sums in self.sums:
                store.write_sums(g, sums)
        except BaseException:              # ENOSPC, EIO: nothing points at them yet
            self.dp.space.give_back(self.fresh, self.pids)
            raise
        return self.ops
