"""``.ctl/scrub``: the daemon's online scrub (cow/scrub.py) as a trio task.

Write ``start`` to begin (EBUSY while one runs) or ``cancel``; read for its state, one
``key value`` per line, then one ``range VDISK START END`` line per damaged range (VDisk
bytes START..END inclusive):

    state running|done|cancelled|idle
    checked BYTES
    total BYTES
    damaged_blocks N
    torn_blocks N
    range FOO 4096 8191

Each step checks one run of slots (4 MiB at most) and yields, so I/O keeps flowing.
"""

from __future__ import annotations

import errno
import logging
import time

import trio

from ..cow.errors import VDiskError
from ..cow.pool import Pool
from ..cow.scrub import Scrub

log = logging.getLogger(__name__)


class Scrubber:
    def __init__(self, pool: Pool):
        self.pool = pool
        self.scrub: Scrub | None = None
        self.state = "idle"
        self.nursery: trio.Nursery | None = None
        self._cancel = False
        self.found: set[str] = set()    # VDisks with damage found by the last scrub

    def attach(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery

    def command(self, data: bytes) -> None:
        word = data.decode("ascii", "replace").strip()
        if word == "start":
            if self.state == "running":
                raise VDiskError(errno.EBUSY, "a scrub is running")
            if self.nursery is None:
                raise VDiskError(errno.EAGAIN, "not serving yet")
            self.scrub = Scrub(self.pool, accept=True)
            self.state, self._cancel = "running", False
            self.nursery.start_soon(self._run)
        elif word == "cancel":
            if self.state != "running":
                raise VDiskError(errno.ENOENT, "no scrub is running")
            self._cancel = True
        else:
            raise VDiskError(errno.EINVAL, "scrub commands: start, cancel")

    async def _run(self) -> None:
        sc = self.scrub
        t0 = time.monotonic()
        log.info("scrub started: %d bytes of data", sc.total)
        try:
            while not sc.finished and not self._cancel:
                sc.step()
                await trio.sleep(0)
        except Exception:
            log.exception("scrub failed")
            self.state = "failed"
            return
        self.state = "cancelled" if self._cancel else "done"
        self.found = {d.vdisk for d in sc.damaged()}
        log.log(logging.ERROR if sc.bad else logging.INFO,
                "scrub %s after %.1f s: %d bytes checked, %d damaged block(s), %d torn "
                "block(s) accepted", self.state, time.monotonic() - t0, sc.checked,
                len(sc.bad), sc.torn)

    def render(self) -> bytes:
        sc = self.scrub
        lines = [f"state {self.state}"]
        if sc is not None:
            lines += [f"checked {min(sc.checked, sc.total)}", f"total {sc.total}",
                      f"damaged_blocks {len(sc.bad)}", f"torn_blocks {sc.torn}"]
            lines += [f"range {d.vdisk} {d.start} {d.end - 1}" for d in sc.damaged()]
        return ("\n".join(lines) + "\n").encode()
