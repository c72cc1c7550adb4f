"""Client side of the control plane: find the mount, drive ``.ctl/`` like a user would.

``vdiskfs clone`` (also installed as ``qclone``, with QUADStor qclone's flags) writes one
command to ``MNT/.ctl/clone`` and reads ``MNT/.ctl/status``; the write's errno says why a
command was refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shlex
import sys
import time

from ..cow import layout


class UserError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


def vdiskfs_mounts() -> list[tuple[str, str]]:
    """(pool, mountpoint) of every vdiskfs mount, from /proc/mounts."""
    def unescape(field: str) -> str:   # /proc/mounts writes spaces etc. as \040
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)

    out = []
    with open("/proc/mounts") as f:
        for line in f:
            src, mnt, fstype = line.split()[:3]
            if fstype == "fuse.vdiskfs":
                out.append((unescape(src), unescape(mnt)))
    return out


def lock_holder(pool_dir: str) -> int | None:
    """The pid of the daemon holding the pool's lock (-1: unknown), None if nobody does."""
    try:
        fd = os.open(os.path.join(pool_dir, layout.LOCK), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)


def find_mount(explicit: str | None) -> str:
    """--mount, else $VDISKFS_MOUNT, else the only vdiskfs mount; a live one."""
    mnt = explicit or os.environ.get("VDISKFS_MOUNT")
    mounts = vdiskfs_mounts()
    if mnt:
        mnt = os.path.abspath(mnt)
        pools = [p for p, m in mounts if m == mnt]
        if not pools:
            raise UserError(f"{mnt} is not a vdiskfs mount")
    elif not mounts:
        raise UserError("no vdiskfs mount found (use --mount MNT or set VDISKFS_MOUNT)")
    elif len(mounts) > 1:
        raise UserError(f"several vdiskfs mounts ({', '.join(m for _, m in mounts)}): choose "
                        "one with --mount MNT or VDISKFS_MOUNT")
    else:
        pools, mnt = [mounts[0][0]], mounts[0][1]
    if lock_holder(pools[-1]) is None:
        raise UserError(f"{mnt} is a dead vdiskfs mount (its daemon is gone): clean it up "
                        f"with 'vdiskfs umount {shlex.quote(mnt)}', then mount it again")
    return mnt



def _ctl(mnt: str, name: str) -> str:
    return os.path.join(mnt, ".ctl", name)


def send(mnt: str, command: str, what: dict[int, str]) -> None:
    """Write one command to .ctl/clone; a refusal becomes a UserError from ``what``."""
    try:
        fd = os.open(_ctl(mnt, "clone"), os.O_WRONLY)
        try:
            os.write(fd, command.encode() + b"\n")
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(what.get(e.errno) or f"{command}: {e.strerror}") from None


def read_status(mnt: str, extended: bool = False) -> str:
    with open(_ctl(mnt, "jobs" if extended else "status")) as f:
        return f.read()


def rows(mnt: str) -> list[list[str]]:
    return [line.split() for line in read_status(mnt).splitlines()[1:]]


def flush_source(mnt: str, src: str) -> None:
    """fsync the source so data the kernel still holds is in the clone."""
    try:
        fd = os.open(os.path.join(mnt, src), os.O_RDONLY)
    except OSError:
        return   # missing or busy: the clone command itself reports why
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start(mnt: str, src: str, dst: str) -> None:
    flush_source(mnt, src)
    send(mnt, f"-s {src} -d {dst}", {
        errno.ENOENT: f"source VDisk {src} does not exist",
        errno.EEXIST: f"destination {dst} already exists",
        errno.EBUSY: f"{src} is itself a clone that has not completed",
        errno.EINVAL: f"invalid VDisk name in {src!r} / {dst!r}",
    })


def cancel(mnt: str, src: str) -> None:
    send(mnt, f"-s {src} -c", {errno.ENOENT: f"no clone in progress from {src}",
                               errno.EINVAL: f"invalid VDisk name {src!r}"})


def purge(mnt: str) -> None:
    send(mnt, "-p", {})


def wait(mnt: str, src: str, dst: str, out=sys.stdout, poll: float = 0.2) -> str:
    """Follow the clone SRC -> DST until it ends; returns its final state."""
    tty = out.isatty()
    last = None
    pct = 0      # the bar of a clone that ends Cancelled or Error stays where it got to
    while True:
        mine = [r for r in rows(mnt) if r[:2] == [src, dst]]
        if not mine:
            raise UserError(f"the clone of {src} to {dst} is no longer listed")
        state = mine[-1][2]
        if state != last:
            if state.endswith("%"):
                pct = max(pct, int(state[:-1]))
            elif state == "Completed":
                pct = 100
            if tty:
                bar = "#" * (pct * 40 // 100)
                shown = state if state.endswith("%") else f"{pct}% {state}"
                out.write(f"\r{src} -> {dst} [{bar:<40}] {shown:>4}"
                          + ("" if state.endswith("%") else "\n"))
            else:
                out.write(f"{src} -> {dst}: {state}\n")
            out.flush()
            last = state
        if not state.endswith("%"):
            return state
        time.sleep(poll)


def parse_scrub(text: str) -> dict:
    """The state read from ``.ctl/scrub`` (ctl/scrubber.py) as a dict; ``ranges`` lists
    (VDisk, first byte, last byte) of the damaged ranges."""
    out: dict = {"state": "idle", "ranges": []}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "range":
            vd, start, end = value.rsplit(" ", 2)
            out["ranges"].append((vd, int(start), int(end)))
        elif key == "state":
            out["state"] = value
        elif value.isdigit():
            out[key] = int(value)
    return out
