"""The status tables of ``.ctl/status`` (SPEC §4) and ``.ctl/jobs`` (extended columns)."""

from __future__ import annotations

import time

from ..cow.records import COMPLETED, Job
from ..cow.pool import Pool


class Shown:
    """What the tables show of the jobs: a running job's progress as of its last durable
    step (ctl/jobs.py publishes it), so that after a crash the resumed job never shows
    less than before; an end only once it is durable (``unsettled`` meanwhile)."""

    def __init__(self) -> None:
        self.unsettled: dict[int, str] = {}            # job id -> Progress shown meanwhile
        self.durable: dict[int, tuple[int, int]] = {}  # job id -> (percent, shared bytes)

    def publish(self, pool: Pool, job: Job) -> None:
        """``job``'s progress now is durable (called right after a commit, or with the
        state just loaded from the pool)."""
        self.durable[job.id] = (pool.clones.percent(job), live_shared(pool, job))

    def progress(self, pool: Pool, job: Job) -> str:
        if job.id in self.unsettled:
            return self.unsettled[job.id]   # its end is not durable yet
        if not job.running:
            return job.state
        return f"{self.durable.get(job.id, (0, 0))[0]}%"

    def shared_bytes(self, pool: Pool, job: Job) -> int:
        if job.running:
            return self.durable.get(job.id, (0, 0))[1]
        return job.bytes if job.state == COMPLETED else 0

    def percents(self, pool: Pool) -> dict[int, str]:
        """job id -> its Progress column, for the jobs that have not ended."""
        return {j.id: self.progress(pool, j) for j in pool.clones.jobs()
                if j.running or j.id in self.unsettled}


def live_shared(pool: Pool, job: Job) -> int:
    dst = pool.get(job.dst)
    return dst.nalloc * pool.chunk_size if dst else 0


def elapsed(job: Job) -> float:
    end = job.ended_ns or time.time_ns()
    return (end - job.started_ns) / 1e9


def render(pool: Pool, shown: Shown, extended: bool = False) -> bytes:
    rows = [("Source", "Destination", "Progress")
            + (("Elapsed", "Shared") if extended else ())]
    for job in pool.clones.jobs():
        row = (job.src_name, job.dst_name, shown.progress(pool, job))
        if extended:
            row += (f"{elapsed(job):.1f}s", str(shown.shared_bytes(pool, job)))
        rows.append(row)
    out = "".join(" ".join(r) + "\n" for r in rows)
    if pool.failed:   # after the rows, so that scripts reading rows are not confused
        out += f"# pool stopped writing after an I/O error: {pool.failed}\n"
    return out.encode()
