"""Exceptions the engine raises to its callers."""

import errno

from .codec import FormatError  # noqa: F401  (metadata that cannot be trusted)


class VDiskError(OSError):
    """A refused request; ``errno`` says why (the FUSE layer answers with it)."""

    def __init__(self, err: int, msg: str):
        super().__init__(err, msg)


class PoolBusy(Exception):
    """The pool is locked by another process."""


class StoreFailed(OSError):
    """A write, fdatasync or punch of a pool file failed in a way that may have lost what
    was written (after a failed fdatasync the kernel may drop the pages that failed: a
    retry could "succeed" without them). The pool stops writing: fail-stop."""


NOT_FATAL = (errno.ENOSPC, errno.EDQUOT)   # refused before anything was lost


def fatal(e: OSError, what: str, *, sync: bool = False) -> OSError:
    """``e`` as a ``StoreFailed`` if it is one (any failed sync; a write failing other
    than for want of space), else ``e``."""
    if isinstance(e, StoreFailed) or (not sync and e.errno in NOT_FATAL):
        return e
    return StoreFailed(e.errno or errno.EIO, f"{what}: {e.strerror or e}")
