"""Command line: ``vdiskfs mount|umount|create|fsck``.

Every command exits 0 on success and otherwise prints one line to stderr and exits non-zero;
user errors never show a traceback.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import subprocess
import sys
import time

from . import __version__
from .cow import layout
from .cow.errors import FormatError, PoolBusy

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


class UserError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 4096, 64K, 10G)")
    return int(m.group(1)) * UNITS[m.group(2).upper()]


# ---------------------------------------------------------------- mount / umount
def cmd_mount(args: argparse.Namespace) -> int:
    pool_dir = os.path.abspath(args.pool)
    mnt = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mnt):
        raise UserError(f"mount point {mnt} is not a directory")
    if args.foreground:
        return _serve(pool_dir, mnt, args.chunk_size, args.debug, args.ready_fd)
    # Background: a detached child serves; we return once it reports the mount ready.
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "vdiskfs", "mount", "--foreground", "--ready-fd", str(w),
           pool_dir, mnt]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.debug:
        cmd.append("--debug")
    child = subprocess.Popen(cmd, pass_fds=(w,), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode(errors="replace").strip()
    if msg != "ready":
        child.wait()
        raise UserError(msg or f"mount daemon exited with status {child.returncode}")
    print(f"vdiskfs: pool {pool_dir} mounted at {mnt} (daemon pid {child.pid}); "
          f"stop with: vdiskfs umount {mnt}")
    return 0


def _serve(pool_dir: str, mnt: str, chunk_size: int | None, debug: bool,
           ready_fd: int | None) -> int:
    # Imported here: pyfuse3 and trio are needed by the daemon only.
    from .cow.pool import open_pool
    from .fs.daemon import Daemon, setup_logging

    def report(msg: str) -> None:
        if ready_fd is not None:
            os.write(ready_fd, msg.encode())
            os.close(ready_fd)

    try:
        pool = open_pool(pool_dir, create=True, chunk_size=chunk_size)
    except (PoolBusy, FormatError, FileExistsError, FileNotFoundError, ValueError,
            PermissionError) as e:
        report(str(e))
        raise UserError(str(e)) from None
    setup_logging(pool_dir if ready_fd is not None else None, debug)
    daemon = Daemon(pool, mnt)
    try:
        daemon.mount()
    except Exception as e:
        pool.close()
        report(f"cannot mount {mnt}: {e}")
        raise UserError(f"cannot mount {mnt}: {e}") from None
    report("ready")
    try:
        daemon.serve()
    except BaseException:
        logging.getLogger("vdiskfs").exception("daemon failed")
        raise
    return 0


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


def cmd_umount(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mountpoint)
    pools = [p for p, m in vdiskfs_mounts() if m == mnt]
    if not pools:
        raise UserError(f"{mnt} is not a vdiskfs mount")
    proc = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if proc.returncode:
        raise UserError(proc.stderr.strip() or f"fusermount3 -u {mnt} failed")
    # The daemon checkpoints and exits after the kernel lets go; its lock tells us when.
    wait_pool_released(pools[-1], args.timeout)
    return 0


def wait_pool_released(pool_dir: str, timeout: float) -> None:
    fd = os.open(os.path.join(pool_dir, layout.LOCK), os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(f"unmounted, but the daemon still holds {pool_dir} "
                                    f"after {timeout:.0f}s") from None
                time.sleep(0.05)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- create / fsck
def find_mount(explicit: str | None) -> str:
    """--mount, else $VDISKFS_MOUNT, else the only vdiskfs mount."""
    mnt = explicit or os.environ.get("VDISKFS_MOUNT")
    if mnt:
        mnt = os.path.abspath(mnt)
        if mnt not in [m for _, m in vdiskfs_mounts()]:
            raise UserError(f"{mnt} is not a vdiskfs mount")
        return mnt
    mounts = [m for _, m in vdiskfs_mounts()]
    if not mounts:
        raise UserError("no vdiskfs mount found (use --mount MNT or set VDISKFS_MOUNT)")
    if len(mounts) > 1:
        raise UserError(f"several vdiskfs mounts ({', '.join(mounts)}): choose one with "
                        "--mount MNT or VDISKFS_MOUNT")
    return mounts[0]


def cmd_create(args: argparse.Namespace) -> int:
    from .cow import names
    if not names.valid(args.name):
        raise UserError(f"invalid VDisk name {args.name!r}: use 1-64 characters of "
                        "A-Z a-z 0-9 . _ - not starting with '.'")
    path = os.path.join(find_mount(args.mount), args.name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserError(f"VDisk {args.name} exists") from None
    try:
        os.ftruncate(fd, args.size)
    finally:
        os.close(fd)
    print(f"created VDisk {args.name} of {args.size} bytes")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from .cow.fsck import fsck
    if not os.path.exists(os.path.join(args.pool, layout.HEADER)):
        raise UserError(f"{args.pool} is not a vdiskfs pool")
    try:
        report = fsck(args.pool)
    except PoolBusy as e:
        raise UserError(f"{e}: unmount it first") from None
    for note in report.notes:
        print(f"note: {note}")
    for err in report.errors:
        print(f"error: {err}")
    stats = " ".join(f"{k}={v}" for k, v in report.stats.items())
    if report.clean:
        print(f"{args.pool}: clean ({stats})")
        return 0
    print(f"{args.pool}: {len(report.errors)} problem(s) found", file=sys.stderr)
    return 1


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vdiskfs", description="Virtual disks with instant "
                                "copy-on-write clones, as files in a FUSE mount.")
    p.add_argument("--version", action="version", version=f"vdiskfs {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="mount a pool (created with defaults when empty)")
    m.add_argument("pool", help="pool directory")
    m.add_argument("mountpoint")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (Ctrl-C or SIGTERM unmounts)")
    m.add_argument("--chunk-size", type=parse_size, default=None,
                   help=f"chunk size of a new pool, a power of two "
                        f"(default {layout.DEFAULT_CHUNK_SIZE // 1024}K); fixed at creation")
    m.add_argument("--debug", action="store_true", help="log every request")
    m.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="flush, unmount and wait for the daemon to exit")
    u.add_argument("mountpoint")
    u.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for the daemon to release the pool (default 300)")
    u.set_defaults(func=cmd_umount)

    c = sub.add_parser("create", help="create a VDisk of a given size")
    c.add_argument("name")
    c.add_argument("size", type=parse_size, help="size, e.g. 10G")
    c.add_argument("--mount", help="the vdiskfs mount (default: $VDISKFS_MOUNT or the only one)")
    c.set_defaults(func=cmd_create)

    f = sub.add_parser("fsck", help="check an unmounted pool")
    f.add_argument("pool")
    f.set_defaults(func=cmd_fsck)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"vdiskfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"vdiskfs: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
              file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"vdiskfs: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
