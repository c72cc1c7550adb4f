"""Offline consistency check of a pool (``vdiskfs fsck``): one function per invariant.

The pool is opened read-only under its lock (so never while mounted): header, checkpoint and
every journal record must decode and apply (a record that does not is reported, nothing is
served from it); then the refcounts are recomputed from the maps and compared.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field

from .errors import FormatError
from .meta import Metadata
from .pool import Pool


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.errors


def _limit(items: list[str], what: str, n: int = 20) -> list[str]:
    return items[:n] + ([f"... and {len(items) - n} more {what}"] if len(items) > n else [])


def check_vdisks(m: Metadata, r: Report) -> None:
    from . import names
    seen = {}
    for vd in m.vdisks.values():
        if vd.name is None:
            r.notes.append(f"VDisk {vd.vid} was unlinked while open; the next mount frees it")
        elif not names.valid(vd.name):
            r.errors.append(f"VDisk {vd.vid} has an invalid name {vd.name!r}")
        elif vd.name in seen:
            r.errors.append(f"VDisks {seen[vd.name]} and {vd.vid} share the name {vd.name}")
        else:
            seen[vd.name] = vd.vid
        if m.names.get(vd.name, vd.vid) != vd.vid:
            r.errors.append(f"name index of {vd.name} is wrong")
        if len(vd.ptab) != m.pages_for(vd.size):
            r.errors.append(f"VDisk {vd.name}: page table length {len(vd.ptab)} does not "
                            f"match size {vd.size}")
        if vd.vid >= m.next_vid:
            r.errors.append(f"VDisk id {vd.vid} is not below next_vid {m.next_vid}")


def check_page_refs(m: Metadata, r: Report) -> None:
    """Invariant 3 for pages: page_ref[pid] == number of page-table entries naming pid."""
    count = array("I", bytes(4 * len(m.page_ref)))
    missing = []
    for vd in m.vdisks.values():
        for pidx, pid in enumerate(vd.ptab):
            if not pid:
                continue
            if pid not in m.pages or pid >= len(count):
                missing.append(f"VDisk {vd.name or vd.vid} page {pidx} names missing page {pid}")
                continue
            count[pid] += 1
    bad = [f"page {pid}: refcount {m.page_ref[pid]}, referenced {count[pid]} times"
           for pid in range(1, len(count)) if count[pid] != m.page_ref[pid]]
    leaked = [f"page {pid} is stored but not referenced"
              for pid in m.pages if pid < len(count) and count[pid] == 0]
    r.errors += _limit(missing, "missing pages") + _limit(bad, "page refcount errors")
    r.errors += _limit(leaked, "leaked pages")
    r.stats["pages"] = len(m.pages)


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


def check_partials(m: Metadata, data_size: int, r: Report) -> None:
    """Partial slots: mapped, with a whole (non-partial) base that is still in the data
    file, and a mask naming some but not all blocks."""
    errors = []
    for s, (base, mask) in sorted(m.partial.items()):
        if not (s < len(m.slot_ref) and m.slot_ref[s]):
            errors.append(f"partial slot {s} is not in use")
        elif not base or base in m.partial:
            errors.append(f"partial slot {s} has an invalid base {base}")
        elif base * m.chunk_size >= data_size:
            errors.append(f"partial slot {s}: its base {base} lies past the end of the data "
                          "file")
        if not 0 < mask < m.full_mask:
            errors.append(f"partial slot {s} has an invalid block mask {mask:#x}")
    r.errors += _limit(errors, "partial slot errors")
    r.stats["partial_slots"] = len(m.partial)


def check_slot_refs(m: Metadata, data_size: int, r: Report) -> None:
    """Invariant 3 for slots; a slot past the data file's end would have lost its data."""
    count = count_slot_refs(m)
    beyond = []
    refs = m.slot_ref
    bad, leaked, double = [], [], []
    for s in range(1, len(count)):
        have = refs[s] if s < len(refs) else 0
        c = count[s]
        if c == have:
            if c and s * m.chunk_size >= data_size:
                beyond.append(f"slot {s} is mapped but lies past the end of the data file")
            continue
        if c == 0:
            leaked.append(f"slot {s} has refcount {have} but no map points at it (leaked)")
        elif c > have:
            double.append(f"slot {s} is referenced {c} times but its refcount is {have} "
                          "(double-owned: a write could change another VDisk)")
        else:
            bad.append(f"slot {s}: refcount {have}, referenced {c} times")
    r.errors += _limit(leaked, "leaked slots") + _limit(double, "double-owned slots")
    r.errors += _limit(bad, "slot refcount errors") + _limit(beyond, "lost slots")
    r.stats["slots_in_use"] = sum(1 for c in count if c)


def check_jobs(m: Metadata, r: Report) -> None:
    """Invariant 5: a running clone job names a live source and its unfinished destination;
    no VDisk is marked unfinished without such a job."""
    for job in m.jobs.values():
        if job.get("state") != "running":
            continue
        src, dst = m.vdisks.get(job["src"]), m.vdisks.get(job["dst"])
        if src is None or dst is None:
            r.errors.append(f"clone job {job['id']} names a missing VDisk")
        elif dst.props.get("clone_job") != job["id"]:
            r.errors.append(f"clone job {job['id']}: destination {dst.name} is not marked "
                            "unfinished (it could be opened half-made)")
        else:
            r.notes.append(f"clone {job['src_name']} -> {job['dst_name']} is in progress "
                           f"(page {job['cursor']}): the next mount resumes it")
    for vd in m.vdisks.values():
        jid = vd.props.get("clone_job")
        if jid is not None and m.jobs.get(jid, {}).get("state") != "running":
            r.errors.append(f"VDisk {vd.name} is marked as an unfinished clone of job {jid}, "
                            "which is not running")


def fsck(path: str) -> Report:
    r = Report()
    try:
        pool = Pool(path, readonly=True)
    except FormatError as e:
        r.errors.append(f"unreadable metadata: {e}")
        return r
    try:
        m = pool.meta
        if pool.journal.torn_bytes:
            r.notes.append(f"journal ends in a torn record of {pool.journal.torn_bytes} bytes "
                           "(a crash cut it; the next mount discards it)")
        data_size = os.fstat(pool.store.fd).st_size
        check_vdisks(m, r)
        check_page_refs(m, r)
        check_slot_refs(m, data_size, r)
        check_partials(m, data_size, r)
        check_jobs(m, r)
        r.stats.update(vdisks=len(m.vdisks), replayed=pool.replayed,
                       chunk_size=pool.chunk_size, journal=pool.journal.gen,
                       data_bytes=pool.store.allocated_bytes())
    finally:
        pool.close(commit=False)
    return r



# ---------------------------------------------------------------- repair
def repair(path: str) -> Report:
    """``vdiskfs fsck --repair``: salvage the journal up to any damage, then rebuild what
    can be derived (refcounts, free space) from the maps, which are the data. Writes a new
    checkpoint; ``Report.notes`` says what was done, ``Report.errors`` what was lost."""
    r = Report()
    try:
        pool = Pool(path, salvage=True)
    except FormatError as e:
        r.errors.append(f"cannot repair: {e}")
        return r
    try:
        m = pool.meta
        if pool.salvage_error or pool.journal.torn_bytes:
            what = pool.salvage_error or (
                f"damaged record at byte {pool.journal.damage_at}"
                if pool.journal.damage_at >= 0 else "a torn record")
            r.errors.append(f"journal: {what}; dropped {pool.journal.torn_bytes} bytes of "
                            f"records after byte {pool.journal.end} (changes in them are lost)")
            pool.journal.cut_torn_tail()
        _repair_vdisks(m, r)
        _repair_jobs(m, r)
        _unmap_lost_slots(m, os.fstat(pool.store.fd).st_size, r)
        _repair_pages(m, r)
        _repair_partials(pool, os.fstat(pool.store.fd).st_size, r)
        leaked = _repair_slots(m, r)
        pool.checkpoint()
        pool.store.release(leaked)
    finally:
        pool.close(commit=False)
    after = fsck(path)
    if not after.clean:
        r.errors += [f"still wrong after repair: {e}" for e in after.errors]
    r.stats = after.stats
    return r


def _repair_vdisks(m: Metadata, r: Report) -> None:
    from . import names
    m.names.clear()
    for vd in sorted(m.vdisks.values(), key=lambda v: v.vid):
        if vd.name is not None and (not names.valid(vd.name) or vd.name in m.names):
            new = f"recovered-{vd.vid}"
            r.notes.append(f"VDisk {vd.vid}: name {vd.name!r} is invalid or taken; "
                           f"renamed {new}")
            vd.name = new
        if vd.name is not None:
            m.names[vd.name] = vd.vid
        want = m.pages_for(vd.size)
        if len(vd.ptab) != want:
            r.notes.append(f"VDisk {vd.name}: page table resized from {len(vd.ptab)} to "
                           f"{want} entries to fit its size")
            del vd.ptab[want:]
            vd.ptab.extend([0] * (want - len(vd.ptab)))
        m.next_vid = max(m.next_vid, vd.vid + 1)


def _repair_jobs(m: Metadata, r: Report) -> None:
    """A half-made clone must never become openable: unfinished ones without a sound job
    are removed (their pages go back when refcounts are rebuilt)."""
    for job in m.jobs.values():
        if job.get("state") != "running":
            continue
        dst = m.vdisks.get(job["dst"])
        if job["src"] not in m.vdisks or dst is None or \
                dst.props.get("clone_job") != job["id"]:
            job["state"], job["error"] = "Error", "repaired by fsck"
            r.notes.append(f"clone {job['src_name']} -> {job['dst_name']}: marked Error")
    for vd in list(m.vdisks.values()):
        jid = vd.props.get("clone_job")
        if jid is not None and m.jobs.get(jid, {}).get("state") != "running":
            r.notes.append(f"VDisk {vd.name}: an unfinished clone without a running job; "
                           "removed")
            if vd.name is not None:
                m.names.pop(vd.name, None)
            del m.vdisks[vd.vid]


def _unmap_lost_slots(m: Metadata, data_size: int, r: Report) -> None:
    """Entries naming slots past the end of the data file lost their data (a truncated
    data file): they become holes, reported, instead of pretending to hold zeros."""
    lost = 0
    for page in m.pages.values():
        for i, s in enumerate(page):
            if s and s * m.chunk_size >= data_size:
                page[i] = 0
                lost += 1
    if lost:
        r.errors.append(f"{lost} chunk(s) pointed past the end of the data file: their data "
                        "is lost and they now read as zeros")


def _repair_pages(m: Metadata, r: Report) -> None:
    count = array("I", bytes(4 * (max(m.pages, default=0) + 1)))
    for vd in m.vdisks.values():
        for pidx, pid in enumerate(vd.ptab):
            if not pid:
                continue
            if pid not in m.pages:
                r.errors.append(f"VDisk {vd.name}: page {pidx} was lost; its range now reads "
                                "as zeros")
                vd.ptab[pidx] = 0
                continue
            count[pid] += 1
    for pid in [p for p in m.pages if not count[p]]:
        r.notes.append(f"page {pid} was not referenced; freed")
        del m.pages[pid]
    bad = sum(1 for p in m.pages if (m.page_ref[p] if p < len(m.page_ref) else 0) != count[p])
    if bad:
        r.notes.append(f"{bad} page refcount(s) rebuilt from the page tables")
    m.page_ref = count
    for vd in m.vdisks.values():
        vd.nalloc = sum(m._nonzero(pid) for pid in vd.ptab if pid)


def _repair_partials(pool: Pool, data_size: int, r: Report) -> None:
    """Drop the records of partial slots no map points at; a mapped one whose base is
    unusable gets zeros in the blocks it lacks (their data is lost) and becomes whole."""
    m = pool.meta
    mapped = set()
    for page in m.pages.values():
        mapped.update(page)
    for s, (base, mask) in sorted(m.partial.items()):
        if s not in mapped:
            del m.partial[s]
            r.notes.append(f"partial slot {s} was not mapped; its record dropped")
            continue
        if (base and base not in m.partial and base * m.chunk_size < data_size
                and 0 < mask < m.full_mask):
            continue
        bs = m.block_size
        held = mask if 0 <= mask <= m.full_mask else 0
        for b in range(m.chunk_size // bs):
            if not held >> b & 1:
                pool.store.write(s, b * bs, bytes(bs))
        del m.partial[s]
        r.errors.append(f"partial slot {s}: base {base} unusable; the blocks it lacked now "
                        "read as zeros")


def _repair_slots(m: Metadata, r: Report) -> list[int]:
    count = count_slot_refs(m)
    old = m.slot_ref
    leaked = [s for s in range(1, len(old)) if old[s] and not (s < len(count) and count[s])]
    bad = sum(1 for s in range(1, len(count))
              if count[s] != (old[s] if s < len(old) else 0))
    if leaked:
        r.notes.append(f"{len(leaked)} leaked slot(s) freed")
    if bad:
        r.notes.append(f"{bad} slot refcount(s) rebuilt from the maps")
    m.slot_ref = count
    return leaked
