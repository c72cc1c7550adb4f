"""VDisk properties: the keys of ``VDisk.props`` (docs/FORMAT.md, "VDisk properties").

    lba_size   512 or 4096: the sector size the VDisk emulates (settable while not in use)
    serial     unique per VDisk: 8 hex digits of the pool uuid, 8 random, 6 of the vid
    mode       permission bits (never setuid/setgid: see fs/killpriv.py)
    uid, gid   owner
    mtime_ns   last data change (journaled once per commit with its latest value)
    ctime_ns   creation
    clone_job  id of the clone job filling this VDisk; present only until it completes
               (the VDisk cannot be opened meanwhile)

Every change goes through the op ``vset`` (meta.py); this module makes new sets.
"""

from __future__ import annotations

import errno
import secrets
import time

from .errors import VDiskError

DEFAULT_LBA_SIZE = 512
LBA_SIZES = (512, 4096)
KEYS = ("lba_size", "serial", "mode", "uid", "gid", "mtime_ns", "ctime_ns", "clone_job")


def new(pool_uuid: str, vid: int, mode: int, uid: int, gid: int,
        base: dict | None = None) -> dict:
    """The properties of a new VDisk ``vid``; ``base`` carries inherited ones."""
    now = time.time_ns()
    props = {"lba_size": DEFAULT_LBA_SIZE}
    if base:
        props.update(base)
    props.update({"serial": f"{pool_uuid[:8]}{secrets.token_hex(4)}{vid:06x}".upper(),
                  "mode": mode & 0o7777, "uid": uid, "gid": gid,
                  "mtime_ns": now, "ctime_ns": now})
    return props


def for_clone(pool_uuid: str, vid: int, src: dict) -> dict:
    """A clone inherits the source's properties and owner, and gets its own serial."""
    return new(pool_uuid, vid, src["mode"], src["uid"], src["gid"],
               base={"lba_size": src["lba_size"]})


def check_settable(key: str, value: object) -> None:
    """What a user may set directly (the xattr ``user.vdisk.lba_size``)."""
    if key != "lba_size":
        raise VDiskError(errno.EPERM, f"{key} is read-only")
    if value not in LBA_SIZES:
        raise VDiskError(errno.EINVAL, f"lba_size must be one of {LBA_SIZES}")
