"""Clone jobs: point-in-time copies made by sharing map pages, in resumable steps.

A job shares the source's pages with the destination page by page (``vshare``: a page
refcount increment, no data is copied) from a cursor that only moves forward. The copy is
point-in-time although the source stays writable: before any change to a source page the
job has not reached yet, ``guard`` shares that page first (or, if it is a hole, marks it
done), so the later change copies-on-write like any change to a shared page. Every step is
a transaction that moves the cursor with the pages it shared, so after a crash the job
resumes exactly where its durable state says (pages below the cursor or in ``done`` are
the destination's; all others still hold their data as of the clone's start).

Job records live in ``Metadata.jobs`` (journaled with ops jnew/jset/jdone/jdel):

    {id, src, dst (vids), src_name, dst_name, state, cursor, done: [pidx, ...],
     total (pages mapped at the start), progress (of those, pages shared so far),
     bytes (data bytes mapped at the start), started_ns, ended_ns, error}

``state`` is "running", "Completed", "Error" or "Cancelled". The destination carries the
prop ``clone_job`` = job id until the job completes: it cannot be opened until then.
"""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING

from . import names
from .errors import VDiskError
from .meta import VDisk

if TYPE_CHECKING:
    from .pool import Pool

RUNNING = "running"
FINISHED = ("Completed", "Error", "Cancelled")


class Clones:
    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.meta = pool.meta
        # source vid -> running jobs (the write path checks this dict first: O(1))
        self.sources: dict[int, list[dict]] = {}
        self._done: dict[int, set[int]] = {}
        for job in self.meta.jobs.values():
            if job["state"] == RUNNING:
                self._track(job)

    def _track(self, job: dict) -> None:
        self.sources.setdefault(job["src"], []).append(job)
        self._done[job["id"]] = set(job["done"])

    def _untrack(self, job: dict) -> None:
        jobs = self.sources.get(job["src"], [])
        if job in jobs:
            jobs.remove(job)
            if not jobs:
                del self.sources[job["src"]]
        self._done.pop(job["id"], None)

    # ------------------------------------------------------------ queries
    def jobs(self) -> list[dict]:
        return list(self.meta.jobs.values())

    def running(self) -> list[dict]:
        return [j for j in self.meta.jobs.values() if j["state"] == RUNNING]

    def percent(self, job: dict) -> int:
        if not job["total"]:
            return 0
        return min(99, job["progress"] * 100 // job["total"])

    def busy_source(self, vd: VDisk) -> bool:
        return vd.vid in self.sources

    @staticmethod
    def unfinished(vd: VDisk) -> bool:
        return vd.props.get("clone_job") is not None

    # ------------------------------------------------------------ start
    def check_start(self, src_name: str, dst_name: str) -> VDisk:
        """Refuse a clone that cannot start (SPEC §4 errnos); returns the source."""
        self.pool._check_writable()
        names.check(src_name)
        names.check(dst_name)
        src = self.pool.lookup(src_name)
        if src is None:
            raise VDiskError(errno.ENOENT, f"no VDisk {src_name}")
        if dst_name in self.meta.names:
            raise VDiskError(errno.EEXIST, f"{dst_name} exists")
        if self.unfinished(src):
            raise VDiskError(errno.EBUSY, f"{src_name} is itself an unfinished clone")
        return src

    def start(self, src_name: str, dst_name: str) -> dict:
        """Reserve ``dst_name`` and take the clone point (one transaction)."""
        p, m = self.pool, self.meta
        src = self.check_start(src_name, dst_name)
        jid = m.next_job
        props = p.clone_props(src)
        props["clone_job"] = jid
        vid = m.next_vid
        total = sum(1 for pid in src.ptab if pid)
        job = {"id": jid, "src": src.vid, "dst": vid, "src_name": src_name,
               "dst_name": dst_name, "state": RUNNING, "cursor": 0, "done": [],
               "total": total, "progress": 0, "bytes": src.nalloc * p.chunk_size,
               "started_ns": time.time_ns(), "ended_ns": None, "error": None}
        with p.transaction:
            p._op(["vnew", vid, dst_name, src.size, props])
            p._op(["jnew", job])
        job = m.jobs[jid]
        self._track(job)
        if total == 0:
            self.step(job, 1)   # nothing to share: complete at once
        return job

    # ------------------------------------------------------------ work
    def step(self, job: dict, max_pages: int) -> int:
        """Share up to ``max_pages`` more mapped pages; returns data bytes shared.
        Completes the job when the cursor reaches the end."""
        p, m = self.pool, self.meta
        src, dst = m.vdisks[job["src"]], m.vdisks[job["dst"]]
        done = self._done[job["id"]]
        end = len(dst.ptab)
        pidx = job["cursor"]
        shared = pages = 0
        with p.transaction:
            while pidx < end and pages < max_pages:
                if pidx in done or pidx >= len(src.ptab) or not src.ptab[pidx]:
                    pidx += 1
                    continue
                run = pidx   # a run of mapped, unhandled pages: one op
                while (pidx < end and pidx < len(src.ptab) and src.ptab[pidx]
                       and pidx not in done and pages < max_pages):
                    shared += m._nonzero(src.ptab[pidx])
                    pages += 1
                    pidx += 1
                p._op(["vshare", src.vid, dst.vid, run, pidx])
            p._op(["jset", job["id"], "cursor", pidx])
            if pages:
                p._op(["jset", job["id"], "progress", job["progress"] + pages])
            if pidx >= end:
                self._finish(job, "Completed")
        return shared * p.chunk_size

    def guard(self, vd: VDisk, p0: int, p1: int) -> None:
        """Source pages [p0, p1) are about to change: give unreached ones to the clones
        first. Runs inside the caller's transaction."""
        p = self.pool
        for job in self.sources.get(vd.vid, ()):
            done = self._done[job["id"]]
            dst = self.meta.vdisks[job["dst"]]
            for pidx in range(max(p0, job["cursor"]), min(p1, len(dst.ptab))):
                if pidx in done:
                    continue
                if pidx < len(vd.ptab) and vd.ptab[pidx]:
                    p._op(["vshare", vd.vid, dst.vid, pidx, pidx + 1])
                    p._op(["jset", job["id"], "progress", job["progress"] + 1])
                p._op(["jdone", job["id"], pidx])
                done.add(pidx)

    def _finish(self, job: dict, state: str, error: str | None = None) -> None:
        p = self.pool
        if state == "Completed":
            p._op(["vset", job["dst"], "clone_job", None])
        else:
            # Until this end is durable, a crash resumes the job: the source pages it has
            # not reached must keep their clone-point data, so no in-place writes to them
            # (unstable, like a page whose refcount dropped) until the next commit.
            src = self.meta.vdisks.get(job["src"])
            done = self._done.get(job["id"], ())
            if src is not None:
                for pidx in range(job["cursor"], len(src.ptab)):
                    if src.ptab[pidx] and pidx not in done:
                        self.meta.unstable_pages.add(src.ptab[pidx])
            if job["dst"] in self.meta.vdisks:
                p._op(["vdel", job["dst"]])   # releases every page it shared
        p._op(["jset", job["id"], "state", state])
        p._op(["jset", job["id"], "ended_ns", time.time_ns()])
        if error:
            p._op(["jset", job["id"], "error", error])
        self._untrack(job)

    def stop(self, job: dict, state: str = "Cancelled", error: str | None = None) -> None:
        """Cancel (or fail) a running job: the destination and all it held go."""
        if job["state"] != RUNNING:
            return
        with self.pool.transaction:
            self._finish(job, state, error)

    def cancel_from(self, src_name: str) -> list[dict]:
        jobs = [j for j in self.running() if j["src_name"] == src_name]
        if not jobs:
            raise VDiskError(errno.ENOENT, f"no clone in progress from {src_name}")
        for job in jobs:
            self.stop(job)
        return jobs

    def purge(self) -> int:
        gone = [j["id"] for j in self.meta.jobs.values() if j["state"] in FINISHED]
        if gone:
            with self.pool.transaction:
                for jid in gone:
                    self.pool._op(["jdel", jid])
        return len(gone)
