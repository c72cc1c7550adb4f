"""The persistent metadata of a pool and the operations that change it.

Model (dm-thin style two-level sharing; the on-disk form is in docs/FORMAT.md):

- A VDisk has a *page table* ``ptab``: a dict {page index: page id} of its mapped pages,
  one page per PE chunks of its address space (PE = page_entries); a page index that is
  not in it (below ``npages``) is all holes. Sparse, so that an empty VDisk costs the same
  whatever its size (up to 1 PiB: 4M page indexes at 256 KiB chunks).
- A *page* is ``array('Q')`` of PE slot numbers. Slot 0 means "hole, reads zeros".
- ``page_ref[pid]`` = number of page-table entries (over all VDisks) naming page pid.
- ``slot_ref[s]``  = number of page entries (over all live pages) naming slot s, plus the
  number of partial slots whose base it is.
- ``partial[s] = [base, mask]``: slot s holds only the blocks (chunk_size/64 each, at least
  4 KiB) whose bit is set in mask; the other blocks are those of slot ``base``. A base is
  never itself partial.
- ``jobs``: clone job records (records.Job).
- ``hot[s]``: slot s may be written in place; after a crash its blocks may not match
  their sums (an in-place write the crash cut). A slot is hot from the op that maps it
  fresh (``eset``/``pset``) until ``cold``; a cold slot is never written in place (the
  data path copies it on write into a fresh, hot slot), so a mismatch there is damage.

Every change to this state is an op (ops.py: the table of names and signatures) applied by
``apply``; the same code runs live and during journal replay, so replay cannot drift from
what the daemon did. Ops carry every id the live code chose (new page ids, new slots), so
they are deterministic. Preconditions are checked even during replay: a journal that does
not fit the checkpoint is reported as corrupt instead of being applied to the wrong state.

What is *not* here: which slots and page ids are free, and which may not be overwritten in
place yet. That is derived state, owned by space.Space, which learns of every dropped
reference through the ``drops`` listener.
"""

from __future__ import annotations

import re
from array import array
from typing import Any, Callable

from . import codec, ops, props as props_mod
from .codec import FormatError
from .records import Job

_NONZERO = re.compile(rb"[^\x00]")


class VDisk:
    __slots__ = ("vid", "name", "size", "props", "ptab", "npages", "nalloc")

    def __init__(self, vid: int, name: str | None, size: int, props: dict,
                 ptab: dict[int, int], npages: int):
        self.vid = vid
        self.name = name
        self.size = size
        self.props = props
        self.ptab = ptab        # page index -> page id, mapped pages only
        self.npages = npages    # page indexes the size spans
        self.nalloc = 0  # chunks mapped (nonzero entries), kept for st_blocks

    def pages_in(self, p0: int, p1: int) -> list[tuple[int, int]]:
        """(page index, page id) of the mapped pages in [p0, p1), ascending."""
        ptab = self.ptab
        if p1 - p0 <= len(ptab):
            return [(p, ptab[p]) for p in range(p0, p1) if p in ptab]
        return sorted((p, pid) for p, pid in ptab.items() if p0 <= p < p1)

    def spans(self, first: int, end: int, pe: int) -> list[tuple[int, int, int, int]]:
        """For chunks [first, end), each mapped page they touch: (page index, page id,
        lo, hi), entries [lo, hi) of that page being in the range."""
        return [(p, pid, max(first - p * pe, 0), min(end - p * pe, pe))
                for p, pid in self.pages_in(first // pe, -(-end // pe))]


class Drops:
    """Told of every reference that goes away (space.Space listens; replay ignores it)."""

    def slot(self, slot: int, freed: bool) -> None:
        pass

    def page(self, pid: int, freed: bool) -> None:
        pass


class Metadata:
    def __init__(self, chunk_size: int, page_entries: int):
        self.chunk_size = chunk_size
        self.page_entries = page_entries
        self.vdisks: dict[int, VDisk] = {}
        self.names: dict[str, int] = {}
        self.pages: dict[int, array] = {}
        self.page_ref = array("I", [0])   # pid 0 is never a page
        self.slot_ref = array("I", [0])   # slot 0 is never a slot
        self.next_vid = 1
        self.partial: dict[int, list[int]] = {}   # slot -> [base slot, block mask]
        self.block_size = max(4096, chunk_size // 64)
        self.full_mask = (1 << (chunk_size // self.block_size)) - 1
        self.hot = bytearray(1)           # slot -> 1 if hot (see above)
        self.jobs: dict[int, Job] = {}    # clone jobs, oldest first (see cow/clones.py)
        self.next_job = 1
        self.drops = Drops()
        # Dispatch driven by the op table: handler _op_NAME for each op NAME.
        self._handlers: dict[str, Callable[..., None]] = {
            name: getattr(self, "_op_" + name) for name in ops.OPS}

    # ----------------------------------------------------------------- geometry
    def pages_for(self, size: int) -> int:
        span = self.chunk_size * self.page_entries
        return (size + span - 1) // span

    def chunks_for(self, size: int) -> int:
        return (size + self.chunk_size - 1) // self.chunk_size

    # ----------------------------------------------------------------- lookups
    def slot_of(self, vd: VDisk, cidx: int) -> int:
        pidx, i = divmod(cidx, self.page_entries)
        pid = vd.ptab.get(pidx)
        return self.pages[pid][i] if pid else 0

    def by_name(self, name: str) -> VDisk | None:
        vid = self.names.get(name)
        return self.vdisks[vid] if vid is not None else None

    def next_mapped(self, vd: VDisk, cidx: int) -> int | None:
        """The first chunk at or after ``cidx`` that holds data, or None (SEEK_DATA)."""
        pe = self.page_entries
        first = cidx // pe
        for pidx in sorted(p for p in vd.ptab if p >= first):
            start = cidx - pidx * pe if pidx == first else 0
            m = _NONZERO.search(memoryview(self.pages[vd.ptab[pidx]]).cast("B"), 8 * start)
            if m:
                return pidx * pe + m.start() // 8
        return None

    def next_hole(self, vd: VDisk, cidx: int) -> int:
        """The first chunk at or after ``cidx`` that is a hole (SEEK_HOLE); past the last
        page when every chunk from there is mapped."""
        pe = self.page_entries
        pidx, i = divmod(cidx, pe)
        while pidx in vd.ptab:
            page = self.pages[vd.ptab[pidx]]
            try:
                return pidx * pe + page.index(0, i)
            except ValueError:
                pidx, i = pidx + 1, 0
        return pidx * pe + i

    def mapped_in_page(self, pid: int) -> int:
        """How many chunks page ``pid`` maps."""
        return self.page_entries - self.pages[pid].count(0)

    # ----------------------------------------------------------------- apply
    def apply(self, op: list) -> None:
        name, args = ops.check(op)
        try:
            self._handlers[name](*args)
        except FormatError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, OverflowError) as e:
            raise FormatError(f"operation {op!r:.80} does not fit the metadata: {e!r}") from None

    def _vd(self, vid: int) -> VDisk:
        vd = self.vdisks.get(vid)
        if vd is None:
            raise FormatError(f"no VDisk with id {vid}")
        return vd

    def _job(self, jid: int) -> Job:
        job = self.jobs.get(jid)
        if job is None:
            raise FormatError(f"no clone job {jid}")
        return job

    def _op_vnew(self, vid: int, name: str, size: int, props: dict) -> None:
        if vid in self.vdisks or name in self.names:
            raise FormatError(f"VDisk {vid} ({name}) exists already")
        if size < 0:
            raise FormatError("negative size")
        vd = VDisk(vid, name, size, dict(props), {}, self.pages_for(size))
        self.vdisks[vid] = vd
        self.names[name] = vid
        self.next_vid = max(self.next_vid, vid + 1)

    def _op_vset(self, vid: int, key: str, value: Any) -> None:
        vd = self._vd(vid)
        if key == "name":
            if value is not None and (type(value) is not str
                                      or self.names.get(value, vid) != vid):
                raise FormatError(f"name {value!r:.70} is taken or not a name")
            if vd.name is not None:
                del self.names[vd.name]
            vd.name = value
            if value is not None:
                self.names[value] = vid
        elif key in props_mod.KEYS:
            vd.props[key] = value
        else:
            raise FormatError(f"unknown VDisk property {key!r:.40}")

    @staticmethod
    def set_mtime(vd: VDisk, ns: int) -> None:
        """What op ``["vset", vid, "mtime_ns", ns]`` does (commit.Transactions.touch)."""
        vd.props["mtime_ns"] = ns

    def _op_vsize(self, vid: int, size: int) -> None:
        vd = self._vd(vid)
        if size < 0:
            raise FormatError("negative size")
        npages = self.pages_for(size)
        if npages < vd.npages:
            for pidx, _ in reversed(vd.pages_in(npages, vd.npages)):
                self._drop_page(vd, pidx)
        vd.npages = npages
        vd.size = size

    def _op_pcow(self, vid: int, pidx: int, pid: int) -> None:
        vd = self._vd(vid)
        if pid <= 0 or (pid < len(self.page_ref) and self.page_ref[pid]):
            raise FormatError(f"page {pid} is in use")
        if not 0 <= pidx < vd.npages:
            raise FormatError(f"pcow: page {pidx} is past the end of VDisk {vid}")
        old = vd.ptab.get(pidx, 0)
        if old:
            page = array("Q", self.pages[old])
            slot_ref = self.slot_ref
            for s in page:
                if s:
                    slot_ref[s] += 1
        else:
            page = array("Q", bytes(8 * self.page_entries))
        self._grow(self.page_ref, pid)
        self.page_ref[pid] = 1
        self.pages[pid] = page
        vd.ptab[pidx] = pid
        if old:
            self._page_decref(old)

    def _entry(self, op: str, vid: int, cidx: int) -> tuple[VDisk, array, int]:
        """The VDisk, its private page and the index in it of chunk ``cidx``."""
        vd = self._vd(vid)
        pidx, i = divmod(cidx, self.page_entries)
        pid = vd.ptab.get(pidx)
        if not pid or self.page_ref[pid] != 1:
            raise FormatError(f"{op} on a shared or missing page (VDisk {vid} chunk {cidx})")
        return vd, self.pages[pid], i

    def _take_slot(self, slot: int) -> None:
        """A fresh slot gets its first reference."""
        if slot <= 0 or (slot < len(self.slot_ref) and self.slot_ref[slot]):
            raise FormatError(f"slot {slot} is in use")
        self._grow(self.slot_ref, slot)
        self.slot_ref[slot] = 1
        if slot >= len(self.hot):
            self.hot.extend(bytes(max(slot + 1, 2 * len(self.hot)) - len(self.hot)))
        self.hot[slot] = 1

    def _op_eset(self, vid: int, cidx: int, slot: int) -> None:
        vd, page, i = self._entry("eset", vid, cidx)
        old = page[i]
        if slot:
            self._take_slot(slot)
            if not old:
                vd.nalloc += 1
        elif old:
            vd.nalloc -= 1
        page[i] = slot
        if old:
            self._slot_decref(old)

    def _op_pset(self, vid: int, cidx: int, slot: int, base: int, mask: int) -> None:
        _, page, i = self._entry("pset", vid, cidx)
        if not base or page[i] != base or base in self.partial:
            raise FormatError(f"pset: chunk {cidx} of VDisk {vid} is not at base {base}")
        if not 0 < mask < self.full_mask:
            raise FormatError(f"pset: bad block mask {mask:#x}")
        self._take_slot(slot)
        page[i] = slot
        self.partial[slot] = [base, mask]     # base keeps its reference: now the partial's

    def _op_pmask(self, slot: int, mask: int) -> None:
        p = self.partial.get(slot)
        if p is None or mask & ~self.full_mask or p[1] & ~mask:
            raise FormatError(f"pmask {mask:#x} does not fit slot {slot}")
        if mask == self.full_mask:
            del self.partial[slot]
            self._slot_decref(p[0])
        else:
            p[1] = mask

    def _op_cold(self, blob: bytes) -> None:
        slots = codec.array_from_bin("Q", blob, "cold")
        for s in slots:
            if not 0 < s < len(self.slot_ref) or not self.slot_ref[s]:
                raise FormatError(f"cold: slot {s} is not in use")
            self.hot[s] = 0

    def is_hot(self, slot: int) -> bool:
        return slot < len(self.hot) and self.hot[slot] == 1

    def hot_slots(self) -> array:
        return array("Q", [m.start() for m in re.finditer(b"\x01", self.hot)])

    def _op_vshare(self, src: int, dst: int, p0: int, p1: int) -> None:
        s, d = self._vd(src), self._vd(dst)
        if p1 > s.npages or p1 > d.npages or p0 < 0 or p0 > p1:
            raise FormatError("vshare range out of bounds")
        if d.pages_in(p0, p1):
            raise FormatError(f"vshare onto a mapped page (VDisk {dst} pages {p0}-{p1})")
        page_ref = self.page_ref
        for pidx, pid in s.pages_in(p0, p1):
            page_ref[pid] += 1
            d.ptab[pidx] = pid
            d.nalloc += self.mapped_in_page(pid)

    def _op_pdrop(self, vid: int, pidx: int) -> None:
        vd = self._vd(vid)
        if pidx not in vd.ptab:
            raise FormatError(f"pdrop: VDisk {vid} has no page {pidx}")
        self._drop_page(vd, pidx)

    def _drop_page(self, vd: VDisk, pidx: int) -> None:
        pid = vd.ptab.pop(pidx)
        vd.nalloc -= self.mapped_in_page(pid)
        self._page_decref(pid)

    def _op_vdel(self, vid: int) -> None:
        vd = self._vd(vid)
        for pid in vd.ptab.values():
            self._page_decref(pid)
        if vd.name is not None:
            del self.names[vd.name]
        del self.vdisks[vid]

    def _op_jnew(self, rec: dict) -> None:
        job = Job.from_record(rec, "jnew")
        if job.id in self.jobs:
            raise FormatError(f"clone job {job.id} exists already")
        self.jobs[job.id] = job
        self.next_job = max(self.next_job, job.id + 1)

    def _op_jset(self, jid: int, key: str, value: Any) -> None:
        job = self._job(jid)
        job.check_field(key, value)
        setattr(job, key, value)

    def _op_jdone(self, jid: int, pidx: int) -> None:
        self._job(jid).done.append(pidx)

    def _op_jdel(self, jid: int) -> None:
        self._job(jid)
        del self.jobs[jid]

    # ----------------------------------------------------------------- refcounts
    @staticmethod
    def _grow(a: array, idx: int) -> None:
        if idx >= len(a):
            a.extend(array(a.typecode, bytes(a.itemsize * (max(idx + 1, 2 * len(a)) - len(a)))))

    def _page_decref(self, pid: int) -> None:
        self.page_ref[pid] -= 1
        freed = self.page_ref[pid] == 0
        self.drops.page(pid, freed)
        if freed:
            for s in self.pages.pop(pid):
                if s:
                    self._slot_decref(s)

    def _slot_decref(self, s: int) -> None:
        self.slot_ref[s] -= 1
        freed = self.slot_ref[s] == 0
        self.drops.slot(s, freed)
        if freed:
            self.hot[s] = 0
            p = self.partial.pop(s, None)
            if p is not None:
                self._slot_decref(p[0])

    # ----------------------------------------------------------------- figures
    def usage(self, vd: VDisk) -> tuple[int, int]:
        """(allocated, unique) bytes of a VDisk; shared = allocated - unique."""
        unique = 0
        slot_ref = self.slot_ref
        for pid in vd.ptab.values():
            if self.page_ref[pid] == 1:
                unique += sum(1 for s in self.pages[pid] if s and slot_ref[s] == 1)
        return vd.nalloc * self.chunk_size, unique * self.chunk_size

    def slots_in_use(self) -> int:
        return len(self.slot_ref) - self.slot_ref.count(0)

    # ----------------------------------------------------------------- (de)serialise
    def to_record(self, gen: int, uuid: str = "") -> dict:
        """The checkpoint record (docs/FORMAT.md, "checkpoint"): a snapshot that shares
        nothing mutable with the live state, so it may be packed in another thread."""
        pids = array("Q", sorted(self.pages))
        blob = bytearray()
        for pid in pids:
            blob += codec.array_to_bin(self.pages[pid])
        return {
            "kind": "checkpoint", "v": codec.FORMAT_VERSION, "gen": gen, "uuid": uuid,
            "chunk_size": self.chunk_size, "page_entries": self.page_entries,
            "next_vid": self.next_vid, "next_job": self.next_job,
            "vdisks": [{"vid": vd.vid, "name": vd.name, "size": vd.size, "props": dict(vd.props),
                        "pmap": codec.array_to_bin(array("Q", [
                            x for item in sorted(vd.ptab.items()) for x in item]))}
                       for vd in self.vdisks.values()],
            "page_ids": codec.array_to_bin(pids), "pages": bytes(blob),
            "page_ref": codec.array_to_bin(self.page_ref),
            "slot_ref": codec.array_to_bin(self.slot_ref),
            "jobs": [job.to_record() for job in self.jobs.values()],
            "partial": [[s, b, m] for s, (b, m) in sorted(self.partial.items())],
            "hot": codec.array_to_bin(self.hot_slots()),
        }

    @classmethod
    def from_record(cls, rec: dict, what: str) -> "Metadata":
        codec.check_version(rec, "checkpoint", what)
        try:
            m = cls(rec["chunk_size"], rec["page_entries"])
            m.next_vid = rec["next_vid"]
            m.next_job = rec["next_job"]
            pe = m.page_entries
            pids = codec.array_from_bin("Q", rec["page_ids"], what)
            blob = codec.array_from_bin("Q", rec["pages"], what)
            if len(blob) != len(pids) * pe:
                raise FormatError(f"{what}: page data does not match the page ids")
            for n, pid in enumerate(pids):
                m.pages[pid] = blob[n * pe:(n + 1) * pe]
            m.page_ref = codec.array_from_bin("I", rec["page_ref"], what)
            m.slot_ref = codec.array_from_bin("I", rec["slot_ref"], what)
            for d in rec["vdisks"]:
                npages = m.pages_for(d["size"])
                vd = VDisk(d["vid"], d["name"], d["size"], d["props"],
                           _page_table(d, npages, what), npages)
                if any(not 0 <= p < vd.npages for p in vd.ptab):
                    raise FormatError(f"{what}: VDisk {vd.vid} maps a page past its size")
                for pid in vd.ptab.values():
                    if pid not in m.pages:
                        raise FormatError(f"{what}: VDisk {vd.vid} maps a missing page {pid}")
                    vd.nalloc += m.mapped_in_page(pid)
                m.vdisks[vd.vid] = vd
                if vd.name is not None:
                    m.names[vd.name] = vd.vid
            for n, job in enumerate(rec["jobs"]):
                j = Job.from_record(job, f"{what}: clone job #{n}")
                m.jobs[j.id] = j
            for s, b, mask in rec.get("partial", ()):     # format 2
                m.partial[int(s)] = [int(b), int(mask)]
            hot = codec.array_from_bin("Q", rec.get("hot", b""), what)   # format 3
            m.hot = bytearray(max(len(m.slot_ref), max(hot, default=0) + 1))
            for s in hot:
                m.hot[s] = 1      # fsck's HotSlots check: only slots in use
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{what}: malformed checkpoint ({e!r})") from None
        return m


def _page_table(d: dict, npages: int, what: str) -> dict[int, int]:
    """A checkpoint VDisk's page table: the sparse ``pmap`` (format 4), or the dense
    ``ptab`` of older formats (one page id per page index, 0 = none)."""
    if "pmap" in d:
        pairs = codec.array_from_bin("Q", d["pmap"], what)
        if len(pairs) % 2:
            raise FormatError(f"{what}: VDisk {d['vid']} page map has an odd length")
        ptab = dict(zip(pairs[0::2], pairs[1::2]))
        if len(ptab) * 2 != len(pairs) or 0 in ptab.values():
            raise FormatError(f"{what}: VDisk {d['vid']} page map repeats a page index "
                              "or names page 0")
        return ptab
    dense = codec.array_from_bin("Q", d["ptab"], what)
    if len(dense) != npages:
        raise FormatError(f"{what}: VDisk {d['vid']} page table has the wrong length")
    return {p: pid for p, pid in enumerate(dense) if pid}
