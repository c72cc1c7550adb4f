"""The metadata journal: framed transaction records appended after the checkpoint
(file format: docs/FORMAT.md).

Transactions are framed into an in-memory buffer as they happen and reach the file only in
a commit, after the chunk data they point at has been synced (invariant 1). A commit
appends one *batch*: its transaction frames, then a commit frame {kind: "commit", txns: n},
in one write followed by fdatasync. Replay applies a batch only when its commit frame is
there, so a batch cut by a crash (never acknowledged) is dropped whole.

Damage: replay stops at the first bad frame. If the file holds no commit frame after it,
or only the one closing the damaged batch, the damage is a torn final append and the
journal is cut back to the last complete batch. If a later batch follows, an acknowledged
batch was damaged: the pool is refused (``vdiskfs fsck --repair`` can cut it there).
A commit that fails is undone in the file (truncated back) and its records are kept for
the next try, so a failed fsync never leaves a torn frame in front of later ones.
"""

from __future__ import annotations

import os
from typing import Iterator

from . import codec, layout
from .chunkstore import FALLOC_FL_KEEP_SIZE, fallocate
from .codec import FormatError

# Space kept allocated past the journal's end, so that on a full backing filesystem a
# commit (e.g. the delete that would free space) can still be written.
RESERVE = 1 << 20


def header_frame(gen: int) -> bytes:
    return codec.frame_record({"kind": "journal", "v": codec.FORMAT_VERSION, "gen": gen})


def txn_frame(ops: list) -> bytes:
    return codec.frame_record({"kind": "txn", "v": codec.FORMAT_VERSION, "ops": ops})


def commit_frame(ntxns: int) -> bytes:
    return codec.frame_record({"kind": "commit", "v": codec.FORMAT_VERSION, "txns": ntxns})


def create(pool_dir: str, gen: int) -> None:
    layout.write_file_atomic(pool_dir, layout.JOURNAL, header_frame(gen))


class Journal:
    def __init__(self, pool_dir: str, *, readonly: bool = False):
        self.pool_dir = pool_dir
        self.path = os.path.join(pool_dir, layout.JOURNAL)
        self.readonly = readonly
        self.fd = -1
        self.gen = -1
        self.end = 0            # end of the last complete batch in the file
        self.buffer = bytearray()  # framed transactions not yet in the file
        self.ntxns = 0          # how many transactions the buffer holds
        self.torn_bytes = 0     # length of a torn tail found at open
        self.damage_at = -1     # offset of the first bad frame, if any

    def open_and_read(self, expect_gen: int, *, salvage: bool = False) -> Iterator[list]:
        """Yield each complete batch (a list of transactions, each a list of ops) of
        generation ``expect_gen``; ``self.end`` moves past a batch once the consumer asks
        for the next one, so it always marks what was fully consumed.

        Afterwards ``self.gen`` is the file's generation (a stale journal is not replayed).
        With ``salvage`` (fsck --repair), damage ends the replay instead of raising."""
        flags = os.O_RDONLY if self.readonly else os.O_RDWR
        self.fd = os.open(self.path, flags)
        data = b""
        size = os.fstat(self.fd).st_size
        if size:
            data = os.pread(self.fd, size, 0)
        frames = codec.iter_frames(data)
        first = next(frames, None)
        if first is None:
            raise FormatError(f"{self.path}: journal header is torn or missing")
        payload, self.end = first
        head = codec.unpack_map(payload, f"{self.path}: journal header")
        codec.check_version(head, "journal", self.path)
        self.gen = head.get("gen")
        if self.gen != expect_gen:
            return
        pending: list[list] = []
        pos = self.end
        while (got := codec.frame_at(data, pos)) is not None:
            payload, end = got
            try:
                rec = self._decode(payload, pos)
            except FormatError:
                if not salvage:
                    raise
                break
            if rec["kind"] == "txn":
                ops = rec.get("ops")
                if not isinstance(ops, list) or not all(isinstance(op, list) for op in ops):
                    if salvage:
                        break
                    raise FormatError(f"{self.path}: record at byte {pos} has no list of "
                                      "operations")
                pending.append(ops)
            else:
                if rec.get("txns") != len(pending):
                    if salvage:
                        break
                    raise FormatError(f"{self.path}: commit at byte {pos} closes "
                                      f"{rec.get('txns')} transactions, found {len(pending)}")
                yield pending
                pending = []
                self.end = end
            pos = end
        if pos < size:
            self.damage_at = pos
            later = [start for payload, start, _ in codec.frames_after(data, pos + 1)
                     if _is_commit(payload)]
            if len(later) > 1 and not salvage:
                raise FormatError(
                    f"{self.path}: damaged record at byte {pos} is followed by committed "
                    f"records (byte {later[-1]}): the journal is corrupt; 'vdiskfs fsck "
                    f"--repair' cuts it at byte {self.end}, losing the records after it")
        self.torn_bytes = size - self.end

    def _decode(self, payload: bytes, pos: int) -> dict:
        rec = codec.unpack_map(payload, f"{self.path}: record at byte {pos} (checksum "
                                        "matches)")
        if rec.get("kind") not in ("txn", "commit"):
            raise FormatError(f"{self.path}: unexpected {rec.get('kind')!r} record at "
                              f"byte {pos}")
        codec.check_version(rec, rec["kind"], self.path)
        return rec

    def cut_torn_tail(self) -> None:
        """Drop the bytes after the last complete batch (a crash's torn append)."""
        if self.torn_bytes and not self.readonly:
            os.ftruncate(self.fd, self.end)
            os.fsync(self.fd)

    def add(self, ops: list) -> None:
        self.buffer += txn_frame(ops)
        self.ntxns += 1

    def take(self) -> tuple[bytes, int]:
        """The buffered transactions as one batch ready to append (with its commit frame),
        and how many transactions it holds."""
        n = self.ntxns
        data = bytes(self.buffer) + commit_frame(n) if n else b""
        self.buffer = bytearray()
        self.ntxns = 0
        return data, n

    def put_back(self, data: bytes, n: int) -> None:
        """Undo ``take`` after a failed commit: the transactions go back in front."""
        if n:
            self.buffer[:0] = data[:len(data) - len(commit_frame(n))]
            self.ntxns += n

    def write_at(self, offset: int, data: bytes) -> None:
        """Blocking: append ``data`` at ``offset`` and make it durable."""
        try:
            view = memoryview(data)
            pos = offset
            while view:
                n = os.pwrite(self.fd, view, pos)
                pos += n
                view = view[n:]
            os.fdatasync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, offset)
            except OSError:
                pass
            raise
        self.reserve(offset + len(data))

    def reserve(self, end: int) -> None:
        try:
            fallocate(self.fd, FALLOC_FL_KEEP_SIZE, end, RESERVE)
        except OSError:
            pass   # full or unsupported: the reservation left from before still helps

    def replace(self, gen: int) -> None:
        """Blocking: start a new, empty journal of generation ``gen`` (after a checkpoint)."""
        create(self.pool_dir, gen)
        fd = os.open(self.path, os.O_RDWR)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd
        self.gen = gen
        self.end = os.fstat(fd).st_size
        self.reserve(self.end)

    def size(self) -> int:
        return self.end + len(self.buffer)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _is_commit(payload: bytes) -> bool:
    try:
        rec = codec.unpackb(payload)
    except FormatError:
        return False
    return isinstance(rec, dict) and rec.get("kind") == "commit"
