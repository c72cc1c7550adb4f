"""``vdiskfs POOL MNT -o OPTIONS``: the call mount(8) makes through mount.fuse3.

``mount -t fuse.vdiskfs POOL MNT`` and an fstab line ``POOL MNT fuse.vdiskfs OPTS 0 0``
make mount(8) (which keeps noauto, nofail, _netdev, x-*, comment= to itself and clears
PATH) run /sbin/mount.fuse3, which drops user, nofail, noauto, _netdev, ..., appends
``dev,suid`` unless nodev/nosuid were given, and runs ``vdiskfs POOL MNT -o rw,...``
through /bin/sh, whose default PATH has /usr/local/bin (setup links ``vdiskfs`` there).
This module maps those options onto ``vdiskfs mount`` (which returns once the mount is
ready, as mount(8) expects); docs/MOUNTING.md lists them. Called by hand, ``-f`` keeps
the daemon in the foreground (mount.fuse3 never passes it)."""

from __future__ import annotations

import re
import sys

# mount(8)'s generic options that say nothing to vdiskfs: the mount is always read-write,
# nosuid and nodev, whatever is asked (a VDisk is data, never a program or a device).
IGNORED = {"rw", "defaults", "auto", "dev", "nodev", "suid", "nosuid", "exec", "noexec",
           "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime",
           "lazytime", "nolazytime", "diratime", "nodiratime", "iversion", "noiversion",
           "nomand", "async", "owner", "group", "noowner", "silent", "loud", "nouser",
           "user", "users", "noauto", "nofail", "_netdev", "comment"}
# Asked-for semantics the daemon does not give: refused rather than silently weakened.
REFUSED = {
    "ro": "read-only mounts are not supported (option ro)",
    "sync": "option sync is not supported: vdiskfs commits at fsync/fdatasync (and every "
            "5 s); open the VDisk with O_SYNC/O_DSYNC or let the guest flush",
    "dirsync": "option dirsync is not supported: vdiskfs commits at fsync (and every 5 s)",
    "drop_privileges": "option drop_privileges is not supported (the daemon mounts "
                       "itself)",
}
FLAGS = {"allow_other": "--allow-other", "debug": "--debug", "nonempty": "--nonempty"}
VALUED = {"chunk_size": "--chunk-size", "clone_speed": "--clone-speed"}
USAGE = "usage: vdiskfs POOL MOUNTPOINT [-o OPTIONS]   (as mount.fuse3 calls it)"


class BadOption(Exception):
    pass


def translate(argv: list[str]) -> list[str]:
    """``POOL MNT [-o OPTS]... [-n] [-v] [-s] [-f]`` -> arguments of ``vdiskfs mount``."""
    positional, options, extra = [], [], []
    it = iter(argv)
    for word in it:
        if word == "-o":
            value = next(it, None)
            if value is None:
                raise BadOption("-o needs a value")
            options += value.split(",")
        elif word.startswith("-o") and len(word) > 2:
            options += word[2:].split(",")
        elif word in ("-n", "-v", "-s", "-i"):   # mount(8)'s: no mtab, verbose, sloppy...
            continue
        elif word == "-t":                  # mount.fuse3 keeps it, but accept it if given
            fstype = next(it, "")
            if fstype not in ("fuse.vdiskfs", "vdiskfs"):
                raise BadOption(f"-t {fstype}: this program mounts fuse.vdiskfs only")
        elif word == "-f":
            extra.append("--foreground")
        elif word.startswith("-"):
            raise BadOption(f"unknown argument {word!r}")
        else:
            positional.append(word)
    if len(positional) != 2:
        raise BadOption(USAGE)
    if positional[1].startswith("/dev/fd/"):
        # mount.fuse3's drop_privileges mounts first (without the daemon's options:
        # default_permissions, nosuid, nodev) and hands over the FUSE fd as /dev/fd/N;
        # the daemon mounts itself, so that mount is left dead once we exit.
        raise BadOption(REFUSED["drop_privileges"] + _left_by_mount_fuse3())
    args = ["mount", *positional, *extra]
    for opt in filter(None, options):
        key, eq, value = opt.partition("=")
        if key in IGNORED or key.startswith("x-"):
            continue
        if key in REFUSED:
            raise BadOption(REFUSED[key])
        if key in FLAGS and not eq:
            args.append(FLAGS[key])
        elif key in VALUED and value:
            args += [VALUED[key], value]
        else:
            raise BadOption(f"unknown mount option {opt!r} (vdiskfs takes chunk_size=, "
                            "clone_speed=, allow_other, nonempty, debug; see "
                            "docs/MOUNTING.md)")
    return args


def _left_by_mount_fuse3() -> str:
    """Where mount.fuse3 mounted for drop_privileges: its fsname is the type, never a pool
    path (the daemon's own mounts name their pool)."""
    def unescape(field: str) -> str:     # /proc/mounts writes a space as \040
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)

    try:
        with open("/proc/self/mounts") as f:
            rows = [line.split()[:3] for line in f]
    except OSError:
        return ""
    mine = [unescape(mnt) for src, mnt, fstype in rows
            if fstype == "fuse.vdiskfs" and not src.startswith("/")]
    return (f"; mount.fuse3 has mounted {mine[-1]} already, dead once this exits: "
            f"umount {mine[-1]}") if mine else ""


def main(argv: list[str]) -> int:
    try:
        args = translate(argv)
    except BadOption as e:
        print(f"vdiskfs: {e}", file=sys.stderr)
        return 1
    from .cli import main as cli_main
    return cli_main(args)
