"""Who uses the VDisks of a mount: loop devices and processes (for ``vdiskfs umount``).

Loop devices name their backing file in /sys/block/loop*/loop/backing_file (what
``losetup -a`` shows); a process holds a VDisk open if one of /proc/PID/fd/* links into
the mount. Read as root these cover every user a kernel unmount would trip over.
"""

from __future__ import annotations

import glob
import os


def _inside(path: str, mnt: str) -> str | None:
    """The VDisk name if ``path`` is a file directly in ``mnt``."""
    path = path.removesuffix(" (deleted)")
    if os.path.dirname(path) == mnt:
        return os.path.basename(path)
    return None


def users(mnt: str) -> dict[str, list[str]]:
    """VDisk name -> descriptions of what holds it ("/dev/loop0", "process 42 (qemu)")."""
    mnt = os.path.realpath(mnt)
    found: dict[str, list[str]] = {}
    for bf in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(bf) as f:
                name = _inside(f.read().strip(), mnt)
        except OSError:
            continue
        if name and name != ".ctl":
            found.setdefault(name, []).append("/dev/" + bf.split("/")[3])
    me = os.getpid()
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        pid = int(fd_dir.split("/")[2])
        if pid == me:
            continue
        try:
            links = [os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)]
        except OSError:
            continue
        names = {n for n in (_inside(link, mnt) for link in links) if n and n != ".ctl"}
        if not names:
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            comm = "?"
        for name in names:
            found.setdefault(name, []).append(f"process {pid} ({comm})")
    return found


def describe(found: dict[str, list[str]]) -> str:
    return "; ".join(f"{name} by {', '.join(who)}" for name, who in sorted(found.items()))
