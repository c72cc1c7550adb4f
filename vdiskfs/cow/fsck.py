"""Consistency check and repair of a pool: one check per invariant, each with its repair.

A check looks at one invariant (docs/ARCHITECTURE.md, "Invariants"; docs/FORMAT.md for the
records) and reports *findings*, each with a severity (as thin_check and borg's check do):

    INFO   not a problem: a state the next mount settles (a torn journal tail, a clone
           in progress, a VDisk unlinked while open)
    LEAK   harmless: space held that nothing uses (a refcount above its references, an
           unreferenced page); repair frees it
    ERROR  metadata that could serve wrong bytes or let a write change another VDisk (a
           double-owned slot, a missing page, a bad partial record, an openable half-made
           clone); repair rebuilds it from the maps, which are the data
    LOST   acknowledged data is gone (a damaged journal batch, chunks past the end of the
           data file); repair can only make it read as zeros and say so

``check_pool`` runs every check's ``detect`` on an open pool: ``vdiskfs fsck`` on a pool
opened read-only, the engine tests on their live pool after every step. ``repair`` opens
the pool salvaging the journal, runs every ``repair`` in order (later checks rely on the
earlier ones: names before jobs, pages before slots), writes a checkpoint and checks again.
"""

from __future__ import annotations

import enum
import os
from array import array
from dataclasses import dataclass, field

from . import checksum, names
from .errors import FormatError
from .meta import Metadata
from .pool import Pool
from .records import ERROR as JOB_ERROR, RUNNING


class Severity(enum.IntEnum):
    INFO = 0
    LEAK = 1
    ERROR = 2
    LOST = 3


@dataclass
class Finding:
    severity: Severity
    check: str
    text: str


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def add(self, severity: Severity, check: str, texts: list[str] | str,
            what: str = "", limit: int = 20) -> None:
        """Record findings; more than ``limit`` alike are summed up as one."""
        if isinstance(texts, str):
            texts = [texts]
        for text in texts[:limit]:
            self.findings.append(Finding(severity, check, text))
        if len(texts) > limit:
            self.findings.append(Finding(severity, check,
                                         f"... and {len(texts) - limit} more {what}"))

    @property
    def errors(self) -> list[str]:
        return [f.text for f in self.findings if f.severity > Severity.INFO]

    @property
    def notes(self) -> list[str]:
        return [f.text for f in self.findings if f.severity == Severity.INFO]

    @property
    def clean(self) -> bool:
        return not self.errors

    @property
    def worst(self) -> Severity:
        return max((f.severity for f in self.findings), default=Severity.INFO)


class Context:
    """What the checks look at; ``release`` collects slots a repair freed."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.meta: Metadata = pool.meta
        self.data_size = pool.store.file_size()
        self.release: list[int] = []


class Check:
    name = ""

    def detect(self, ctx: Context, r: Report) -> None:
        raise NotImplementedError

    def repair(self, ctx: Context, r: Report) -> None:
        """Make the invariant hold; INFO findings say what was done, LOST what is gone."""
        raise NotImplementedError


def count_page_refs(m: Metadata) -> tuple[array, list[str]]:
    """References to each page from the page tables, and entries naming missing pages."""
    count = array("I", bytes(4 * (max(len(m.page_ref), max(m.pages, default=0) + 1))))
    missing = []
    for vd in m.vdisks.values():
        for pidx, pid in sorted(vd.ptab.items()):
            if pid not in m.pages:
                missing.append(f"VDisk {vd.name or vd.vid} page {pidx} names missing page {pid}")
                continue
            count[pid] += 1
    return count, missing


def count_slot_refs(m: Metadata) -> array:
    """References to each slot, counted from the pages (what slot_ref should be)."""
    count = array("I", bytes(4 * max(len(m.slot_ref), 1)))
    for page in m.pages.values():
        for s in page:
            if not s:
                continue
            if s >= len(count):
                count.extend(array("I", bytes(4 * (s + 1 - len(count)))))
            count[s] += 1
    for s, (base, _) in m.partial.items():   # a mapped partial slot references its base
        if s < len(count) and count[s] and base:
            if base >= len(count):
                count.extend(array("I", bytes(4 * (base + 1 - len(count)))))
            count[base] += 1
    return count


class VDiskRecords(Check):
    """Names are valid and unique and the name index agrees; a page table fits its size."""
    name = "vdisks"

    def detect(self, ctx: Context, r: Report) -> None:
        m = ctx.meta
        seen: dict[str, int] = {}
        for vd in m.vdisks.values():
            if vd.name is None:
                r.add(Severity.INFO, self.name,
                      f"VDisk {vd.vid} was unlinked while open; the next mount frees it")
            elif not names.valid(vd.name):
                r.add(Severity.ERROR, self.name, f"VDisk {vd.vid} has an invalid name "
                                                 f"{vd.name!r}")
            elif vd.name in seen:
                r.add(Severity.ERROR, self.name,
                      f"VDisks {seen[vd.name]} and {vd.vid} share the name {vd.name}")
            else:
                seen[vd.name] = vd.vid
            if m.names.get(vd.name, vd.vid) != vd.vid:
                r.add(Severity.ERROR, self.name, f"name index of {vd.name} is wrong")
            past = [p for p in vd.ptab if not 0 <= p < m.pages_for(vd.size)]
            if past or vd.npages != m.pages_for(vd.size):
                r.add(Severity.ERROR, self.name,
                      f"VDisk {vd.name}: page table ({vd.npages} pages, {len(past)} mapped "
                      f"past the end) does not fit its size {vd.size}")
            if vd.vid >= m.next_vid:
                r.add(Severity.ERROR, self.name,
                      f"VDisk id {vd.vid} is not below next_vid {m.next_vid}")

    def repair(self, ctx: Context, r: Report) -> None:
        m = ctx.meta
        m.names.clear()
        for vd in sorted(m.vdisks.values(), key=lambda v: v.vid):
            if vd.name is not None and (not names.valid(vd.name) or vd.name in m.names):
                new = f"recovered-{vd.vid}"
                r.add(Severity.INFO, self.name, f"VDisk {vd.vid}: name {vd.name!r} is "
                                                f"invalid or taken; renamed {new}")
                vd.name = new
            if vd.name is not None:
                m.names[vd.name] = vd.vid
            want = m.pages_for(vd.size)
            past = [p for p in vd.ptab if not 0 <= p < want]
            if past or vd.npages != want:
                r.add(Severity.INFO, self.name,
                      f"VDisk {vd.name}: page table cut to its size ({want} pages; "
                      f"{len(past)} mapped past the end dropped)")
                for p in past:
                    del vd.ptab[p]
                vd.npages = want
            m.next_vid = max(m.next_vid, vd.vid + 1)


class CloneJobs(Check):
    """Invariant 5: a running clone job names a live source and its unfinished
    destination; no VDisk is marked unfinished without such a job (or it could be opened
    half-made)."""
    name = "clone jobs"

    @staticmethod
    def _sound(m: Metadata, job) -> bool:
        dst = m.vdisks.get(job.dst)
        return job.src in m.vdisks and dst is not None and dst.props.get("clone_job") == job.id

    @staticmethod
    def _orphans(m: Metadata) -> list:
        """VDisks marked unfinished without a running job."""
        out = []
        for vd in m.vdisks.values():
            jid = vd.props.get("clone_job")
            if jid is not None and (jid not in m.jobs or not m.jobs[jid].running):
                out.append((vd, jid))
        return out

    def detect(self, ctx: Context, r: Report) -> None:
        m = ctx.meta
        for job in m.jobs.values():
            if not job.running:
                continue
            if job.src not in m.vdisks or job.dst not in m.vdisks:
                r.add(Severity.ERROR, self.name, f"clone job {job.id} names a missing VDisk")
            elif not self._sound(m, job):
                r.add(Severity.ERROR, self.name,
                      f"clone job {job.id}: destination {m.vdisks[job.dst].name} is not "
                      "marked unfinished (it could be opened half-made)")
            else:
                r.add(Severity.INFO, self.name,
                      f"clone {job.src_name} -> {job.dst_name} is in progress (page "
                      f"{job.cursor}): the next mount resumes it")
        for vd, jid in self._orphans(m):
            r.add(Severity.ERROR, self.name, f"VDisk {vd.name} is marked as an unfinished "
                                             f"clone of job {jid}, which is not running")

    def repair(self, ctx: Context, r: Report) -> None:
        m = ctx.meta
        for job in m.jobs.values():
            if job.running and not self._sound(m, job):
                job.state, job.error = JOB_ERROR, "repaired by fsck"
                r.add(Severity.INFO, self.name,
                      f"clone {job.src_name} -> {job.dst_name}: marked Error")
        for vd, _ in self._orphans(m):
            r.add(Severity.INFO, self.name,
                  f"VDisk {vd.name}: an unfinished clone without a running job; removed")
            if vd.name is not None:
                m.names.pop(vd.name, None)
            del m.vdisks[vd.vid]      # its pages go back when the refcounts are rebuilt


class LostSlots(Check):
    """Invariant 1 seen from the data file: every mapped slot lies inside it (a slot past
    its end lost its data: a truncated data file)."""
    name = "lost slots"

    @staticmethod
    def _lost(ctx: Context) -> list[tuple[dict, int, int]]:
        m, end = ctx.meta, ctx.data_size
        return [(page, i, s) for page in m.pages.values() for i, s in enumerate(page)
                if s and s * m.chunk_size >= end]

    def detect(self, ctx: Context, r: Report) -> None:
        lost = sorted({s for _, _, s in self._lost(ctx)})
        r.add(Severity.LOST, self.name,
              [f"slot {s} is mapped but lies past the end of the data file" for s in lost],
              "lost slots")

    def repair(self, ctx: Context, r: Report) -> None:
        lost = self._lost(ctx)
        for page, i, _ in lost:
            page[i] = 0
        if lost:
            r.add(Severity.LOST, self.name,
                  f"{len(lost)} chunk(s) pointed past the end of the data file: their data "
                  "is lost and they now read as zeros")


class PageRefs(Check):
    """Invariant 3 for pages: page_ref[pid] == number of page-table entries naming pid,
    and every named page exists."""
    name = "page refcounts"

    def detect(self, ctx: Context, r: Report) -> None:
        m = ctx.meta
        count, missing = count_page_refs(m)
        low, high = [], []
        for pid in range(1, len(count)):
            have = m.page_ref[pid] if pid < len(m.page_ref) else 0
            if count[pid] == have:
                continue
            (low if count[pid] > have else high).append(
                f"page {pid}: refcount {have}, referenced {count[pid]} times")
        leaked = [f"page {pid} is stored but not referenced"
                  for pid in m.pages if count[pid] == 0]
        r.add(Severity.ERROR, self.name, missing, "missing pages")
        # Fewer counted references than the refcount says: the page is held for nothing.
        r.add(Severity.LEAK, self.name, high, "page refcount errors")
        # More: a write could change a page another VDisk still reads.
        r.add(Severity.ERROR, self.name, low, "page refcount errors")
        r.add(Severity.LEAK, self.name, leaked, "leaked pages")
        r.stats["pages"] = len(m.pages)

    def repair(self, ctx: Context, r: Report) -> None:
        m = ctx.meta
        for vd in m.vdisks.values():
            for pidx, pid in sorted(vd.ptab.items()):
                if pid not in m.pages:
                    r.add(Severity.LOST, self.name, f"VDisk {vd.name}: page {pidx} was lost; "
                                                    "its range now reads as zeros")
                    del vd.ptab[pidx]
        count, _ = count_page_refs(m)
        for pid in [p for p in m.pages if not count[p]]:
            r.add(Severity.INFO, self.name, f"page {pid} was not referenced; freed")
            del m.pages[pid]
        bad = sum(1 for p in m.pages
                  if (m.page_ref[p] if p < len(m.page_ref) else 0) != count[p])
        if bad:
            r.add(Severity.INFO, self.name, f"{bad} page refcount(s) rebuilt from the page "
                                            "tables")
        m.page_ref = count


class Partials(Check):
    """Partial slots: mapped, with a whole (non-partial) base that is still in the data
    file, and a mask naming some but not all blocks."""
    name = "partial slots"

    @staticmethod
    def _usable(ctx: Context, base: int, mask: int) -> bool:
        m = ctx.meta
        return (bool(base) and base not in m.partial and base * m.chunk_size < ctx.data_size
                and 0 < mask < m.full_mask)

    def detect(self, ctx: Context, r: Report) -> None:
        m = ctx.meta
        errors = []
        for s, (base, mask) in sorted(m.partial.items()):
            if not (s < len(m.slot_ref) and m.slot_ref[s]):
                errors.append(f"partial slot {s} is not in use")
            elif not base or base in m.partial:
                errors.append(f"partial slot {s} has an invalid base {base}")
            elif base * m.chunk_size >= ctx.data_size:
                errors.append(f"partial slot {s}: its base {base} lies past the end of the "
                              "data file")
            if not 0 < mask < m.full_mask:
                errors.append(f"partial slot {s} has an invalid block mask {mask:#x}")
        r.add(Severity.ERROR, self.name, errors, "partial slot errors")
        r.stats["partial_slots"] = len(m.partial)

    def repair(self, ctx: Context, r: Report) -> None:
        """Drop the records of partial slots no map points at; a mapped one whose base is
        unusable gets zeros in the blocks it lacks (their data is lost) and becomes whole."""
        m = ctx.meta
        mapped: set[int] = set()
        for page in m.pages.values():
            mapped.update(page)
        for s, (base, mask) in sorted(m.partial.items()):
            if s not in mapped:
                del m.partial[s]
                r.add(Severity.INFO, self.name, f"partial slot {s} was not mapped; its "
                                                "record dropped")
                continue
            if self._usable(ctx, base, mask):
                continue
            bs = m.block_size
            held = mask if 0 <= mask <= m.full_mask else 0
            store = ctx.pool.store
            for b in range(m.chunk_size // bs):
                if not held >> b & 1:
                    store.write(s, b * bs, bytes(bs))
                    store.write_sums((s * m.chunk_size + b * bs) // checksum.BLOCK,
                                     checksum.zero_sums(bs // checksum.BLOCK))
            del m.partial[s]
            r.add(Severity.LOST, self.name, f"partial slot {s}: base {base} unusable; the "
                                            "blocks it lacked now read as zeros")


class SlotRefs(Check):
    """Invariant 3 for slots: slot_ref[s] == the page entries naming s plus the partial
    slots whose base it is."""
    name = "slot refcounts"

    def detect(self, ctx: Context, r: Report) -> None:
        m = ctx.meta
        count = count_slot_refs(m)
        refs = m.slot_ref
        bad, leaked, double = [], [], []
        for s in range(1, len(count)):
            have = refs[s] if s < len(refs) else 0
            c = count[s]
            if c == have:
                continue
            if c == 0:
                leaked.append(f"slot {s} has refcount {have} but no map points at it (leaked)")
            elif c > have:
                double.append(f"slot {s} is referenced {c} times but its refcount is {have} "
                              "(double-owned: a write could change another VDisk)")
            else:
                bad.append(f"slot {s}: refcount {have}, referenced {c} times")
        r.add(Severity.LEAK, self.name, leaked, "leaked slots")
        r.add(Severity.ERROR, self.name, double, "double-owned slots")
        r.add(Severity.LEAK, self.name, bad, "slot refcount errors")
        r.stats["slots_in_use"] = sum(1 for c in count if c)

    def repair(self, ctx: Context, r: Report) -> None:
        m = ctx.meta
        count = count_slot_refs(m)
        old = m.slot_ref
        leaked = [s for s in range(1, len(old)) if old[s] and not (s < len(count) and count[s])]
        bad = sum(1 for s in range(1, len(count)) if count[s] != (old[s] if s < len(old) else 0))
        if leaked:
            r.add(Severity.INFO, self.name, f"{len(leaked)} leaked slot(s) freed")
        if bad:
            r.add(Severity.INFO, self.name, f"{bad} slot refcount(s) rebuilt from the maps")
        m.slot_ref = count
        ctx.release += leaked


class HotSlots(Check):
    """Only slots in use are hot (a hot slot may be written in place, and a mismatch in it
    after a crash is accepted as a cut write: datapath.py)."""
    name = "hot slots"

    @staticmethod
    def _stray(m: Metadata) -> list[int]:
        return [s for s in m.hot_slots() if not (s < len(m.slot_ref) and m.slot_ref[s])]

    def detect(self, ctx: Context, r: Report) -> None:
        r.add(Severity.LEAK, self.name,
              [f"slot {s} is marked hot but not in use" for s in self._stray(ctx.meta)],
              "stray hot slots")

    def repair(self, ctx: Context, r: Report) -> None:
        stray = self._stray(ctx.meta)
        for s in stray:
            ctx.meta.hot[s] = 0
        if stray:
            r.add(Severity.INFO, self.name, f"{len(stray)} stray hot mark(s) cleared")


class SumsCoverage(Check):
    """Every slot in use has its block sums (the sums file reaches past them)."""
    name = "block sums"

    @staticmethod
    def _uncovered(ctx: Context) -> list[int]:
        m = ctx.meta
        if ctx.pool.version < 3:
            return []                     # sums come with the upgrade at the next mount
        nb = m.chunk_size // checksum.BLOCK
        have = ctx.pool.store.sums_size()
        return [s for s in range(max(1, have // nb), len(m.slot_ref)) if m.slot_ref[s]]

    def detect(self, ctx: Context, r: Report) -> None:
        missing = self._uncovered(ctx)
        if missing:
            r.add(Severity.LOST, self.name,
                  f"the sums file ends before the sums of {len(missing)} slot(s) in use "
                  f"(from slot {missing[0]}): their data cannot be checked and reads fail")

    def repair(self, ctx: Context, r: Report) -> None:
        missing = self._uncovered(ctx)
        store, nb = ctx.pool.store, ctx.meta.chunk_size // checksum.BLOCK
        for s in missing:
            store.rehash(s * nb, memoryview(store.read(s)))
        if missing:
            r.add(Severity.LOST, self.name,
                  f"sums of {len(missing)} slot(s) recomputed from their data as it is "
                  "(damage in it from before cannot be told any more)")


class DerivedState(Check):
    """What is rebuilt at every open agrees with the metadata: each VDisk's count of mapped
    chunks (st_blocks) and the space map (no free slot or page id in use, none above the
    high-water mark). Finds engine bugs in a live pool; after open it holds by
    construction."""
    name = "derived state"

    def detect(self, ctx: Context, r: Report) -> None:
        m = ctx.meta
        for vd in m.vdisks.values():
            mapped = sum(m.mapped_in_page(pid) for pid in vd.ptab.values() if pid in m.pages)
            if vd.nalloc != mapped:
                r.add(Severity.ERROR, self.name,
                      f"VDisk {vd.name}: {vd.nalloc} chunks counted, {mapped} mapped")
        r.add(Severity.ERROR, self.name, ctx.pool.space.problems(m), "space map errors")

    def repair(self, ctx: Context, r: Report) -> None:
        # The space map is rebuilt from the repaired refcounts when the pool next opens.
        m = ctx.meta
        for vd in m.vdisks.values():
            vd.nalloc = sum(m.mapped_in_page(pid) for pid in vd.ptab.values())


CHECKS: tuple[Check, ...] = (VDiskRecords(), CloneJobs(), LostSlots(), PageRefs(),
                             Partials(), SlotRefs(), HotSlots(), SumsCoverage(),
                             DerivedState())


def check_pool(pool: Pool, r: Report | None = None) -> Report:
    """Run every check on an open pool (read-only for fsck, live for the engine tests)."""
    r = r or Report()
    ctx = Context(pool)
    for check in CHECKS:
        check.detect(ctx, r)
    return r


def check_data(pool: Pool, r: Report, accept: bool) -> None:
    """Every block of data against its sum (``fsck --data``; with ``accept``, as repair,
    torn blocks of suspect slots are accepted as they are)."""
    from .scrub import Scrub
    if pool.version < 3:
        r.add(Severity.INFO, "data", "a format 2 pool has no block sums yet (the next mount "
                                     "computes them): data not checked")
        return
    sc = Scrub(pool, accept=accept).run()
    r.stats["data_checked"] = sc.checked
    for d in sc.damaged():
        r.add(Severity.LOST, "data", f"VDisk {d.vdisk} bytes {d.start}-{d.end - 1}: damaged "
                                     "(fails its checksum: reads of it fail with EIO)")
    bad_blocks = len(sc.bad)
    if bad_blocks:
        r.stats["damaged_blocks"] = bad_blocks
    if sc.torn:
        r.stats["torn_blocks"] = sc.torn
        ranges = ", ".join(f"{d.vdisk} {d.start}-{d.end - 1}"
                           for d in sc.damaged(sc.torn_blocks)[:10])
        r.add(Severity.INFO, "data",
              f"{sc.torn} block(s) written in place when the pool went down do not match "
              f"their sums ({ranges}): unacknowledged writes cut short, "
              + ("accepted as they are" if accept else "accepted by the next read or by "
                                                        "fsck --repair"))


def fsck(path: str, data: bool = False) -> Report:
    """``vdiskfs fsck``: open read-only under the lock (so never while mounted): the header,
    checkpoint and every journal record must decode and apply, then every check runs
    (with ``data``, every block of data against its sum too)."""
    r = Report()
    try:
        pool = Pool(path, readonly=True)
    except FormatError as e:
        r.add(Severity.LOST, "metadata", f"unreadable metadata: {e}")
        return r
    try:
        why = pool.previous_failure()
        if why:
            r.add(Severity.ERROR, "fail-stop",
                  f"the last session stopped writing after an I/O error ({why}); the pool "
                  "holds what was durable before it (the next mount clears this)")
        for bad in pool.bad_headers:
            if pool.version < 3 and bad.endswith("copy is missing"):
                r.add(Severity.INFO, "metadata", "a format 2 pool: the next mount adds the "
                                                 "header copy")
                continue
            r.add(Severity.ERROR, "metadata", f"pool header: {bad} (the other copy is good; "
                                              "the next mount rewrites it)")
        if pool.cut_checkpoint:
            r.add(Severity.INFO, "metadata", "a crash cut a new checkpoint short: the "
                                             "previous generation holds the state (the next "
                                             "mount completes it)")
        for note in pool.notes:
            r.add(Severity.ERROR, "metadata", f"{note} (the next mount writes a new one)")
        if pool.journal.torn_bytes:
            r.add(Severity.INFO, "journal",
                  f"journal ends in a torn record of {pool.journal.torn_bytes} bytes (a crash "
                  "cut it; the next mount discards it)")
        check_pool(pool, r)
        if data:
            check_data(pool, r, accept=False)
        r.stats.update(vdisks=len(pool.meta.vdisks), replayed=pool.replayed,
                       chunk_size=pool.chunk_size, journal=pool.journal.gen,
                       data_bytes=pool.store.allocated_bytes())
    finally:
        pool.close(commit=False)
    return r


def repair(path: str, data: bool = False) -> Report:
    """``vdiskfs fsck --repair``: salvage the journal up to any damage, then let every check
    repair its invariant from the maps, which are the data. Writes a new checkpoint; the
    INFO findings say what was done, the others what was lost."""
    r = Report()
    try:
        pool = Pool(path, salvage=True)
    except FormatError as e:
        r.add(Severity.LOST, "metadata", f"cannot repair: {e}")
        return r
    try:
        j = pool.journal
        if pool.salvage_error or j.torn_bytes:
            what = pool.salvage_error or (f"damaged record at byte {j.damage_at}"
                                          if j.damage_at >= 0 else "a torn record")
            r.add(Severity.LOST, "journal", f"journal: {what}; dropped {j.torn_bytes} bytes of "
                                            f"records after byte {j.end} (changes in them are "
                                            "lost)")
            j.cut_torn_tail()
        ctx = Context(pool)
        for check in CHECKS:
            check.repair(ctx, r)
        if data:
            check_data(pool, r, accept=True)
        pool.checkpoint()
        pool.store.release(ctx.release)
    finally:
        pool.close(commit=False)
    after = fsck(path, data=data)
    if not after.clean:
        r.add(Severity.ERROR, "repair", [f"still wrong after repair: {e}" for e in after.errors])
    r.stats = after.stats
    return r
