"""Pool directory layout and the records stored in it (format version 2; see
codec.FORMAT_VERSION for what changed).

A pool is a directory::

    POOL/vdiskfs-pool    pool header: one frame, record kind "pool"
                         {kind, v, chunk_size, page_entries, uuid, created_ns}
                         written once at creation, never changed
    POOL/lock            flock()ed by the daemon (or fsck) that has the pool open;
                         holds that process's pid for error messages
    POOL/data            chunk slots: slot s is bytes [s*chunk_size, (s+1)*chunk_size);
                         slot 0 is never used (a map entry 0 means "hole, reads zeros")
    POOL/checkpoint      one frame, record kind "checkpoint": the whole metadata state
                         (see meta.Metadata.to_record) at journal generation ``gen``;
                         from version 2 with "partial": [[slot, base, mask], ...]
    POOL/journal         a frame of kind "journal" {gen} then one frame per transaction
                         {kind: "txn", v, ops: [op, ...]} (ops: see meta.Metadata.apply)
    POOL/daemon.log      the mount daemon's log

Mount = read header, load checkpoint (generation G), replay journal frames in order if the
journal's header says generation G, stopping at the first torn frame (the torn tail is cut
off). A journal of another generation is left over from before the checkpoint that
superseded it and is ignored.

A checkpoint is written to ``checkpoint.tmp``, fsynced, renamed over ``checkpoint``, then a
fresh journal of generation G+1 replaces the old one the same way; the directory is fsynced
after each rename. A crash at any point leaves either (old checkpoint, old journal) or
(new checkpoint, any journal: ignored unless generation G+1).
"""

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
