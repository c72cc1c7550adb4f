"""Exceptions the engine raises to its callers."""

from .codec import FormatError  # noqa: F401  (metadata that cannot be trusted)


class VDiskError(OSError):
    """A refused request; ``errno`` says why (the FUSE layer answers with it)."""

    def __init__(self, err: int, msg: str):
        super().__init__(err, msg)


class PoolBusy(Exception):
    """The pool is locked by another process."""
