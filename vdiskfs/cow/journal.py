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

Mirror: every batch goes to two files at the same offsets, ``journal`` and
``journal.mirror``, both fdatasync'd before the commit counts. Reading takes each frame
from whichever copy has it intact, so one damaged, truncated or deleted copy loses
nothing (a crash's torn append is torn in both); a writable open rewrites a bad copy from
the good one.
"""

from __future__ import annotations

import os
from typing import Iterator

from . import codec, layout
from .chunkstore import FALLOC_FL_KEEP_SIZE, fallocate
from .codec import FormatError
from .errors import fatal

# Space kept allocated past the journal's end, so that on a full backing filesystem a
# commit (e.g. the delete that would free space) can still be written.
RESERVE = 1 << 20


def header_frame(gen: int, uuid: str) -> bytes:
    return codec.frame_record({"kind": "journal", "v": codec.FORMAT_VERSION, "gen": gen,
                               "uuid": uuid})


def txn_frame(ops: list) -> bytes:
    return codec.frame_record({"kind": "txn", "v": codec.FORMAT_VERSION, "ops": ops})


def commit_frame(ntxns: int) -> bytes:
    return codec.frame_record({"kind": "commit", "v": codec.FORMAT_VERSION, "txns": ntxns})


MIRROR = layout.MIRROR


def create(pool_dir: str, gen: int, uuid: str) -> None:
    for name in (layout.JOURNAL + MIRROR, layout.JOURNAL):
        layout.write_file_atomic(pool_dir, name, header_frame(gen, uuid))


def merge(a: bytes, b: bytes) -> tuple[bytes, list[tuple[bytes, int, int]]]:
    """One journal from two copies: each frame from whichever has it intact, from the
    first bad one on the longer copy's bytes. Returns (bytes, the intact frames as
    (payload, start, end)): replay walks these, each CRC computed once."""
    out, frames, pos = [], [], 0
    while True:
        src = a
        got = codec.frame_at(a, pos)
        if got is None:
            src, got = b, codec.frame_at(b, pos)
            if got is None:
                break
        out.append(src[pos:got[1]])
        frames.append((got[0], pos, got[1]))
        pos = got[1]
    rest = a if len(a) >= len(b) else b
    return b"".join(out) + rest[pos:], frames


class Journal:
    def __init__(self, pool_dir: str, uuid: str, *, readonly: bool = False,
                 name: str = layout.JOURNAL):
        self.pool_dir = pool_dir
        self.uuid = uuid
        self.path = os.path.join(pool_dir, name)
        self.readonly = readonly
        self.fd = -1
        self.mfd = -1           # the mirror copy
        self.gen = -1
        self._copies: list[tuple[str, bytes | None]] = []   # each copy as read at open
        self._data = b""        # the copies merged, as read at open
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
        paths = (self.path, self.path + MIRROR)
        copies = [self._read_copy(p) for p in paths]
        if all(c is None for c in copies):
            raise FileNotFoundError(self.path)
        gens = [self._gen_of(p, c[1]) if c else None for p, c in zip(paths, copies)]
        # A copy of another generation is left from before a checkpoint: it does not count.
        usable = [c if c is not None and g == expect_gen else None
                  for c, g in zip(copies, gens)]
        for c, u in zip(copies, usable):
            if c is not None and u is None:
                os.close(c[0])
        if all(u is None for u in usable):
            known = [g for g in gens if g is not None]
            if not known:
                raise FormatError(f"{self.path}: journal header is torn or missing")
            self.gen = known[0]
            return
        self.fd, self.mfd = (u[0] if u else -1 for u in usable)
        self._copies = [(p, u[1] if u else None) for p, u in zip(paths, usable)]
        data, frames = merge(*(u[1] if u else b"" for u in usable))
        self._data = data
        size = len(data)
        payload, _, self.end = frames[0]
        head = codec.unpack_map(payload, f"{self.path}: journal header")
        codec.check_version(head, "journal", self.path)
        self.gen = head.get("gen")
        pending: list[list] = []
        pos = self.end
        for payload, _, end in frames[1:]:
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

    def _read_copy(self, path: str) -> tuple[int, bytes] | None:
        """(fd, bytes) of one copy, None if it is missing."""
        try:
            fd = os.open(path, os.O_RDONLY if self.readonly else os.O_RDWR)
        except FileNotFoundError:
            return None
        size = os.fstat(fd).st_size
        return fd, (os.pread(fd, size, 0) if size else b"")

    def _gen_of(self, path: str, data: bytes) -> int | None:
        """The generation a copy's header names (None: unreadable); another pool's
        journal is refused."""
        got = codec.frame_at(data, 0)
        if got is None:
            return None
        try:
            head = codec.unpack_map(got[0], f"{path}: journal header")
        except FormatError:
            return None
        if head.get("uuid", self.uuid) != self.uuid:      # format 3 on
            raise FormatError(f"{path}: belongs to another pool (uuid "
                              f"{head.get('uuid')!r:.40}, this pool is {self.uuid})")
        gen = head.get("gen")
        return gen if type(gen) is int else None

    def salvaged(self) -> None:
        """Replay was stopped at damage (fsck --repair): all after ``end`` goes."""
        self.torn_bytes = len(self._data) - self.end

    def unhealthy(self) -> list[str]:
        """The copies that were missing at open or did not hold what replayed."""
        good = self._data[:self.end]
        return [p for p, data in self._copies if data is None or not data.startswith(good)]

    def heal(self) -> None:
        """Rewrite a bad or missing copy of the current journal from what replayed
        (writable open, after the torn tail is cut)."""
        bad = self.unhealthy()
        if self.readonly or not bad or self.path != self._current():
            return
        for path in bad:
            layout.write_file_atomic(self.pool_dir, os.path.basename(path),
                                     self._data[:self.end])
        self.reopen(self.gen)
        self._copies = []

    def _current(self) -> str:
        return os.path.join(self.pool_dir, layout.JOURNAL)

    def _fds(self) -> list[int]:
        return [fd for fd in (self.fd, self.mfd) if fd >= 0]

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
            for fd in self._fds():
                os.ftruncate(fd, self.end)
                os.fsync(fd)

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
        fds = self._fds()
        try:
            for fd in fds:
                view = memoryview(data)
                pos = offset
                while view:
                    n = os.pwrite(fd, view, pos)
                    pos += n
                    view = view[n:]
        except OSError as e:
            for fd in fds:
                try:
                    os.ftruncate(fd, offset)
                except OSError:
                    pass
            raise fatal(e, f"writing {self.path}") from None
        try:
            for fd in fds:
                os.fdatasync(fd)
        except OSError as e:
            raise fatal(e, f"fdatasync of {self.path}", sync=True) from None
        self.reserve(offset + len(data))

    def reserve(self, end: int) -> None:
        for fd in self._fds():
            try:
                fallocate(fd, FALLOC_FL_KEEP_SIZE, end, RESERVE)
            except OSError:
                pass   # full or unsupported: the reservation left from before still helps

    def replace(self, gen: int) -> None:
        """Blocking: start a new, empty journal of generation ``gen``."""
        create(self.pool_dir, gen, self.uuid)
        self.reopen(gen)

    def reopen(self, gen: int) -> None:
        """Continue in POOL/journal and its mirror, of generation ``gen``."""
        self.path = self._current()
        fd = os.open(self.path, os.O_RDWR)
        mfd = os.open(self.path + MIRROR, os.O_RDWR)
        self.close()
        self.fd, self.mfd = fd, mfd
        self.gen = gen
        self.end = os.fstat(fd).st_size
        self.reserve(self.end)

    def size(self) -> int:
        return self.end + len(self.buffer)

    def close(self) -> None:
        for fd in self._fds():
            os.close(fd)
        self.fd = self.mfd = -1


def _is_commit(payload: bytes) -> bool:
    try:
        rec = codec.unpackb(payload)
    except FormatError:
        return False
    return isinstance(rec, dict) and rec.get("kind") == "commit"
