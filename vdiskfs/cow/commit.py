"""Transactions, commits and checkpoints: how metadata changes become durable.

``Transactions`` is the live op log: ``with txn:`` groups the ops applied through
``txn.apply`` into one journal record, so memory and journal always agree (whatever was
applied is journaled even if the block fails). VDisk mtimes change on every write: they
are applied as ops at once (``touch``) but journaled once per commit, with the latest
value.

A ``Commit`` (group commit) is prepared on the engine's thread, run (the blocking part)
anywhere, then finished or aborted on the engine's thread:

    run:    fdatasync(data)        invariant 1: data before the records pointing at it
            append the batch + its commit frame to the journal, fdatasync(journal)
            punch the slots freed by those transactions
    finish: the frees become reusable, the unstable entries stable (space.Space)
    abort:  everything goes back for the next try

``run`` touches only the prepared bytes, the data file's fd and the journal file, so it
may run in a worker thread while the engine keeps serving. A ``Checkpoint`` writes the
whole state instead and starts the next journal generation (docs/FORMAT.md).
"""

from __future__ import annotations

import errno
import time

from . import codec, layout
from .chunkstore import ChunkStore
from .errors import VDiskError
from .journal import Journal
from .meta import Metadata, VDisk
from .space import Space

CHECKPOINT_JOURNAL_BYTES = 64 << 20


class Transactions:
    def __init__(self, meta: Metadata, journal: Journal, readonly: bool):
        self.meta = meta
        self.journal = journal
        self.readonly = readonly
        self._ops: list | None = None
        self._times: dict[int, int] = {}   # vid -> mtime_ns not journaled yet

    def check_writable(self) -> None:
        if self.readonly:
            raise VDiskError(errno.EROFS, "pool is open read-only")

    def __enter__(self) -> "Transactions":
        assert self._ops is None, "nested transaction"
        self._ops = []
        return self

    def __exit__(self, *exc) -> None:
        ops, self._ops = self._ops, None
        if ops:
            self.journal.add(ops)

    def apply(self, op: list) -> None:
        """Apply one op inside ``with txn:``."""
        self.meta.apply(op)
        self._ops.append(op)

    def apply_all(self, ops: list[list]) -> None:
        for op in ops:
            self.apply(op)

    def touch(self, vd: VDisk) -> None:
        """The VDisk's data changed now."""
        ns = time.time_ns()
        self.meta.apply(["vset", vd.vid, "mtime_ns", ns])
        self._times[vd.vid] = ns

    def journal_times(self) -> None:
        """Journal the latest mtime of each VDisk touched since the last commit."""
        times, self._times = self._times, {}
        ops = [["vset", vid, "mtime_ns", ns] for vid, ns in times.items()
               if vid in self.meta.vdisks]
        if ops:
            self.journal.add(ops)


class Commit:
    """One group commit: data sync, then the journal records, then release freed slots."""

    def __init__(self, c: "Commits"):
        self.c = c
        c.txn.journal_times()
        self.data, self.ntxns = c.journal.take()
        self.offset = c.journal.end
        self.token = c.space.begin_commit()
        # No data written since the last data sync (a clone, a rename): skip the fdatasync,
        # a disk cache flush on its own.
        self.sync_data = c.store.take_unsynced() and c.sync_data

    def run(self) -> None:
        c = self.c
        if self.sync_data:
            c.store.sync()
        if self.data:
            c.journal.write_at(self.offset, self.data)
        c.store.release(self.token.slots)

    def finish(self) -> None:
        self.c.journal.end = self.offset + len(self.data)
        self.c.space.finish(self.token)

    def abort(self) -> None:
        """The run failed: keep everything for the next try."""
        c = self.c
        c.store.unsynced |= self.sync_data
        c.journal.put_back(self.data, self.ntxns)
        c.space.abort(self.token)


class Checkpoint(Commit):
    """A commit that writes the whole state and starts a fresh journal generation."""

    def __init__(self, c: "Commits"):
        super().__init__(c)
        self.gen = c.journal.gen + 1
        self.record = codec.frame_record(c.meta.to_record(self.gen))

    def run(self) -> None:
        c = self.c
        if self.sync_data:
            c.store.sync()
        layout.write_file_atomic(c.path, layout.CHECKPOINT, self.record)
        c.journal.replace(self.gen)
        c.store.release(self.token.slots)

    def finish(self) -> None:
        self.offset = self.c.journal.end
        self.data = b""
        super().finish()


class Commits:
    """Makes the pool's changes durable: prepares commits and checkpoints, runs them."""

    def __init__(self, path: str, meta: Metadata, space: Space, store: ChunkStore,
                 journal: Journal, txn: Transactions, sync_data: bool = True):
        self.path = path
        self.meta = meta
        self.space = space
        self.store = store
        self.journal = journal
        self.txn = txn
        self.sync_data = sync_data  # False only for the test that proves the fsync test fails

    def prepare(self, checkpoint: bool = False) -> Commit:
        return Checkpoint(self) if checkpoint else Commit(self)

    def wants_checkpoint(self) -> bool:
        return self.journal.size() > CHECKPOINT_JOURNAL_BYTES

    def is_dirty(self) -> bool:
        # Not the mtimes alone: they ride along with the next commit.
        return bool(self.journal.buffer or self.space.freed_slots)

    def run(self, checkpoint: bool = False) -> None:
        """Blocking commit (for callers without an event loop)."""
        batch = self.prepare(checkpoint)
        try:
            batch.run()
        except BaseException:
            batch.abort()
            raise
        batch.finish()
