"""Clone jobs as trio tasks in the daemon's nursery.

Each job runs in steps (``Clones.step``), each one transaction, and yields between them
so that I/O to every VDisk keeps flowing. With a speed limit (``--clone-speed``, bytes of
source data per second, like a QEMU block job's speed) a job shares one page per step and
sleeps for the data it shared; unlimited, it shares a batch per step, and a source that
fits in one batch is cloned in the command's own transaction (one commit). A job shows
``Completed``, and its destination opens, only once the transaction that completed it is
durable. A command (start, cancel, purge) returns once its effect is durable too, so a
crash right after never undoes an acknowledged command.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import trio

from ..cow.records import COMPLETED, ERROR, Job
from ..cow.pool import Pool
from . import status
from .commands import Command

log = logging.getLogger(__name__)

BATCH_PAGES = 64


class JobRunner:
    def __init__(self, pool: Pool, sync: Callable[[], Awaitable[None]], speed: int = 0):
        self.pool = pool
        self.sync = sync
        self.speed = speed
        self.nursery: trio.Nursery | None = None
        # What the status rows show: progress as of the job's last durable step, an end
        # (Completed, Cancelled) only once durable, so no reader sees what a crash could
        # still undo.
        self.shown = status.Shown()
        self.unsettled = self.shown.unsettled
        # Awaited with a VDisk name that vanished (cancel, error) so the kernel forgets it.
        self.on_removed: Callable[[str, int], Awaitable[None]] = _nothing

    def attach(self, nursery: trio.Nursery) -> None:
        """Start serving; resume the jobs a previous mount left running."""
        self.nursery = nursery
        for job in self.pool.clones.running():
            self.shown.publish(self.pool, job)     # as loaded: durable
            log.info("resuming clone %s -> %s at page %d", job.src_name, job.dst_name,
                     job.cursor)
            nursery.start_soon(self._run, job)

    async def execute(self, cmd: Command,
                      flush: Callable[[str], Awaitable[None]]) -> None:
        """Carry out one command from .ctl/clone; VDiskError(errno) refuses it."""
        clones = self.pool.clones
        if cmd.action == "purge":
            clones.purge()
            await self.sync()
        elif cmd.action == "cancel":
            shown = self.shown.percents(self.pool)
            jobs = clones.cancel_from(cmd.src)
            for job in jobs:
                self.unsettled[job.id] = shown[job.id]
            try:
                await self.sync()
            finally:
                for job in jobs:
                    self.unsettled.pop(job.id, None)
            for job in jobs:
                self.shown.durable.pop(job.id, None)
                await self.on_removed(job.dst_name, job.dst)
        else:
            # Refuse early (nothing flushed for a bad command), then flush the source's
            # dirty pages out of the kernel so the clone point includes them.
            clones.check_start(cmd.src, cmd.dst)
            await flush(cmd.src)
            job = clones.start(cmd.src, cmd.dst)
            self.shown.publish(self.pool, job)      # 0%, and shown only once durable
            log.info("clone %s -> %s started (%d pages)", cmd.src, cmd.dst, job.total)
            if job.running and not self.speed and job.total <= BATCH_PAGES:
                try:
                    clones.step(job, BATCH_PAGES)   # a step's work: start and end in one commit
                except Exception:
                    log.exception("clone %s -> %s: first step failed; the job retries it",
                                  cmd.src, cmd.dst)
            if job.running:
                assert self.nursery is not None
                self.nursery.start_soon(self._run, job)
                await self.sync()
            else:
                await self._settle(job)

    async def _run(self, job: Job) -> None:
        clones = self.pool.clones
        try:
            while job.running:
                shared = clones.step(job, 1 if self.speed else BATCH_PAGES)
                if not job.running:
                    break
                await self._publish(job)
                await trio.sleep(shared / self.speed if self.speed else 0)
            await self._settle(job)
            self.shown.durable.pop(job.id, None)
        except trio.Cancelled:
            raise   # unmount: the job stays "running" in the metadata and resumes
        except Exception as e:
            log.exception("clone %s -> %s failed", job.src_name, job.dst_name)
            if job.running:
                clones.stop(job, ERROR, str(e))
                await self.on_removed(job.dst_name, job.dst)

    async def _publish(self, job: Job) -> None:
        """Show a step's progress once it is durable: a commit when the percent moves
        (at most 100 per job), so the status follows the work and never goes back."""
        if self.pool.clones.percent(job) == self.shown.durable.get(job.id, (0, 0))[0]:
            return
        percent = self.pool.clones.percent(job)
        shared = status.live_shared(self.pool, job)
        await self.sync()
        if job.running:
            self.shown.durable[job.id] = (percent, shared)

    async def _settle(self, job: Job) -> None:
        """A job that ended Completed shows 99% until that is durable."""
        if job.state != COMPLETED:
            return
        self.unsettled[job.id] = "99%"
        try:
            await self.sync()
        finally:
            self.unsettled.pop(job.id, None)
        log.info("clone %s -> %s completed", job.src_name, job.dst_name)

    def settling(self, vid: int) -> bool:
        """Is ``vid`` the destination of a clone whose completion is not durable yet?"""
        return any(self.pool.meta.jobs[jid].dst == vid for jid in self.unsettled
                   if jid in self.pool.meta.jobs)

    def render(self, extended: bool = False) -> bytes:
        return status.render(self.pool, self.shown, extended)


async def _nothing(name: str, vid: int) -> None:
    pass
