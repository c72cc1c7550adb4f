"""Gives the space of freed chunks back to the backing filesystem while I/O pauses.

A punch holds the data file's inode lock for its whole length (and on a filesystem that
discards synchronously, a device round trip per run of slots), so every write into the
data file waits behind it: done inside the commits, it made writes wait hundreds of
milliseconds after a delete or a copy-on-write burst. The daemon's commits therefore
leave it here (cow/commit.py, ``defer_punch``); the slots are reusable meanwhile
(cow/space.py), so a busy writer reuses them instead of growing the data file.

Policy: punch a batch once no data request came for ``QUIET`` seconds, batch after
batch while none comes; under I/O that never pauses, once the oldest pending punch is
``MAX_DEFER`` old, one batch every ``QUIET + BUSY_GAP`` seconds. Space figures (``df``,
the data file's holes) follow within that; ``user.vdisk.*`` and ``st_blocks`` of a
VDisk change at once, as before.
"""

from __future__ import annotations

import trio

from ..cow.errors import StoreFailed
from ..cow.pool import Pool

QUIET = 0.05        # seconds without a data request that count as a pause
MAX_DEFER = 5.0     # seconds a punch waits for a pause before it goes ahead anyway
BUSY_GAP = 0.05     # seconds between overdue batches while I/O goes on


class Puncher:
    def __init__(self, pool: Pool):
        self.pool = pool
        self._wake = trio.Event()
        self._lock = trio.Lock()      # one punch at a time (run and drain)

    def kick(self) -> None:
        """A commit finished with frees: there may be something to punch."""
        self._wake.set()

    async def run(self) -> None:
        pool, space = self.pool, self.pool.space
        overdue_at = None
        while True:
            if not space.unpunched or pool.failed:
                overdue_at = None
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            if overdue_at is None:
                overdue_at = trio.current_time() + MAX_DEFER
            n = pool.io_count
            await trio.sleep(QUIET)
            busy = pool.io_count != n
            if busy and trio.current_time() < overdue_at:
                continue
            while space.unpunched and not pool.failed:
                n = pool.io_count
                await self._batch()
                if pool.io_count != n:
                    break            # I/O is back: wait for the next pause
            if busy:
                await trio.sleep(BUSY_GAP)

    async def drain(self) -> None:
        """Punch everything pending now (a full backing filesystem wants it back)."""
        while self.pool.space.unpunched and not self.pool.failed:
            await self._batch()

    async def _batch(self) -> None:
        pool = self.pool
        async with self._lock:
            try:
                with pool.punch_batch() as slots:
                    if slots:
                        await trio.to_thread.run_sync(pool.punch, slots)
            except StoreFailed as e:
                pool.failstop.fail(e)
