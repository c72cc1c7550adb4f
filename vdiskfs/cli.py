"""Command line: ``vdiskfs mount|umount|create|clone|fsck``; ``qclone`` is ``vdiskfs clone``.

Every command exits 0 on success and otherwise prints one line to stderr and exits non-zero;
user errors never show a traceback.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time

from . import __version__
from .cow import layout
from .cow.errors import FormatError, PoolBusy
from .ctl import client
from .ctl.client import UserError, find_mount, lock_holder, vdiskfs_mounts

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 4096, 64K, 10G)")
    return int(m.group(1)) * UNITS[m.group(2).upper()]


# ---------------------------------------------------------------- mount / umount
def check_pool_path(pool_dir: str) -> None:
    if os.path.lexists(pool_dir) and not os.path.isdir(pool_dir):
        raise UserError(f"pool {pool_dir} is not a directory (a pool is a directory; "
                        "name a new or empty one to create a pool there)")
    if not os.path.isdir(pool_dir) and not os.path.isdir(os.path.dirname(pool_dir)):
        raise UserError(f"pool {pool_dir} does not exist, nor does its parent directory")
    where = [m for p, m in vdiskfs_mounts() if p == pool_dir]
    if where and layout.is_pool(pool_dir) and lock_holder(pool_dir):
        raise UserError(f"pool {pool_dir} is already mounted at {where[-1]} "
                        f"(stop with: vdiskfs umount {shlex.quote(where[-1])})")


def check_mountpoint(mnt: str, nonempty: bool) -> None:
    """Refuse a mount point that is not a directory, is a mount already, or holds files;
    clean up a dead vdiskfs mount whose daemon is gone (its pool's lock is free)."""
    mounted = [p for p, m in vdiskfs_mounts() if m == mnt]
    if mounted and lock_holder(mounted[-1]) is None:
        # Its daemon was killed: the pool is free and the mount a corpse (which may still
        # answer stat from the kernel's cache for a second). The next open of the pool
        # replays its journal as after any crash.
        proc = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, text=True)
        if proc.returncode:
            raise UserError(f"mount point {mnt} is a dead vdiskfs mount and could not be "
                            f"unmounted: {proc.stderr.strip()}")
        print(f"vdiskfs: cleaned up the dead mount at {mnt} (its daemon was gone)",
              file=sys.stderr)
        mounted = [p for p, m in vdiskfs_mounts() if m == mnt]
    try:
        st = os.stat(mnt)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise UserError(f"mount point {mnt} is a dead FUSE mount (Transport endpoint is "
                            f"not connected): unmount it with fusermount3 -u -z "
                            f"{shlex.quote(mnt)}") from None
        if e.errno == errno.ENOENT:
            raise UserError(f"mount point {mnt} does not exist: make it first "
                            f"(mkdir {shlex.quote(mnt)})") from None
        raise UserError(f"mount point {mnt}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"mount point {mnt} is not a directory")
    if mounted or os.path.ismount(mnt):
        what = f"vdiskfs mount of {mounted[-1]}" if mounted else "mount point"
        raise UserError(f"{mnt} is already a {what}: choose another directory"
                        + (f" or stop it with: vdiskfs umount {shlex.quote(mnt)}"
                           if mounted else ""))
    if not nonempty and os.listdir(mnt):
        raise UserError(f"mount point {mnt} is not empty: the mount would hide its files "
                        "(--nonempty mounts over them anyway)")


def _nbd_config(args: argparse.Namespace) -> "NbdConfig | None":
    from .nbd.config import NbdConfig, parse_endpoint
    if not args.nbd:
        if args.nbd_readonly or args.nbd_readonly_export or args.nbd_tls_cert or \
                args.nbd_tls_key or args.nbd_tls_ca:
            raise UserError("--nbd-readonly* and --nbd-tls-* need --nbd")
        return None
    return NbdConfig(tuple(parse_endpoint(e) for e in args.nbd), args.nbd_readonly,
                     frozenset(args.nbd_readonly_export), _tls_files(args))


def _tls_files(args: argparse.Namespace) -> tuple | None:
    if not (args.nbd_tls_cert or args.nbd_tls_key or args.nbd_tls_ca):
        return None
    if not (args.nbd_tls_cert and args.nbd_tls_key):
        raise UserError("NBD TLS needs both --nbd-tls-cert and --nbd-tls-key")
    for f in (args.nbd_tls_cert, args.nbd_tls_key, args.nbd_tls_ca):
        if f and not os.path.isfile(f):
            raise UserError(f"NBD TLS: no file {f}")
    return (args.nbd_tls_cert, args.nbd_tls_key, args.nbd_tls_ca)


def cmd_mount(args: argparse.Namespace) -> int:
    pool_dir = os.path.abspath(args.pool)
    _nbd_config(args)                  # usage errors before anything is touched
    mnt = os.path.abspath(args.mountpoint)
    if os.path.commonpath([os.path.realpath(pool_dir), os.path.realpath(mnt)]) == \
            os.path.realpath(mnt):
        # The daemon reopens pool files by name: under its own mount it would wait on itself.
        raise UserError(f"pool {pool_dir} is inside the mount point {mnt}: choose a pool "
                        "directory outside it")
    check_pool_path(pool_dir)
    check_mountpoint(mnt, args.nonempty)
    if not os.path.isdir(pool_dir):
        os.mkdir(pool_dir, 0o700)      # a new pool in a new directory
    if args.foreground:
        return _serve(pool_dir, mnt, args.chunk_size, args.debug, args.ready_fd,
                      args.clone_speed, not args.unsafe_no_data_sync, args.allow_other,
                      _nbd_config(args))
    # Background: a detached child serves; we return once it reports the mount ready.
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "vdiskfs", "mount", "--foreground", "--ready-fd", str(w),
           pool_dir, mnt]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.clone_speed:
        cmd += ["--clone-speed", str(args.clone_speed)]
    if args.unsafe_no_data_sync:
        cmd.append("--unsafe-no-data-sync")
    if args.allow_other:
        cmd.append("--allow-other")
    if args.nonempty:
        cmd.append("--nonempty")
    for ep in args.nbd:
        cmd += ["--nbd", ep]
    if args.nbd_readonly:
        cmd.append("--nbd-readonly")
    for name in args.nbd_readonly_export:
        cmd += ["--nbd-readonly-export", name]
    for flag, value in (("--nbd-tls-cert", args.nbd_tls_cert), ("--nbd-tls-key", args.nbd_tls_key),
                        ("--nbd-tls-ca", args.nbd_tls_ca)):
        if value:
            cmd += [flag, os.path.abspath(value)]
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
          f"stop with: vdiskfs umount {shlex.quote(mnt)}")
    return 0


def _serve(pool_dir: str, mnt: str, chunk_size: int | None, debug: bool,
           ready_fd: int | None, clone_speed: int, sync_data: bool,
           allow_other: bool, nbd: "NbdConfig | None" = None) -> int:
    # Imported here: pyfuse3 and trio are needed by the daemon only.
    from .cow.pool import open_pool
    from .fs.daemon import Daemon, setup_logging

    def report(msg: str) -> None:
        if ready_fd is not None:
            os.write(ready_fd, msg.encode())
            os.close(ready_fd)

    try:
        pool = open_pool(pool_dir, create=True, chunk_size=chunk_size, sync_data=sync_data)
    except (PoolBusy, FormatError, FileExistsError, FileNotFoundError, ValueError,
            PermissionError) as e:
        report(str(e))
        raise UserError(str(e)) from None
    setup_logging(pool_dir if ready_fd is not None else None, debug)
    try:
        daemon = Daemon(pool, mnt, clone_speed, allow_other, nbd)
    except (OSError, ValueError) as e:      # certificate files (ssl.SSLError is an OSError)
        pool.close()
        report(f"NBD TLS: {e}")
        raise UserError(f"NBD TLS: {e}") from None
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


def cmd_umount(args: argparse.Namespace) -> int:
    mnt = os.path.abspath(args.mountpoint)
    pool = find_pool(mnt)
    if pool is None:
        raise UserError(f"{mnt} is not a vdiskfs mount")
    lock = os.path.join(pool, layout.LOCK)
    if lock_holder(pool) is None:
        # The daemon is gone (killed): what is left is a dead mount. Nothing of the
        # pool is lost by dropping it; the next mount replays the journal.
        proc = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, text=True)
        if proc.returncode:
            raise UserError(proc.stderr.strip() or f"fusermount3 -u -z {mnt} failed")
        print(f"vdiskfs: {mnt} was a dead mount (its daemon was gone): unmounted; the next "
              f"mount of {pool} recovers it", file=sys.stderr)
        return 0
    with open(lock) as f:
        pid = int(f.read().strip() or 0)
    from .ctl.users import describe, users
    if args.force:
        # The daemon flushes what it has and detaches: users of the VDisks get EIO.
        if not pid or not _alive(pid):
            raise UserError(f"no daemon serves {mnt}")
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)     # the second one detaches even while in use
    else:
        busy = users(mnt)
        try:
            for v in read_listing(mnt)["vdisks"]:
                if v.get("nbd"):
                    busy.setdefault(v["name"], []).append(f"{v['nbd']} NBD client(s)")
        except UserError:
            pass        # an older daemon without the listing: the kernel's users only
        if busy:
            raise UserError(f"{mnt} is in use, not unmounted: {describe(busy)} "
                            "(stop them first, or 'vdiskfs umount --force' detaches them)")
        proc = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
        if proc.returncode:
            raise UserError(proc.stderr.strip() or f"fusermount3 -u {mnt} failed")
    # The daemon checkpoints and exits after the kernel lets go: wait until it has
    # released the pool lock and is gone, so a remount or fsck can follow at once.
    deadline = time.monotonic() + args.timeout
    wait_pool_released(lock, deadline)
    while pid and _alive(pid):
        if time.monotonic() > deadline:
            raise UserError(f"daemon {pid} released the pool but has not exited")
        time.sleep(0.01)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_pool_released(lock: str, deadline: float) -> None:
    fd = os.open(lock, os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(f"unmounted, but the daemon still holds {lock} "
                                    "after the timeout") from None
                time.sleep(0.02)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- create / fsck
def cmd_create(args: argparse.Namespace) -> int:
    from .cow import names
    from .cow.pool import MAX_VDISK_SIZE
    if not names.valid(args.name):
        raise UserError(f"invalid VDisk name {args.name!r}: use 1-64 characters of "
                        "A-Z a-z 0-9 . _ - not starting with '.'")
    if args.size > MAX_VDISK_SIZE:
        raise UserError(f"size {args.size} is too large: a VDisk holds at most "
                        f"{human(MAX_VDISK_SIZE)} ({MAX_VDISK_SIZE} bytes)")
    mnt = find_mount(args.mount)
    path = os.path.join(mnt, args.name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserError(f"VDisk {args.name} exists") from None
    except OSError as e:
        raise UserError(f"cannot create VDisk {args.name}: {e.strerror}") from None
    try:
        os.ftruncate(fd, args.size)
    except OSError as e:
        os.close(fd)
        os.unlink(path)     # a failed create leaves nothing behind
        raise UserError(f"cannot create VDisk {args.name} of {args.size} bytes: "
                        f"{e.strerror}") from None
    os.close(fd)
    print(f"created VDisk {args.name} of {human(args.size)} ({args.size} bytes)")
    try:
        pool = read_listing(mnt)["pool"]
    except UserError:          # a daemon of another version: the VDisk is made, no warning
        return 0
    if pool["provisioned"] > pool["backing_capacity"]:
        print(f"vdiskfs: warning: the pool is overcommitted: VDisks of "
              f"{human(pool['provisioned'])} on a backing filesystem of "
              f"{human(pool['backing_capacity'])}; writes fail (ENOSPC) once it is full",
              file=sys.stderr)
    return 0


# ---------------------------------------------------------------- list / info
COLUMNS = {"name": "NAME", "size": "SIZE", "allocated": "ALLOC", "unique": "UNIQUE",
           "shared": "SHARED", "lba_size": "LBA", "serial": "SERIAL", "state": "STATE",
           "errors": "ERRORS", "open": "OPEN"}
DEFAULT_COLUMNS = "name,size,allocated,unique,shared,lba_size,serial,state"
SIZES = ("size", "allocated", "unique", "shared")
LISTING_FORMAT = 1


def human(n: int) -> str:
    """Bytes as ``zfs list`` shows them: 3 significant digits, binary units."""
    for unit in ("", "K", "M", "G", "T", "P", "E"):
        if n < 1024 or unit == "E":
            break
        n /= 1024
    if unit == "":
        return f"{n}B" if isinstance(n, int) else f"{n:.0f}B"
    return f"{n:.3g}{unit}" if n < 1000 else f"{n:.0f}{unit}"


def read_listing(mnt: str) -> dict:
    """The daemon's ``.ctl/vdisks`` (ctl/listing.py)."""
    import json
    path = os.path.join(mnt, ".ctl", "vdisks")
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if doc.get("format") != LISTING_FORMAT:
        raise UserError(f"{path} has format {doc.get('format')!r}, this vdiskfs reads "
                        f"{LISTING_FORMAT}: the mount is served by another version")
    return doc


def _cell(v: dict, col: str, exact: bool) -> str:
    value = v[col]
    if col in SIZES and not exact:
        return human(value)
    if col == "state" and v.get("progress") is not None and v["state"] == "cloning":
        return f"cloning {v['progress']}%"
    return str(value)


def pool_summary(pool: dict, exact: bool) -> list[str]:
    h = (lambda n: str(n)) if exact else human
    line = (f"pool {pool['path']}: {pool['vdisks']} VDisk(s), {h(pool['provisioned'])} "
            f"provisioned, {h(pool['stored'])} stored, sharing saves {h(pool['saved'])}; "
            f"{h(pool['used'])} used, backing filesystem {h(pool['backing_capacity'])} "
            f"({pool['backing_percent']:.0f}% full, {h(pool['backing_avail'])} free)")
    return [line] + [f"warning: {w}" for w in pool["warnings"]]


def cmd_list(args: argparse.Namespace) -> int:
    import json
    cols = [c.strip() for c in args.output.split(",") if c.strip()]
    bad = [c for c in cols if c not in COLUMNS]
    if bad or not cols:
        raise UserError(f"unknown column(s) {', '.join(bad) or '(none)'}: choose from "
                        f"{','.join(COLUMNS)}")
    doc = read_listing(find_mount(args.mount))
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    rows = [[COLUMNS[c] for c in cols]]
    rows += [[_cell(v, c, args.bytes) for c in cols] for v in doc["vdisks"]]
    if not args.no_headers or len(rows) > 1:
        start = 1 if args.no_headers else 0
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        right = [c in SIZES or c in ("lba_size", "errors", "open") for c in cols]
        for r in rows[start:]:
            cells = [x.rjust(w) if rj else x.ljust(w) for x, w, rj in zip(r, widths, right)]
            print("  ".join(cells).rstrip())
    if not args.no_headers:
        print("\n".join(pool_summary(doc["pool"], args.bytes)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json
    mnt = find_mount(args.mount)
    doc = read_listing(mnt)
    found = [v for v in doc["vdisks"] if v["name"] == args.name]
    if not found:
        raise UserError(f"no VDisk {args.name} in {mnt}")
    v = dict(found[0], chunk_size=doc["pool"]["chunk_size"], pool=doc["pool"]["path"],
             path=os.path.join(mnt, args.name))
    if args.json:
        print(json.dumps(v, indent=2))
        return 0
    state = _cell(v, "state", True)
    print(f"VDisk: {v['name']}\nfile: {v['path']}")
    for key in SIZES:
        print(f"{key}: {human(v[key])} ({v[key]} bytes)")
    print(f"lba_size: {v['lba_size']}\nserial: {v['serial']}\nstate: {state}\n"
          f"checksum errors: {v['errors']}\nopen: {v['open']}\n"
          f"modified: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(v['mtime_ns'] / 1e9))}"
          f"\nchunk size: {human(v['chunk_size'])}\npool: {v['pool']}")
    return 0


def cmd_clone(args: argparse.Namespace) -> int:
    mnt = find_mount(args.mount)
    if args.list:
        if args.src or args.dst or args.cancel or args.wait:
            raise UserError("-l takes only -p and -e")
        sys.stdout.write(client.read_status(mnt, extended=args.extended))
        if args.purge:
            client.purge(mnt)
        return 0
    if args.purge:
        if args.src or args.dst or args.cancel:
            raise UserError("-p takes no -s, -d or -c")
        client.purge(mnt)
        return 0
    if args.cancel:
        if not args.src or args.dst:
            raise UserError("cancel with -s SRC -c")
        client.cancel(mnt, args.src)
        print(f"Clone operations from {args.src} cancelled")
        return 0
    if not (args.src and args.dst):
        raise UserError("start a clone with -s SRC -d DST (see --help)")
    client.start(mnt, args.src, args.dst)
    print(f"Clone of {args.src} to {args.dst} successfully started")
    if args.wait:
        state = client.wait(mnt, args.src, args.dst)
        if state != "Completed":
            raise UserError(f"clone of {args.src} to {args.dst}: {state}")
    return 0


def cmd_scrub(args: argparse.Namespace) -> int:
    """Start the daemon's scrub (or follow the one running) and report: exit 0 when no
    block is damaged, 1 when some are (their VDisk ranges are listed)."""
    import json
    mnt = find_mount(args.mount)
    ctl = os.path.join(mnt, ".ctl", "scrub")
    try:
        with open(ctl, "w") as f:
            f.write("start\n")
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise UserError(f"cannot start a scrub of {mnt}: {e.strerror}") from None
        print(f"a scrub of {mnt} is running: following it", file=sys.stderr)
    tty = sys.stderr.isatty() and not args.json
    while True:
        with open(ctl) as f:
            status = client.parse_scrub(f.read())
        if tty:
            done, total = status.get("checked", 0), status.get("total", 0) or 1
            pct = min(100, done * 100 // total)
            bar = "#" * (pct * 40 // 100)
            sys.stderr.write(f"\rscrub [{bar:<40}] {pct:3d}% {done >> 20}/{total >> 20} "
                             f"MiB, {status.get('damaged_blocks', 0)} damaged")
            sys.stderr.flush()
        if status["state"] != "running":
            break
        time.sleep(0.2)
    if tty:
        sys.stderr.write("\n")
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        for vd, start, end in status["ranges"]:
            print(f"damaged: VDisk {vd} bytes {start}-{end}")
        print(f"scrub {status['state']}: {status.get('checked', 0)} bytes checked, "
              f"{status.get('damaged_blocks', 0)} damaged block(s), "
              f"{status.get('torn_blocks', 0)} torn block(s) of a crash accepted")
    if status["state"] not in ("done", "cancelled"):
        raise UserError(f"scrub {status['state']}: see {find_pool(mnt) or 'POOL'}/daemon.log")
    return 1 if status.get("damaged_blocks") else 0


def find_pool(mnt: str) -> str | None:
    """The pool mounted at ``mnt`` (the last mount there), or None."""
    pools = [p for p, m in vdiskfs_mounts() if m == mnt]
    return pools[-1] if pools else None


FSCK_CLEAN, FSCK_CORRECTED, FSCK_UNCORRECTED, FSCK_FAILED = 0, 1, 4, 8   # as e2fsck's


def cmd_fsck(args: argparse.Namespace) -> int:
    """Exit 0 clean, 1 errors corrected, 4 errors left, 8 could not check (as e2fsck)."""
    from .cow.fsck import Severity, fsck, repair
    logging.getLogger("vdiskfs").setLevel(logging.CRITICAL)   # the report says it all
    if not layout.is_pool(args.pool):
        print(f"vdiskfs: {args.pool} is not a vdiskfs pool", file=sys.stderr)
        return FSCK_FAILED
    try:
        report = fsck(args.pool, data=args.data)
        if args.repair and not report.clean:
            report = repair(args.pool, data=args.data)
            fixed = True
        else:
            fixed = False
    except PoolBusy as e:
        print(f"vdiskfs: {e}: unmount it first", file=sys.stderr)
        return FSCK_FAILED
    except OSError as e:
        print(f"vdiskfs: cannot check {args.pool}: {e}", file=sys.stderr)
        return FSCK_FAILED
    for f in report.findings:   # INFO is a note; LEAK, ERROR, LOST are problems
        label = "note" if f.severity == Severity.INFO else f.severity.name.lower()
        print(f"{label}: {f.text}")
    stats = " ".join(f"{k}={v}" for k, v in report.stats.items())
    left = [e for e in report.errors if e.startswith(("cannot repair", "still wrong"))]
    if not fixed:
        if report.clean:
            print(f"{args.pool}: clean ({stats})")
            return FSCK_CLEAN
        print(f"{args.pool}: {len(report.errors)} problem(s) found, nothing changed; "
              f"'vdiskfs fsck --repair {args.pool}' repairs what it can", file=sys.stderr)
        return FSCK_UNCORRECTED
    if left:
        print(f"{args.pool}: {len(left)} problem(s) could not be repaired (see above)",
              file=sys.stderr)
        return FSCK_UNCORRECTED
    lost = len(report.errors)
    print(f"{args.pool}: repaired ({stats})" + (
        f"; {lost} thing(s) could not be saved (see above)" if lost else ""))
    return FSCK_CORRECTED


def _nbd_endpoint(text: str) -> str:
    from .nbd.config import parse_endpoint
    try:
        parse_endpoint(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# ---------------------------------------------------------------- parser
class Parser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="vdiskfs", description="Virtual disks with instant "
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
    m.add_argument("--clone-speed", type=parse_size, default=0, metavar="BYTES",
                   help="limit each clone job to this much source data per second, "
                        "e.g. 64M (default: unlimited)")
    m.add_argument("--nonempty", action="store_true",
                   help="mount even over a directory that holds files (they are hidden "
                        "until the unmount)")
    m.add_argument("--allow-other", action="store_true",
                   help="let other users reach the mount (file modes still apply; "
                        "see docs/RELIABILITY.md)")
    m.add_argument("--nbd", action="append", default=[], metavar="ENDPOINT",
                   type=_nbd_endpoint,
                   help="also serve every completed VDisk over NBD at unix:PATH (mode 0600) "
                        "or tcp:HOST:PORT (repeatable; see docs/NBD.md)")
    m.add_argument("--nbd-readonly", action="store_true",
                   help="every NBD export is read-only")
    m.add_argument("--nbd-readonly-export", action="append", default=[], metavar="NAME",
                   help="this VDisk's NBD export is read-only (repeatable)")
    m.add_argument("--nbd-tls-cert", metavar="PEM", help="require TLS (STARTTLS) on NBD: "
                   "the server's certificate (with --nbd-tls-key)")
    m.add_argument("--nbd-tls-key", metavar="PEM", help="the server certificate's key")
    m.add_argument("--nbd-tls-ca", metavar="PEM",
                   help="require client certificates signed by this CA")
    m.add_argument("--debug", action="store_true",
                   help="log at DEBUG level (the daemon's log: POOL/daemon.log)")
    m.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    # Breaks fsync on purpose (no fdatasync of chunk data): only for the test that proves
    # the power-loss test can fail. See docs/RELIABILITY.md.
    m.add_argument("--unsafe-no-data-sync", action="store_true", help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="flush, unmount and wait for the daemon to exit")
    u.add_argument("mountpoint")
    u.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for the daemon to release the pool (default 300)")
    u.add_argument("--force", action="store_true",
                   help="unmount even while VDisks are in use: the daemon flushes and "
                        "detaches, their users get EIO")
    u.set_defaults(func=cmd_umount)

    c = sub.add_parser("create", help="create a VDisk of a given size")
    c.add_argument("name")
    c.add_argument("size", type=parse_size, help="size, e.g. 10G")
    c.add_argument("--mount", help="the vdiskfs mount (default: $VDISKFS_MOUNT or the only one)")
    c.set_defaults(func=cmd_create)

    ls = sub.add_parser("list", help="list the VDisks of a mount and the pool's space",
                        description="One row per VDisk: size, allocated, unique and shared "
                        "bytes, lba_size, serial, state (ok, in use, cloning N%, clone "
                        "source, Error); then the pool's summary and its warnings.")
    ls.add_argument("-o", "--output", default=DEFAULT_COLUMNS, metavar="COLUMNS",
                    help=f"comma-separated columns (default {DEFAULT_COLUMNS}; also "
                         "errors, open)")
    ls.add_argument("-p", "--bytes", action="store_true", help="exact numbers of bytes")
    ls.add_argument("-H", "--no-headers", action="store_true",
                    help="rows only: no header line and no summary (for scripts)")
    ls.add_argument("--json", action="store_true", help="everything as JSON (.ctl/vdisks)")
    ls.add_argument("--mount", help="the vdiskfs mount (default: $VDISKFS_MOUNT or the only one)")
    ls.set_defaults(func=cmd_list)

    inf = sub.add_parser("info", help="show one VDisk (as qemu-img info)")
    inf.add_argument("name")
    inf.add_argument("--json", action="store_true", help="as JSON")
    inf.add_argument("--mount", help="the vdiskfs mount (default: $VDISKFS_MOUNT or the only one)")
    inf.set_defaults(func=cmd_info)

    cl = sub.add_parser("clone", help="clone VDisks, list and cancel clone jobs (= qclone)",
                        description="Clone VDisks (QUADStor qclone flags). Examples: "
                        "-s FOO -d BAR [-w] | -l [-e] [-p] | -s FOO -c | -p")
    add_clone_args(cl)
    cl.set_defaults(func=cmd_clone)

    sc = sub.add_parser("scrub", help="read and check every block of a mounted pool")
    sc.add_argument("--mount", help="the vdiskfs mount (default: $VDISKFS_MOUNT or the only one)")
    sc.add_argument("--json", action="store_true", help="print the summary as JSON")
    sc.set_defaults(func=cmd_scrub)

    f = sub.add_parser("fsck", help="check an unmounted pool (and repair it)")
    f.add_argument("pool")
    f.add_argument("--repair", action="store_true",
                   help="salvage the journal up to any damage, rebuild refcounts from the "
                        "maps, free leaked slots; reports what could not be saved")
    f.add_argument("--data", action="store_true",
                   help="also read every block of data and check it against its checksum")
    f.set_defaults(func=cmd_fsck)
    p.commands = tuple(sub.choices)   # type: ignore[attr-defined]   (main: mount.fuse3's calls)
    return p


NAME_FLAGS = ("-s", "--source", "-d", "--dest")


def glue_names(argv: list[str]) -> list[str]:
    """The word after -s/-d is always a VDisk name, even one starting with "-" (a VDisk
    may be named "-s"): glue it to its flag so argparse does not take it for one."""
    out, i = [], 0
    while i < len(argv):
        w = argv[i]
        if w == "--":
            return out + argv[i:]
        if w in NAME_FLAGS and i + 1 < len(argv):
            out.append(f"{w}={argv[i + 1]}" if w.startswith("--") else w + argv[i + 1])
            i += 2
            continue
        out.append(w)
        i += 1
    return out


def add_clone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-s", "--source", dest="src", metavar="SRC",
                   help="source VDisk (the next word is always taken as its name)")
    p.add_argument("-d", "--dest", dest="dst", metavar="DST",
                   help="destination VDisk, a new name")
    p.add_argument("-c", "--cancel", dest="cancel", action="store_true",
                   help="cancel the clones in progress from SRC")
    p.add_argument("-l", "--list", dest="list", action="store_true",
                   help="list clone operations")
    p.add_argument("-p", "--purge", dest="purge", action="store_true",
                   help="purge finished operations (after listing, with -l)")
    p.add_argument("-e", "--extended", dest="extended", action="store_true",
                   help="with -l: add elapsed time and bytes shared")
    p.add_argument("-w", "--wait", action="store_true",
                   help="show progress and return when the clone ends")
    p.add_argument("--mount", help="the vdiskfs mount (default: $VDISKFS_MOUNT or the only one)")


def build_qclone_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qclone", description="Clone VDisks "
                                     "(vdiskfs clone, with QUADStor qclone flags).")
    add_clone_args(parser)
    parser.set_defaults(func=cmd_clone)
    return parser


def qclone_main(argv: list[str] | None = None) -> int:
    """``qclone``: the clone command under QUADStor's name, with the same flags."""
    return _run(build_qclone_parser(), glue_names(sys.argv[1:] if argv is None else argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in parser.commands:
        if "-o" in argv or any(w.startswith("-o") for w in argv):
            # mount(8) through mount.fuse3 runs ``vdiskfs POOL MNT -o OPTS`` (fstab,
            # -t fuse.vdiskfs): it always passes -o.
            from .mounthelper import main as mount_helper
            return mount_helper(argv)
        print(f"vdiskfs: unknown command {argv[0]!r}: choose from "
              f"{', '.join(parser.commands)} (see vdiskfs --help)", file=sys.stderr)
        return 2
    if argv and argv[0] == "clone":
        argv = argv[:1] + glue_names(argv[1:])
    if argv and argv[0] == "create" and any(re.fullmatch(r"-\d.*", w) for w in argv[1:]):
        # argparse would take "-5G" for an option and say the size is missing
        print(f"vdiskfs: bad size {next(w for w in argv[1:] if re.match(r'-[0-9]', w))!r}: "
              "a size cannot be negative", file=sys.stderr)
        return 2
    return _run(parser, argv)


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"{parser.prog}: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
              file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
