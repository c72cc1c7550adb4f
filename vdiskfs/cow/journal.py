"""The metadata journal: framed transaction records appended after the checkpoint.

Transactions are framed into an in-memory buffer as they happen and reach the file only in
a commit, after the chunk data they point at has been synced (invariant 1). A commit that
fails is undone in the file (truncated back) and its records are kept for the next try, so
a failed fsync never leaves a torn frame in front of later ones.
"""

from __future__ import annotations

import os
from typing import Iterator

from . import codec, layout
from .codec import FormatError


def header_frame(gen: int) -> bytes:
    return codec.frame_record({"kind": "journal", "v": codec.FORMAT_VERSION, "gen": gen})


def txn_frame(ops: list) -> bytes:
    return codec.frame_record({"kind": "txn", "v": codec.FORMAT_VERSION, "ops": ops})


def create(pool_dir: str, gen: int) -> None:
    layout.write_file_atomic(pool_dir, layout.JOURNAL, header_frame(gen))


class Journal:
    def __init__(self, pool_dir: str, *, readonly: bool = False):
        self.pool_dir = pool_dir
        self.path = os.path.join(pool_dir, layout.JOURNAL)
        self.readonly = readonly
        self.fd = -1
        self.gen = -1
        self.end = 0            # bytes of intact frames in the file
        self.buffer = bytearray()  # framed transactions not yet in the file
        self.torn_bytes = 0     # length of a torn tail found at open

    def open_and_read(self, expect_gen: int) -> Iterator[list]:
        """Yield the ops of each intact transaction of generation ``expect_gen``.

        Afterwards ``self.gen`` is the file's generation (a stale journal is not replayed)
        and ``self.end`` where the next frame goes."""
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
        try:
            head = codec.unpackb(payload)
        except Exception as e:
            raise FormatError(f"{self.path}: undecodable journal header ({e})") from None
        if not isinstance(head, dict):
            raise FormatError(f"{self.path}: journal header is not a map")
        codec.check_version(head, "journal", self.path)
        self.gen = head.get("gen")
        if self.gen != expect_gen:
            return
        for n, (payload, end) in enumerate(frames):
            try:
                rec = codec.unpackb(payload)
                if not isinstance(rec, dict):
                    raise ValueError("not a map")
            except Exception as e:
                raise FormatError(f"{self.path}: transaction {n} is undecodable ({e}) "
                                  "although its checksum matches") from None
            codec.check_version(rec, "txn", self.path)
            ops = rec.get("ops")
            if not isinstance(ops, list) or not all(isinstance(op, list) for op in ops):
                raise FormatError(f"{self.path}: transaction {n} has no list of operations")
            yield ops
            self.end = end
        self.torn_bytes = size - self.end

    def cut_torn_tail(self) -> None:
        if self.torn_bytes and not self.readonly:
            os.ftruncate(self.fd, self.end)
            os.fsync(self.fd)

    def add(self, ops: list) -> None:
        self.buffer += txn_frame(ops)

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer = bytearray()
        return data

    def put_back(self, data: bytes) -> None:
        self.buffer[:0] = data

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

    def replace(self, gen: int) -> None:
        """Blocking: start a new, empty journal of generation ``gen`` (after a checkpoint)."""
        create(self.pool_dir, gen)
        fd = os.open(self.path, os.O_RDWR)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd
        self.gen = gen
        self.end = os.fstat(fd).st_size

    def size(self) -> int:
        return self.end + len(self.buffer)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
