"""Group commit on the trio loop: fsyncs share journal flushes; periodic commits and
checkpoints bound what a crash can lose and how long replay takes."""

from __future__ import annotations

import logging
import time

import trio

from ..cow.errors import StoreFailed
from ..cow.pool import Pool
from .puncher import Puncher

log = logging.getLogger(__name__)

COMMIT_INTERVAL = 5.0   # seconds between background commits of a dirty pool
WRITEBACK_EVERY = 0.25  # seconds between checks of the data written since the last kick
WRITEBACK_BYTES = 8 << 20   # fresh slots' bytes that make the kernel start writing them
COOL_EVERY = 60         # commit intervals (5 min) between cooling passes (cow/pool.py: Pool.cool)


class Syncer:
    def __init__(self, pool: Pool):
        self.pool = pool
        self._lock = trio.Lock()
        self._started = 0   # commits begun
        self._done = 0      # commits finished successfully (by number of the last one)
        self.puncher = Puncher(pool)   # runs (and commits defer punches) in the daemon

    async def sync(self) -> None:
        """Return once everything done before the call is durable (invariant 4)."""
        self.pool.failstop.check()     # no fsync is acknowledged after a fail-stop
        need = self._started + 1   # a commit that starts after this call
        async with self._lock:
            if self._done >= need:
                return   # somebody else's commit began after we were called: it covers us
            if self.pool.commits.wants_checkpoint():
                try:
                    await self._commit(checkpoint=True)
                    return
                except OSError as e:   # e.g. no room for a new checkpoint: journal instead
                    log.warning("checkpoint failed (%s); committing to the journal", e)
            await self._commit(checkpoint=False)

    async def checkpoint(self) -> None:
        async with self._lock:
            await self._commit(checkpoint=True)

    async def _commit(self, *, checkpoint: bool) -> None:
        self._started += 1
        n = self._started
        pool = self.pool
        t0 = time.perf_counter()
        batch = pool.commits.prepare(checkpoint)
        t1 = time.perf_counter()
        try:
            await trio.to_thread.run_sync(batch.run)
        except BaseException as e:
            pool.commits.aborted(batch, e)
            raise
        batch.finish()
        if checkpoint:
            log.info("checkpoint: %d bytes, prepared in %.1f ms on the loop, written in "
                     "%.2f s", batch.size, (t1 - t0) * 1000, time.perf_counter() - t1)
        self._done = n
        if batch.token.slots:
            self.puncher.kick()

    async def run_writeback(self) -> None:
        """Pace the writeback of freshly written slots (ChunkStore.start_writeback)."""
        store = self.pool.store
        store.take_fresh()
        while True:
            await trio.sleep(WRITEBACK_EVERY)
            if len(store.fresh) * store.chunk_size >= WRITEBACK_BYTES and not self.pool.failed:
                try:
                    await trio.to_thread.run_sync(store.start_writeback, store.take_fresh())
                except StoreFailed as e:
                    self.pool.failstop.fail(e)

    async def run_periodic(self) -> None:
        rounds = 0
        while True:
            await trio.sleep(COMMIT_INTERVAL)
            rounds += 1
            if rounds % COOL_EVERY == 0 and not self.pool.failed:
                # Slots not written for a pass go cold: after a crash only recently
                # written ones are suspects.
                self.pool.cool()
            if self.pool.commits.is_dirty():
                try:
                    await self.sync()
                except OSError as e:
                    log.error("background commit failed (will retry): %s", e)
