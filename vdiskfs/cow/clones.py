"""Clone jobs: point-in-time copies made by sharing map pages, in resumable steps.

A job shares the source's pages with the destination page by page (``vshare``: a page
refcount increment, no data is copied) from a cursor that only moves forward. The copy is
point-in-time although the source stays writable: before any change to a source page the
job has not reached yet, ``guard`` shares that page first (or, if it is a hole, marks it
done), so the later change copies-on-write like any change to a shared page. Every step is
a transaction that moves the cursor with the pages it shared, so after a crash the job
resumes exactly where its durable state says (pages below the cursor or in ``done`` are
the destination's; all others still hold their data as of the clone's start).

Job records are ``records.Job`` in ``Metadata.jobs`` (ops jnew/jset/jdone/jdel;
docs/FORMAT.md). The destination carries the prop ``clone_job`` = job id until the job
completes: it cannot be opened until then.

Clones works through public interfaces only: the metadata's queries, the space map (to
hold pages a cancel may still give back) and the transaction log it applies its ops to.
"""

from __future__ import annotations

import errno
import time

from . import names, props
from .commit import Transactions
from .errors import VDiskError
from .meta import Metadata, VDisk
from .records import COMPLETED, FINISHED, RUNNING, Job
from .space import Space

__all__ = ["Clones", "RUNNING", "FINISHED"]


class Clones:
    def __init__(self, meta: Metadata, space: Space, txn: Transactions, pool_uuid: str):
        self.meta = meta
        self.space = space
        self.txn = txn
        self.uuid = pool_uuid
        # source vid -> running jobs (the write path checks this dict first: O(1))
        self.sources: dict[int, list[Job]] = {}
        self._done: dict[int, set[int]] = {}
        for job in meta.jobs.values():
            if job.running:
                self._track(job)

    def _track(self, job: Job) -> None:
        self.sources.setdefault(job.src, []).append(job)
        self._done[job.id] = set(job.done)

    def _untrack(self, job: Job) -> None:
        jobs = self.sources.get(job.src, [])
        if job in jobs:
            jobs.remove(job)
            if not jobs:
                del self.sources[job.src]
        self._done.pop(job.id, None)

    # ------------------------------------------------------------ queries
    def jobs(self) -> list[Job]:
        return list(self.meta.jobs.values())

    def running(self) -> list[Job]:
        return [j for j in self.meta.jobs.values() if j.running]

    @staticmethod
    def percent(job: Job) -> int:
        if not job.total:
            return 0
        return min(99, job.progress * 100 // job.total)

    def busy_source(self, vd: VDisk) -> bool:
        return vd.vid in self.sources

    @staticmethod
    def unfinished(vd: VDisk) -> bool:
        return vd.props.get("clone_job") is not None

    def check_not_cloning(self, vd: VDisk) -> None:
        """A clone source or an unfinished destination cannot go away or change shape."""
        if self.busy_source(vd):
            raise VDiskError(errno.EBUSY, f"{vd.name} has a clone in progress")
        if self.unfinished(vd):
            raise VDiskError(errno.EBUSY, f"{vd.name} is an unfinished clone")

    # ------------------------------------------------------------ start
    def check_start(self, src_name: str, dst_name: str) -> VDisk:
        """Refuse a clone that cannot start (SPEC §4 errnos); returns the source."""
        self.txn.check_writable()
        names.check(src_name)
        names.check(dst_name)
        src = self.meta.by_name(src_name)
        if src is None:
            raise VDiskError(errno.ENOENT, f"no VDisk {src_name}")
        if dst_name in self.meta.names:
            raise VDiskError(errno.EEXIST, f"{dst_name} exists")
        if self.unfinished(src):
            raise VDiskError(errno.EBUSY, f"{src_name} is itself an unfinished clone")
        return src

    def start(self, src_name: str, dst_name: str) -> Job:
        """Reserve ``dst_name`` and take the clone point (one transaction)."""
        m = self.meta
        src = self.check_start(src_name, dst_name)
        jid = m.next_job
        vid = m.next_vid
        dst_props = props.for_clone(self.uuid, vid, src.props)
        dst_props["clone_job"] = jid
        total = len(src.ptab)
        job = Job(id=jid, src=src.vid, dst=vid, src_name=src_name, dst_name=dst_name,
                  total=total, bytes=src.nalloc * m.chunk_size, started_ns=time.time_ns())
        with self.txn:
            self.txn.apply(["vnew", vid, dst_name, src.size, dst_props])
            self.txn.apply(["jnew", job.to_record()])
        job = m.jobs[jid]
        self._track(job)
        if total == 0:
            self.step(job, 1)   # nothing to share: complete at once
        return job

    # ------------------------------------------------------------ work
    def step(self, job: Job, max_pages: int) -> int:
        """Share up to ``max_pages`` more mapped pages; returns data bytes shared.
        Completes the job when the cursor reaches the end."""
        m, txn = self.meta, self.txn
        src, dst = m.vdisks[job.src], m.vdisks[job.dst]
        done = self._done[job.id]
        end = dst.npages
        # The mapped source pages the job has yet to share (holes cost nothing).
        todo = [p for p, _ in src.pages_in(job.cursor, min(end, src.npages)) if p not in done]
        take = todo[:max_pages]
        with txn:
            i = 0
            while i < len(take):     # each run of consecutive pages: one op
                j = i + 1
                while j < len(take) and take[j] == take[j - 1] + 1:
                    j += 1
                txn.apply(["vshare", src.vid, dst.vid, take[i], take[j - 1] + 1])
                i = j
            cursor = end if len(todo) <= max_pages else take[-1] + 1
            txn.apply(["jset", job.id, "cursor", cursor])
            if take:
                txn.apply(["jset", job.id, "progress", job.progress + len(take)])
            if cursor >= end:
                self._finish(job, COMPLETED)
        return sum(m.mapped_in_page(src.ptab[p]) for p in take) * m.chunk_size

    def guard(self, vd: VDisk, p0: int, p1: int, holes: bool = True) -> None:
        """Source pages [p0, p1) are about to change: give unreached ones to the clones
        first. Runs inside the caller's transaction. A hole about to be filled is marked
        done (the clone keeps it a hole); ``holes=False`` when the change only takes
        pages away (punch, shrink), so a hole stays one and needs nothing."""
        txn = self.txn
        for job in self.sources.get(vd.vid, ()):
            done = self._done[job.id]
            dst = self.meta.vdisks[job.dst]
            lo, hi = max(p0, job.cursor), min(p1, dst.npages)
            for pidx in (range(lo, hi) if holes else [p for p, _ in vd.pages_in(lo, hi)]):
                if pidx in done:
                    continue
                if pidx in vd.ptab:
                    txn.apply(["vshare", vd.vid, dst.vid, pidx, pidx + 1])
                    txn.apply(["jset", job.id, "progress", job.progress + 1])
                txn.apply(["jdone", job.id, pidx])
                done.add(pidx)

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        txn = self.txn
        if state == COMPLETED:
            txn.apply(["vset", job.dst, "clone_job", None])
        else:
            # Until this end is durable, a crash resumes the job: the source pages it has
            # not reached must keep their clone-point data, so no in-place writes to them
            # (unstable, like a page whose refcount dropped) until the next commit.
            src = self.meta.vdisks.get(job.src)
            done = self._done.get(job.id, ())
            if src is not None:
                for pidx, pid in src.pages_in(job.cursor, src.npages):
                    if pidx not in done:
                        self.space.hold_page(pid)
            if job.dst in self.meta.vdisks:
                txn.apply(["vdel", job.dst])   # releases every page it shared
        txn.apply(["jset", job.id, "state", state])
        txn.apply(["jset", job.id, "ended_ns", time.time_ns()])
        if error:
            txn.apply(["jset", job.id, "error", error])
        self._untrack(job)

    def stop(self, job: Job, state: str = "Cancelled", error: str | None = None) -> None:
        """Cancel (or fail) a running job: the destination and all it held go."""
        if not job.running:
            return
        with self.txn:
            self._finish(job, state, error)

    def cancel_from(self, src_name: str) -> list[Job]:
        jobs = [j for j in self.running() if j.src_name == src_name]
        if not jobs:
            raise VDiskError(errno.ENOENT, f"no clone in progress from {src_name}")
        for job in jobs:
            self.stop(job)
        return jobs

    def purge(self) -> int:
        gone = [j.id for j in self.meta.jobs.values() if j.state in FINISHED]
        if gone:
            with self.txn:
                for jid in gone:
                    self.txn.apply(["jdel", jid])
        return len(gone)
