"""``vdiskfs POOL MNT -o OPTIONS``: the call mount(8) makes through mount.fuse3.

``mount -t fuse.vdiskfs POOL MNT`` and an fstab line ``POOL MNT fuse.vdiskfs OPTS 0 0``
make mount(8) run /sbin/mount.fuse3, which drops the options meant for mount(8) and
systemd (noauto, nofail, _netdev, user, x-systemd.*, ...) and runs
``vdiskfs POOL MNT -o rw,...,dev,suid`` with PATH set to the system directories (so
``vdiskfs`` must be in /usr/local/bin: setup links it there). This module maps those
options onto ``vdiskfs mount`` (which returns once the mount is ready, as mount(8)
expects). docs/MOUNTING.md lists them.
"""

from __future__ import annotations

import sys

# mount(8)'s generic options that say nothing to vdiskfs: the mount is always read-write,
# nosuid and nodev, whatever is asked (a VDisk is data, never a program or a device).
IGNORED = {"rw", "defaults", "auto", "dev", "nodev", "suid", "nosuid", "exec", "noexec",
           "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime",
           "lazytime", "nolazytime", "diratime", "nodiratime", "async", "sync", "owner",
           "group", "silent", "loud", "nouser", "user", "users", "noauto", "nofail",
           "_netdev"}
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
        elif word == "-f":
            extra.append("--foreground")
        elif word.startswith("-"):
            raise BadOption(f"unknown argument {word!r}")
        else:
            positional.append(word)
    if len(positional) != 2:
        raise BadOption(USAGE)
    args = ["mount", *positional, *extra]
    for opt in filter(None, options):
        key, eq, value = opt.partition("=")
        if key in IGNORED or key.startswith(("x-", "comment=")):
            continue
        if key == "ro":
            raise BadOption("read-only mounts are not supported (option ro)")
        if key in FLAGS and not eq:
            args.append(FLAGS[key])
        elif key in VALUED and value:
            args += [VALUED[key], value]
        else:
            raise BadOption(f"unknown mount option {opt!r} (vdiskfs takes chunk_size=, "
                            "clone_speed=, allow_other, nonempty, debug; see "
                            "docs/MOUNTING.md)")
    return args


def main(argv: list[str]) -> int:
    try:
        args = translate(argv)
    except BadOption as e:
        print(f"vdiskfs: {e}", file=sys.stderr)
        return 1
    from .cli import main as cli_main
    return cli_main(args)
