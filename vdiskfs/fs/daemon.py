"""The mount daemon: open the pool, mount, serve on one trio loop, checkpoint on exit."""

from __future__ import annotations

import logging
import os
import signal

import pyfuse3
import trio

from ..cow import layout
from ..cow.pool import Pool
from ..nbd.config import NbdConfig
from . import extra_ops, killpriv
from .operations import Operations

log = logging.getLogger(__name__)

FSTYPE = "vdiskfs"          # /proc/mounts shows "POOL MNT fuse.vdiskfs ..."
READ_AHEAD_KB = 1024        # the kernel's default 128 KiB halves sequential reads
# The kernel sends RELEASE in the background after close(2), behind the writeback of the
# file's dirty pages: a signal right after a writer closed must not take it for a user.
SIGNAL_GRACE = 5.0


def mount_options(pool: Pool, allow_other: bool = False) -> set[str]:
    # default_permissions: the kernel checks modes (.ctl/clone is 0200, owner only).
    # Without allow_other nobody but the mounting user can reach the mount at all.
    opts = set(pyfuse3.default_options)
    # nosuid, nodev: a VDisk is data, never a program or a device node.
    opts |= {f"fsname={pool.path}", f"subtype={FSTYPE}", "default_permissions", "nosuid",
             "nodev"}
    if allow_other:
        opts.add("allow_other")
    return opts


def _set_read_ahead(mountpoint: str) -> None:
    """Raise the mount's read-ahead via its bdi; found in mountinfo (a stat() of the mount
    would be a FUSE request to ourselves)."""
    target = mountpoint   # already resolved: realpath() now would stat our own root
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
        for line in reversed(lines):
            fields = line.split()
            if fields[4] == target and " - fuse." in line:
                path = f"/sys/class/bdi/{fields[2]}/read_ahead_kb"
                with open(path, "w") as f:
                    f.write(str(READ_AHEAD_KB))
                return
    except OSError as e:
        log.info("could not raise read-ahead: %s", e)


class Daemon:
    def __init__(self, pool: Pool, mountpoint: str, clone_speed: int = 0,
                 allow_other: bool = False, nbd: "NbdConfig | None" = None):
        self.pool = pool
        self.allow_other = allow_other
        self.mountpoint = os.path.realpath(mountpoint)
        self.ops = Operations(pool, clone_speed)
        self.signalled = False
        self.extra: extra_ops.ExtraOps | None = None
        self.nbd = None
        if nbd is not None:
            from ..nbd.server import NbdServer
            self.nbd = NbdServer(self.ops, nbd)
            self.ops.nbd_exports = self.nbd.exports

    def mount(self) -> None:
        if self.nbd is not None:
            self.nbd.bind()      # a taken address fails the mount, not the running daemon
        pyfuse3.init(self.ops, self.mountpoint, mount_options(self.pool, self.allow_other))
        killpriv.install()     # before the loop reads INIT
        # fallocate/lseek into the session now; their tasks need the nursery of _main
        # (no request can arrive before its loop runs).
        self.extra = extra_ops.install(self.ops)

    async def _tune(self) -> None:
        # The kernel sets the bdi's read-ahead during the INIT handshake: raise it after.
        # A stat of our own root from a worker thread returns once the loop answered INIT.
        try:
            await trio.to_thread.run_sync(os.stat, self.mountpoint)
        except OSError as e:   # unmounted at once: nothing to tune
            log.info("mount gone before tuning: %s", e)
            return
        _set_read_ahead(self.mountpoint)
        result = killpriv.outcome()
        if result is not None:
            log.log(logging.INFO if result == "negotiated" else logging.WARNING,
                    "HANDLE_KILLPRIV_V2 (no GETXATTR before each write): %s", result)

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            if self.extra is not None:
                self.extra.bind(nursery)
            nursery.start_soon(self._tune)
            nursery.start_soon(self._signals)
            nursery.start_soon(self.ops.syncer.run_periodic)
            nursery.start_soon(self.ops.syncer.run_writeback)
            self.pool.defer_punches()
            nursery.start_soon(self.ops.syncer.puncher.run)
            nursery.start_soon(self.ops.capacity.run)
            self.ops.jobs.attach(nursery)
            self.ops.scrubber.attach(nursery)
            if self.nbd is not None:
                nursery.start_soon(self.nbd.run)
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            nursery.cancel_scope.cancel()

    async def _signals(self) -> None:
        """SIGTERM, SIGINT, SIGHUP: unmount, unless a VDisk is in use (a loop device, a
        guest): then keep serving and say why, as ``vdiskfs umount`` refuses. A second
        signal flushes and detaches regardless (the users get EIO)."""
        asked = False
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                name = signal.Signals(sig).name
                if asked:
                    log.warning("signal %s again: flushing and detaching although in use",
                                name)
                    await self._detach()
                    return
                asked = True
                await self.ops.released(grace=SIGNAL_GRACE)
                busy = sorted(vd.name or str(vd.vid) for vid in self.pool.open_count
                              if (vd := self.pool.get(vid)) is not None)
                if busy:
                    log.warning("signal %s: not unmounting, VDisks in use: %s (a second "
                                "signal detaches them)", name, ", ".join(busy))
                    continue
                log.info("signal %s: unmounting", name)
                if await self._unmount_while_serving():
                    return

    async def _unmount_while_serving(self) -> bool:
        # A plain unmount makes the kernel write back its dirty pages (the writeback cache)
        # through this still-running loop, then end the session: nothing is dropped.
        proc = await trio.run_process(["fusermount3", "-u", self.mountpoint], check=False,
                                      capture_stderr=True)
        if proc.returncode == 0:
            return True
        log.warning("unmount failed (%s): still serving (a second signal detaches)",
                    proc.stderr.decode(errors="replace").strip())
        return False

    async def _detach(self) -> None:
        await trio.to_thread.run_sync(pyfuse3.syncfs, self.mountpoint)
        self.signalled = True
        pyfuse3.terminate()

    def serve(self) -> None:
        """Serve until unmounted (umount/fusermount3 -u) or signalled; then clean up."""
        try:
            trio.run(self._main)
        finally:
            # After a signal we unmount ourselves; after umount the kernel already has.
            pyfuse3.close(unmount=self.signalled)
            if self.nbd is not None:
                self.nbd.unlink_sockets()
            self.pool.close()
            log.info("pool %s closed cleanly", self.pool.path)


def setup_logging(pool_path: str | None, debug: bool = False) -> None:
    level = logging.DEBUG if debug else logging.INFO
    handler: logging.Handler
    if pool_path:
        handler = logging.FileHandler(os.path.join(pool_path, layout.LOG))
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
