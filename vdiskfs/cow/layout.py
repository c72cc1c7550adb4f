"""The pool directory: its file names, the pool header record, atomic file replacement
and the chunk-size rule. What each file holds is documented in docs/FORMAT.md."""

from __future__ import annotations

import os
import time
import uuid

from . import codec
from .chunkstore import write_all
from .errors import fatal

HEADER = "vdiskfs-pool"
HEADER_COPY = "vdiskfs-pool.copy"     # the same record: one damaged header loses nothing
HEADERS = (HEADER, HEADER_COPY)
LOCK = "lock"
DATA = "data"
SUMS = "sums"
CHECKPOINT = "checkpoint"
CHECKPOINT_PREV = "checkpoint.prev"   # the generation before, kept until the next is durable
JOURNAL = "journal"
JOURNAL_PREV = "journal.prev"
MIRROR = ".mirror"                    # every journal has a copy (cow/journal.py)
LOG = "daemon.log"

DEFAULT_CHUNK_SIZE = 256 * 1024   # chosen by bench/chunksize.py: see docs/ARCHITECTURE.md
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_PAGE_ENTRIES = 1024


def check_chunk_size(cs: int) -> None:
    if cs < MIN_CHUNK_SIZE or cs > MAX_CHUNK_SIZE or cs & (cs - 1):
        raise ValueError(f"chunk size must be a power of two between {MIN_CHUNK_SIZE} and "
                         f"{MAX_CHUNK_SIZE} bytes, not {cs}")


def header_record(chunk_size: int, page_entries: int = DEFAULT_PAGE_ENTRIES,
                  store: dict | None = None) -> dict:
    """A new pool's header; ``store``: where its chunks live if not in the directory."""
    check_chunk_size(chunk_size)
    rec = {"kind": "pool", "v": codec.FORMAT_VERSION, "chunk_size": chunk_size,
           "page_entries": page_entries, "uuid": uuid.uuid4().hex,
           "created_ns": time.time_ns()}
    if store is not None:
        rec["store"] = dict(store)
    return rec


def is_pool(pool_dir: str) -> bool:
    return any(os.path.exists(os.path.join(pool_dir, name)) for name in HEADERS)


def read_header_file(pool_dir: str, name: str) -> dict:
    path = os.path.join(pool_dir, name)
    with open(path, "rb") as f:
        rec = codec.read_single_record(f.read(), path)
    codec.check_version(rec, "pool", path)
    try:
        check_chunk_size(rec["chunk_size"])
        if type(rec["page_entries"]) is not int or rec["page_entries"] < 1:
            raise ValueError("bad page_entries")
        if not isinstance(rec["uuid"], str) or len(rec["uuid"]) != 32:
            raise ValueError("bad uuid")
        if "store" in rec:          # the chunks live elsewhere (cow/chunkstore.py)
            from ..rados.cluster import check_record
            check_record(rec["store"])
    except (KeyError, TypeError, ValueError) as e:
        raise codec.FormatError(f"{path}: bad pool header ({e})") from None
    return rec


def read_headers(pool_dir: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """The readable header copies as (file name, record), and why the others are not."""
    good, bad = [], []
    for name in HEADERS:
        try:
            good.append((name, read_header_file(pool_dir, name)))
        except FileNotFoundError:
            bad.append(f"{os.path.join(pool_dir, name)} is missing")
        except codec.NewerFormat:
            raise
        except (OSError, codec.FormatError) as e:
            bad.append(str(e))
    return good, bad


def read_header(pool_dir: str) -> dict:
    """The pool header from either copy (the first readable one)."""
    good, bad = read_headers(pool_dir)
    if not good:
        raise codec.FormatError("no readable pool header: " + "; ".join(bad))
    return good[0][1]


def write_headers(pool_dir: str, rec: dict, names: tuple[str, ...] = HEADERS) -> None:
    for name in names:
        write_file_atomic(pool_dir, name, codec.frame_record(rec))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tmp(pool_dir: str, name: str, data: bytes | list) -> str:
    """Write and fsync POOL/name.tmp (``data``: bytes, or buffers written back to back);
    returns its path."""
    tmp = os.path.join(pool_dir, name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, [memoryview(p) for p in ([data] if isinstance(data, bytes) else data)])
        try:
            os.fsync(fd)
        except OSError as e:
            raise fatal(e, f"fsync of {tmp}", sync=True) from None
    except BaseException:
        os.unlink(tmp)   # a full disk must not keep a half-written copy around
        raise
    finally:
        os.close(fd)
    return tmp


def write_file_atomic(pool_dir: str, name: str, data: bytes) -> None:
    """Write ``data`` as POOL/name so that a crash leaves the old or the new file whole."""
    os.rename(write_tmp(pool_dir, name, data), os.path.join(pool_dir, name))
    fsync_dir(pool_dir)


def new_generation(pool_dir: str, checkpoint: bytes | list, journal: bytes) -> None:
    """Install a new checkpoint and its empty journal; the current pair becomes the
    previous generation. At every instant a crash leaves either the current checkpoint
    with its journal, or no current checkpoint and the previous generation (whose replay
    gives the same state) with, perhaps, the new empty journal (docs/FORMAT.md)."""
    tmps = []
    try:
        for name, data in ((CHECKPOINT, checkpoint), (JOURNAL + MIRROR, journal),
                           (JOURNAL, journal)):
            tmps.append((write_tmp(pool_dir, name, data), name))
    except BaseException:
        for tmp, _ in tmps:
            os.unlink(tmp)
        raise
    try:
        keep_previous_generation(pool_dir)
        for tmp, name in tmps[1:] + tmps[:1]:      # the journal first, the checkpoint last
            os.rename(tmp, os.path.join(pool_dir, name))
        fsync_dir(pool_dir)
    except OSError as e:
        raise fatal(e, "installing a new checkpoint", sync=True) from None


def keep_previous_generation(pool_dir: str) -> None:
    """Before a new checkpoint replaces the current one: the current checkpoint and its
    journal become the previous generation (replacing the one before)."""
    for cur, prev in ((JOURNAL, JOURNAL_PREV), (JOURNAL + MIRROR, JOURNAL_PREV + MIRROR),
                      (CHECKPOINT, CHECKPOINT_PREV)):
        try:
            os.rename(os.path.join(pool_dir, cur), os.path.join(pool_dir, prev))
        except FileNotFoundError:
            pass
    fsync_dir(pool_dir)
