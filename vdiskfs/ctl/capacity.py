"""How full the pool's backing filesystem is, and warnings before it fills (as LVM thin's).

A thin pool can promise more than its filesystem holds: VDisks whose sizes add up past the
backing capacity are *overcommitted*, and a guest finds out only when a write fails. So the
daemon watches: when the backing filesystem passes 80 %, 90 % and 95 % used it logs one
warning for each level (a level warns again only after use fell 5 points below it), growing
a VDisk past the capacity logs a warning, and the failures of a full pool are logged at
most once per ``ENOSPC_LOG_EVERY`` seconds with a count of the ones left out (the log may
live on the very filesystem that is full). ``vdiskfs list`` shows the same warnings.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import trio

from ..cow.pool import Pool

log = logging.getLogger(__name__)

LEVELS = (80, 90, 95)          # percent of the backing filesystem used
REARM = 5                      # points below a level before it may warn again
CHECK_EVERY = 5.0              # seconds between checks (the daemon's task)
ENOSPC_LOG_EVERY = 60.0        # seconds between log lines about a full pool
GROW_LOG_EVERY = 60.0          # seconds between overcommit warnings of growing VDisks


@dataclass
class Backing:
    capacity: int       # bytes of the backing filesystem
    used: int           # bytes used on it (by anything)
    avail: int          # bytes an unprivileged writer could still take

    @property
    def percent(self) -> float:
        """As df's Use%: blocks reserved for root count neither as used nor as room."""
        room = self.used + self.avail
        return 100.0 * self.used / room if room else 100.0


def backing(path: str) -> Backing:
    st = os.statvfs(path)
    return Backing(st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize,
                   st.f_bavail * st.f_frsize)


def provisioned(pool: Pool) -> int:
    """The sizes of all VDisks, added up: what the pool has promised."""
    return sum(vd.size for vd in pool.vdisks())


class Capacity:
    def __init__(self, pool: Pool):
        self.pool = pool
        self.passed = 0                 # the highest level warned about (0: none)
        self._full_logged = -ENOSPC_LOG_EVERY
        self._full_quiet = 0            # full-pool failures not logged since the last line
        self._grow_logged = -GROW_LOG_EVERY

    def check(self) -> Backing:
        """Warn once for each level newly passed; re-arm the ones use fell well below."""
        b = backing(self.pool.path)
        pct = b.percent
        for level in LEVELS:
            if pct >= level > self.passed:
                log.warning("backing filesystem of pool %s is %.0f%% full (past %d%%): "
                            "%d MiB left; VDisks of %d MiB are provisioned on %d MiB",
                            self.pool.path, pct, level, b.avail >> 20,
                            provisioned(self.pool) >> 20, b.capacity >> 20)
                self.passed = level
        while self.passed and pct < self.passed - REARM:
            lower = [lv for lv in LEVELS if lv < self.passed]
            log.info("backing filesystem of pool %s is back under %d%% (%.0f%%)",
                     self.pool.path, self.passed, pct)
            self.passed = lower[-1] if lower else 0
        return b

    async def run(self) -> None:
        """The daemon's task: check every ``CHECK_EVERY`` seconds."""
        while True:
            try:
                self.check()
            except OSError as e:
                log.debug("statvfs(%s): %s", self.pool.path, e)
            await trio.sleep(CHECK_EVERY)

    def warnings(self, b: Backing | None = None) -> list[str]:
        """What ``vdiskfs list`` shows under its summary."""
        b = b or backing(self.pool.path)
        out = []
        passed = [lv for lv in LEVELS if b.percent >= lv]
        if passed:
            out.append(f"backing filesystem {b.percent:.0f}% full (past {passed[-1]}%): "
                       f"{b.avail >> 20} MiB left")
        total = provisioned(self.pool)
        if total > b.capacity:
            out.append(f"overcommitted: VDisks of {total >> 20} MiB on a backing "
                       f"filesystem of {b.capacity >> 20} MiB")
        if self.pool.failed:
            out.append(f"writes stopped after an I/O error: {self.pool.failed}")
        return out

    def grown(self, name: str) -> None:
        """A VDisk grew (truncate, fallocate): say so if the pool is now overcommitted."""
        total = provisioned(self.pool)
        cap = backing(self.pool.path).capacity
        now = time.monotonic()
        if total > cap and now - self._grow_logged >= GROW_LOG_EVERY:
            self._grow_logged = now
            log.warning("pool %s is overcommitted: VDisks of %d MiB (%s grew) on a backing "
                        "filesystem of %d MiB; writes fail with ENOSPC once it is full",
                        self.pool.path, total >> 20, name, cap >> 20)

    def full(self, what: str, e: OSError) -> None:
        """A request failed because the pool is full: log it, at most once a minute."""
        now = time.monotonic()
        if now - self._full_logged < ENOSPC_LOG_EVERY:
            self._full_quiet += 1
            return
        more = f" ({self._full_quiet} more since the last report)" if self._full_quiet else ""
        self._full_logged, self._full_quiet = now, 0
        log.error("pool %s is full: %s failed: %s%s; free space on %s or delete VDisks",
                  self.pool.path, what, e.strerror or e, more, self.pool.path)
