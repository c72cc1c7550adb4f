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
            punch the slots freed by those transactions (unless ``defer_punch``)
    finish: the frees become reusable, the unstable entries stable (space.Space)
    abort:  everything goes back for the next try

``run`` touches only the prepared bytes, the data file's fd and the journal file, so it
may run in a worker thread while the engine keeps serving. A ``Checkpoint`` writes the
whole state instead and starts the next journal generation (docs/FORMAT.md).

A punch holds the data file's inode lock for its whole length, and on a filesystem that
discards synchronously (ext4 without a journal, mounted ``-o discard``) that is a device
round trip per run of slots: every write into the data file waits behind it. The daemon
therefore sets ``defer_punch``: a commit makes its frees reusable at once and its
puncher (fs/puncher.py) gives their space back when I/O pauses (space.py).
"""

from __future__ import annotations

import errno
import logging
import os
import time

from . import codec, journal as journal_mod, layout
from .chunkstore import Chunks
from .errors import StoreFailed, VDiskError
from .journal import Journal
from .meta import Metadata, VDisk
from .space import Space

log = logging.getLogger(__name__)

CHECKPOINT_JOURNAL_BYTES = 64 << 20
FAILED = "failed"        # POOL/failed: why the pool stopped writing (for fsck)


class FailStop:
    """Set once a pool file may have lost acknowledged-to-be writes (errors.StoreFailed):
    from then on every write and fsync fails with EIO, reads go on; only a new open
    clears it."""

    def __init__(self, path: str):
        self.path = path
        self.reason: str | None = None

    def fail(self, e: BaseException) -> None:
        if self.reason is not None:
            return
        self.reason = str(e)
        log.error("pool %s stops writing (fail-stop): %s; reads go on, writes and fsyncs "
                  "fail with EIO until it is mounted again", self.path, self.reason)
        try:
            with open(os.path.join(self.path, FAILED), "w") as f:
                f.write(self.reason + "\n")
        except OSError:
            pass   # the disk may be what failed: the log has it

    def check(self) -> None:
        if self.reason is not None:
            raise VDiskError(errno.EIO, f"the pool stopped writing after an I/O error: "
                                        f"{self.reason}")


class Transactions:
    def __init__(self, meta: Metadata, journal: Journal, readonly: bool, failstop: FailStop):
        self.meta = meta
        self.journal = journal
        self.readonly = readonly
        self.failstop = failstop
        self._ops: list | None = None
        self._times: dict[int, int] = {}   # vid -> mtime_ns not journaled yet

    def check_writable(self) -> None:
        if self.readonly:
            raise VDiskError(errno.EROFS, "pool is open read-only")
        self.failstop.check()

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
        """The VDisk's data changed now: op ``vset mtime_ns``, applied at once (through
        ``Metadata.set_mtime``, its handler for that key, without the signature check
        every write would pay for) and journaled at the next commit."""
        ns = time.time_ns()
        self.meta.set_mtime(vd, ns)
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
        self.sync_data = c.store.take_unsynced()

    def run(self) -> None:
        self._append()
        self._release()

    def _release(self) -> None:
        if not self.c.defer_punch:
            self.c.store.release(self.token.slots)

    def _append(self) -> None:
        """Invariant 1: the data (and its sums) durable, then the batch."""
        c = self.c
        if self.sync_data:
            c.store.sync(data=c.sync_data)
        if self.data:
            c.journal.write_at(self.offset, self.data)

    def finish(self) -> None:
        self.c.journal.end = self.offset + len(self.data)
        self._finish_space()

    def _finish_space(self) -> None:
        self.c.space.finish(self.token, unpunched=self.c.defer_punch)

    def abort(self) -> None:
        """The run failed: keep everything for the next try."""
        c = self.c
        c.store.unsynced |= self.sync_data
        c.journal.put_back(self.data, self.ntxns)
        c.space.abort(self.token)


class Checkpoint(Commit):
    """A commit, then the whole state as a new checkpoint with a fresh journal generation.
    The commit part goes to the journal first, so that the previous generation (kept as
    a fallback, docs/FORMAT.md) replays to the same state as the new checkpoint."""

    def __init__(self, c: "Commits"):
        super().__init__(c)
        self.gen = c.journal.gen + 1
        # A snapshot (to_record copies what can change), framed in ``run``: off the loop.
        self.rec = c.meta.to_record(self.gen, c.uuid)
        self.size = 0
        self.committed = False

    def run(self) -> None:
        c = self.c
        self._append()
        self.committed = True
        pieces = codec.frame_record_pieces(self.rec)
        self.size = sum(len(p) for p in pieces)
        layout.new_generation(c.path, pieces, journal_mod.header_frame(self.gen, c.uuid))
        c.journal.reopen(self.gen)
        self._release()

    def finish(self) -> None:
        self._finish_space()

    def abort(self) -> None:
        if not self.committed:
            super().abort()
            return
        # The journal has the batch; only the checkpoint failed (e.g. no room for it).
        super().finish()


class Commits:
    """Makes the pool's changes durable: prepares commits and checkpoints, runs them."""

    def __init__(self, path: str, meta: Metadata, space: Space, store: Chunks,
                 journal: Journal, txn: Transactions, uuid: str, sync_data: bool = True):
        self.path = path
        self.uuid = uuid
        self.meta = meta
        self.space = space
        self.store = store
        self.journal = journal
        self.txn = txn
        # False only for the test that proves the power-loss test fails: the data file is
        # never fdatasync'd (its sums still are).
        self.sync_data = sync_data
        self.defer_punch = False   # True: frees are punched by the caller's puncher

    def prepare(self, checkpoint: bool = False) -> Commit:
        self.txn.failstop.check()
        return Checkpoint(self) if checkpoint else Commit(self)

    def aborted(self, batch: Commit, e: BaseException) -> None:
        """After ``batch.run`` raised ``e``: undo, and stop the pool if ``e`` may have lost
        data (a retry must not be trusted)."""
        batch.abort()
        if isinstance(e, StoreFailed):
            self.txn.failstop.fail(e)

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
        except BaseException as e:
            self.aborted(batch, e)
            raise
        batch.finish()
