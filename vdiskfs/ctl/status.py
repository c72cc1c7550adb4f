"""The status tables of ``.ctl/status`` (SPEC §4) and ``.ctl/jobs`` (extended columns)."""

from __future__ import annotations

import time

from ..cow.records import COMPLETED, Job
from ..cow.pool import Pool


def progress(pool: Pool, job: Job, unsettled: dict[int, str]) -> str:
    if job.id in unsettled:
        return unsettled[job.id]   # its end is not durable yet
    if not job.running:
        return job.state
    return f"{pool.clones.percent(job)}%"


def shared_bytes(pool: Pool, job: Job) -> int:
    if job.running:
        dst = pool.get(job.dst)
        return dst.nalloc * pool.chunk_size if dst else 0
    return job.bytes if job.state == COMPLETED else 0


def elapsed(job: Job) -> float:
    end = job.ended_ns or time.time_ns()
    return (end - job.started_ns) / 1e9


def render(pool: Pool, unsettled: dict[int, str], extended: bool = False) -> bytes:
    rows = [("Source", "Destination", "Progress")
            + (("Elapsed", "Shared") if extended else ())]
    for job in pool.clones.jobs():
        row = (job.src_name, job.dst_name, progress(pool, job, unsettled))
        if extended:
            row += (f"{elapsed(job):.1f}s", str(shared_bytes(pool, job)))
        rows.append(row)
    out = "".join(" ".join(r) + "\n" for r in rows)
    if pool.failed:   # after the rows, so that scripts reading rows are not confused
        out += f"# pool stopped writing after an I/O error: {pool.failed}\n"
    return out.encode()
