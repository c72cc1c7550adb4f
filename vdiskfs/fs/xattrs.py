"""VDisk properties as extended attributes ``user.vdisk.*`` (SPEC §2).

Values are ASCII decimal or text. ``lba_size`` is the only writable one (512 or 4096,
while the VDisk is not open); the others are figures the engine computes (``errors``:
block reads of this VDisk that failed their checksum since the mount).
"""

from __future__ import annotations

import errno

import pyfuse3
from pyfuse3 import FUSEError

from ..cow.meta import VDisk
from ..cow.pool import Pool

PREFIX = b"user.vdisk."
WRITABLE = (b"lba_size",)
FIGURES = (b"allocated", b"unique", b"shared")
ALL = (b"lba_size", b"serial") + FIGURES + (b"errors",)


def names() -> list[bytes]:
    return [PREFIX + n for n in ALL]


def _key(name: bytes) -> bytes | None:
    if name.startswith(PREFIX) and name[len(PREFIX):] in ALL:
        return name[len(PREFIX):]
    return None


def get(pool: Pool, vd: VDisk, name: bytes) -> bytes:
    key = _key(name)
    if key is None:
        raise FUSEError(pyfuse3.ENOATTR)
    if key in FIGURES:
        return str(pool.usage(vd)[key.decode()]).encode()
    if key == b"errors":      # reads that failed a checksum since the mount
        return str(pool.data.damage.errors.get(vd.vid, 0)).encode()
    return str(vd.props[key.decode()]).encode()


def set(pool: Pool, vd: VDisk, name: bytes, value: bytes) -> None:  # noqa: A001
    key = _key(name)
    if key is None:
        # Only our properties live here: refuse other attributes rather than drop them.
        raise FUSEError(errno.ENOTSUP if not name.startswith(PREFIX) else errno.EINVAL)
    if key not in WRITABLE:
        raise FUSEError(errno.EPERM)
    digits = value.rstrip(b"\0\n")          # `setfattr -v 4096` and echo-style values
    if not digits.isdigit() or not digits.isascii() or len(digits) > 12:
        raise FUSEError(errno.EINVAL)
    number = int(digits)
    pool.set_prop(vd, key.decode(), number)


def remove(vd: VDisk, name: bytes) -> None:
    raise FUSEError(pyfuse3.ENOATTR if _key(name) is None else errno.EPERM)
