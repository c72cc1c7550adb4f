"""VDisk names (SPEC §2): 1-64 of ``A-Z a-z 0-9 . _ -``, not starting with a dot."""

import errno
import re

from .errors import VDiskError

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")


def valid(name: str) -> bool:
    return isinstance(name, str) and bool(_NAME.match(name)) and not name.startswith(".")


def check(name: str) -> None:
    if not valid(name):
        raise VDiskError(errno.EINVAL, f"invalid VDisk name {name!r}: use 1-64 characters "
                                       "of A-Z a-z 0-9 . _ - not starting with '.'")
