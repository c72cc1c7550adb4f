"""The engine's I/O batching and commit economy (vdiskfs.cow.pool, chunkstore): a request
is one pwritev per run of consecutive slots and one fallocate per run of fresh slots; a
failed reservation or write maps nothing and gives its slots back; a commit skips the
data fdatasync only when nothing was written since the last one."""

from __future__ import annotations

import errno
import os

import pytest

from support.engine import CS, PE, check, new_pool, pattern, read_all

from vdiskfs.cow import chunkstore


@pytest.fixture
def path(tmp_path):
    """The engine tests' geometry (support.engine); conftest's ``pool`` opens it."""
    return new_pool(tmp_path, CS, PE)


class Calls:
    """Counts calls of a function it wraps; ``fail`` makes the next calls raise."""

    def __init__(self, fn):
        self.fn, self.n, self.fail = fn, 0, None

    def __call__(self, *args, **kw):
        self.n += 1
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        return self.fn(*args, **kw)


@pytest.mark.local_chunks
def test_a_request_over_fresh_slots_is_one_fallocate_and_one_pwritev(pool, monkeypatch):
    vd = pool.create("A")
    fal = Calls(chunkstore.fallocate)
    pwv = Calls(os.pwritev)
    monkeypatch.setattr(chunkstore, "fallocate", fal)
    monkeypatch.setattr(chunkstore.os, "pwritev", pwv)
    data = pattern(8 * CS, 1)
    pool.write(vd, 0, data)
    assert (fal.n, pwv.n) == (1, 1)
    # In place over the same (exclusive, stable once committed) slots: no fallocate.
    pool.sync()
    fal.n = pwv.n = 0
    pool.write(vd, 0, data[::-1])
    assert (fal.n, pwv.n) == (0, 1)
    assert read_all(pool, vd)[:8 * CS] == data[::-1]
    check(pool)


@pytest.mark.local_chunks
def test_runs_break_where_slots_are_not_consecutive(pool, monkeypatch):
    a, b = pool.create("A"), pool.create("B")
    for i in range(4):                       # interleave: A gets slots 0, 2, 4, 6
        pool.write(a, i * CS, pattern(CS, i))
        pool.write(b, i * CS, pattern(CS, 10 + i))
    pool.sync()
    pwv = Calls(os.pwritev)
    monkeypatch.setattr(chunkstore.os, "pwritev", pwv)
    pool.write(a, 0, pattern(4 * CS, 99))
    assert pwv.n == 4
    assert read_all(pool, a)[:4 * CS] == pattern(4 * CS, 99)
    assert read_all(pool, b)[:4 * CS] == b"".join(pattern(CS, 10 + i) for i in range(4))
    check(pool)


@pytest.mark.local_chunks
@pytest.mark.parametrize("step", ["fallocate", "pwritev"])
def test_enospc_maps_nothing_and_gives_the_slots_back(pool, monkeypatch, step):
    vd = pool.create("A")
    pool.write(vd, 0, pattern(2 * CS, 1))
    pool.sync()
    before = dict(pool.meta.vdisks[vd.vid].props)
    nalloc, next_slot = vd.nalloc, pool.space.next_slot
    target = Calls(chunkstore.fallocate if step == "fallocate" else os.pwritev)
    target.fail = errno.ENOSPC
    if step == "fallocate":
        monkeypatch.setattr(chunkstore, "fallocate", target)
    else:
        monkeypatch.setattr(chunkstore.os, "pwritev", target)
    with pytest.raises(OSError) as e:
        pool.write(vd, 4 * CS, pattern(3 * CS, 2))       # three fresh slots
    assert e.value.errno == errno.ENOSPC
    assert vd.nalloc == nalloc                            # nothing mapped
    assert read_all(pool, vd)[4 * CS:7 * CS] == bytes(3 * CS)
    check(pool)                                           # the slots are free again
    monkeypatch.undo()
    pool.write(vd, 4 * CS, pattern(3 * CS, 3))
    assert pool.space.next_slot == next_slot + 3               # the retry reused the same three
    assert read_all(pool, vd)[4 * CS:7 * CS] == pattern(3 * CS, 3)
    assert pool.meta.vdisks[vd.vid].props["serial"] == before["serial"]
    check(pool)


def test_commit_syncs_data_only_after_writes(pool, monkeypatch):
    syncs = Calls(pool.store.sync)            # the data file's fdatasync only
    monkeypatch.setattr(pool.store, "sync", syncs)
    vd = pool.create("A")
    pool.write(vd, 0, pattern(CS, 1))
    pool.sync()
    assert syncs.n == 1
    pool.rename(vd, "B")                      # metadata only: no data sync
    pool.sync()
    clone = pool.clones.start("B", "C")
    pool.clones.step(clone, 64)
    pool.sync()
    assert syncs.n == 1
    pool.write(vd, CS, pattern(CS, 2))       # data again
    pool.sync()
    assert syncs.n == 2


def test_a_failed_commit_syncs_the_data_at_the_next(pool, monkeypatch):
    syncs = Calls(pool.store.sync)            # the data file's fdatasync only
    monkeypatch.setattr(pool.store, "sync", syncs)
    vd = pool.create("A")
    pool.write(vd, 0, pattern(CS, 1))
    write_at = pool.journal.write_at

    def broken(*args):
        raise OSError(errno.EIO, "journal write failed")

    monkeypatch.setattr(pool.journal, "write_at", broken)
    with pytest.raises(OSError):
        pool.sync()
    assert syncs.n == 1
    monkeypatch.setattr(pool.journal, "write_at", write_at)
    pool.sync()                               # its data sync is not skipped
    assert syncs.n == 2


def test_reads_within_and_across_chunks(pool):
    vd = pool.create("A")
    pool.write(vd, CS, pattern(2 * CS, 1))   # chunks 1, 2; chunk 0 and 3 are holes
    pool.truncate(vd, 5 * CS)
    whole = bytes(CS) + pattern(2 * CS, 1) + bytes(2 * CS)
    for off, n in [(0, 10), (CS + 5, 100), (CS, 2 * CS), (CS - 3, 2 * CS + 6), (0, 5 * CS),
                   (3 * CS, CS), (5 * CS - 1, 10), (5 * CS, 1)]:
        assert bytes(pool.read(vd, off, n)) == whole[off:off + n], (off, n)
