"""The pool directory: its file names, the pool header record, atomic file replacement
and the chunk-size rule. What each file holds is documented in docs/FORMAT.md."""

from __future__ import annotations

import os
import time
import uuid

from . import codec

HEADER = "vdiskfs-pool"
LOCK = "lock"
DATA = "data"
CHECKPOINT = "checkpoint"
JOURNAL = "journal"
LOG = "daemon.log"

DEFAULT_CHUNK_SIZE = 256 * 1024   # chosen by bench/chunksize.py: see docs/ARCHITECTURE.md
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_PAGE_ENTRIES = 1024


def check_chunk_size(cs: int) -> None:
    if cs < MIN_CHUNK_SIZE or cs > MAX_CHUNK_SIZE or cs & (cs - 1):
        raise ValueError(f"chunk size must be a power of two between {MIN_CHUNK_SIZE} and "
                         f"{MAX_CHUNK_SIZE} bytes, not {cs}")


def header_record(chunk_size: int, page_entries: int = DEFAULT_PAGE_ENTRIES) -> dict:
    check_chunk_size(chunk_size)
    return {"kind": "pool", "v": codec.FORMAT_VERSION, "chunk_size": chunk_size,
            "page_entries": page_entries, "uuid": uuid.uuid4().hex,
            "created_ns": time.time_ns()}


def read_header(pool_dir: str) -> dict:
    path = os.path.join(pool_dir, HEADER)
    with open(path, "rb") as f:
        rec = codec.read_single_record(f.read(), path)
    codec.check_version(rec, "pool", path)
    try:
        check_chunk_size(rec["chunk_size"])
        if rec["page_entries"] < 1:
            raise ValueError("bad page_entries")
    except (KeyError, TypeError, ValueError) as e:
        raise codec.FormatError(f"{path}: bad pool header ({e})") from None
    return rec


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(pool_dir: str, name: str, data: bytes) -> None:
    """Write ``data`` as POOL/name so that a crash leaves the old or the new file whole."""
    tmp = os.path.join(pool_dir, name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.unlink(tmp)   # a full disk must not keep a half-written copy around
        raise
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(pool_dir, name))
    fsync_dir(pool_dir)
