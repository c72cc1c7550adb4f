"""Partial slots (format 2): a small write into a shared chunk writes only its blocks to a
fresh slot; the others are read from the old slot, its base. Geometry: 64 KiB chunks of
sixteen 4 KiB blocks, 4 entries per page."""

from __future__ import annotations

import os
import random

import pytest

from support import engine_model
from support.engine import PE, check, crash, new_pool, pattern

from vdiskfs.cow import codec, layout
from vdiskfs.cow.fsck import fsck, repair
from vdiskfs.cow.pool import Pool

CS = 64 * 1024
BS = 4096


@pytest.fixture
def path(tmp_path):
    return new_pool(tmp_path, CS, PE)


def shared_pair(pool: Pool, nchunks: int = 4):
    """A VDisk A with data and a clone B sharing all of it; returns (a, b, data)."""
    a = pool.create("A")
    data = pattern(nchunks * CS, 1)
    pool.write(a, 0, data)
    job = pool.clones.start("A", "B")
    pool.clones.step(job, 64)
    return a, pool.lookup("B"), data


def test_a_small_write_into_a_shared_chunk_writes_only_its_blocks(pool, monkeypatch):
    a, b, data = shared_pair(pool)
    written = []
    writev = pool.store.writev_at
    monkeypatch.setattr(pool.store, "writev_at",
                        lambda pos, v: (written.append(sum(len(x) for x in v)),
                                        writev(pos, v)))
    reads = []                                           # whole-chunk reads
    read = pool.store.read_at
    monkeypatch.setattr(pool.store, "read_at",
                        lambda pos, n: (reads.append(pos) if n >= CS else None,
                                        read(pos, n))[1])
    new = pattern(100, 2)
    pool.write(a, CS + 5000, new)                    # inside block 1 of chunk 1
    assert written == [BS] and reads == []           # one block; no whole-chunk read
    slot = pool.meta.slot_of(a, 1)
    base, mask = pool.meta.partial[slot]
    assert base == pool.meta.slot_of(b, 1) and mask == 0b10
    want = bytearray(data)
    want[CS + 5000:CS + 5100] = new
    assert bytes(pool.read(a, 0, 4 * CS)) == want
    assert bytes(pool.read(b, 0, 4 * CS)) == data   # the clone is untouched
    for off, n in [(CS, BS), (CS + 4000, 200), (CS + 5000, 100), (CS - 10, CS + 20),
                   (CS + 8191, 2)]:
        assert bytes(pool.read(a, off, n)) == want[off:off + n], (off, n)
    check(pool)


def test_writes_fill_a_partial_slot_until_it_is_whole(pool):
    a, b, data = shared_pair(pool)
    want = bytearray(data)
    rnd = random.Random(3)
    blocks = list(range(16))
    rnd.shuffle(blocks)
    base = None
    for k, blk in enumerate(blocks):
        piece = pattern(BS - 1, 10 + k)
        off = 2 * CS + blk * BS + (k % 2)            # unaligned: edge blocks merged
        pool.write(a, off, piece)
        want[off:off + len(piece)] = piece
        slot = pool.meta.slot_of(a, 2)
        if base is None:
            base = pool.meta.partial[slot][0]
        assert bytes(pool.read(a, 2 * CS, CS)) == want[2 * CS:3 * CS]
        check(pool)
    # Unaligned writes of BS-1 bytes leave some blocks only partly written: fill the rest.
    pool.write(a, 2 * CS, bytes(want[2 * CS:3 * CS]))
    slot = pool.meta.slot_of(a, 2)
    assert slot not in pool.meta.partial
    assert pool.meta.slot_ref[base] == 1                # only B's map holds it now
    assert bytes(pool.read(a, 0, 4 * CS)) == want
    assert bytes(pool.read(b, 0, 4 * CS)) == data
    check(pool)


def test_partial_slots_survive_replay_and_checkpoint(path):
    pool = Pool(path)
    a, b, data = shared_pair(pool)
    pool.write(a, 3 * CS + 100, b"x" * 10)
    want = bytearray(data)
    want[3 * CS + 100:3 * CS + 110] = b"x" * 10
    pool.sync()
    crash(pool)
    pool = Pool(path)                                 # from the journal
    assert len(pool.meta.partial) == 1
    assert bytes(pool.read(pool.lookup("A"), 0, 4 * CS)) == want
    pool.close()                                      # checkpoint
    pool = Pool(path)
    assert len(pool.meta.partial) == 1
    assert bytes(pool.read(pool.lookup("A"), 0, 4 * CS)) == want
    assert bytes(pool.read(pool.lookup("B"), 0, 4 * CS)) == data
    pool.close()
    assert fsck(path).clean


def test_freeing_a_partial_slot_releases_its_base(pool):
    a, b, data = shared_pair(pool)
    pool.write(a, 10, b"y")
    slot = pool.meta.slot_of(a, 0)
    base = pool.meta.partial[slot][0]
    assert pool.meta.slot_ref[base] == 2              # B's map and the partial
    pool.unlink(b)
    assert pool.meta.slot_ref[base] == 1              # the partial's
    pool.truncate(a, 0)
    assert slot not in pool.meta.partial and pool.meta.slot_ref[base] == 0
    check(pool)


def test_writing_a_shared_partial_chunk_copies_it_whole(pool):
    a, b, data = shared_pair(pool)
    pool.write(a, 10, b"y")                           # A: partial over B's slot
    job = pool.clones.start("A", "C")                 # C shares A's partial slot
    pool.clones.step(job, 64)
    c = pool.lookup("C")
    pool.write(a, 20, b"z")                           # shared partial: a whole new chunk
    assert pool.meta.slot_of(a, 0) not in pool.meta.partial
    want_c = bytearray(data)
    want_c[10:11] = b"y"
    want_a = bytearray(want_c)
    want_a[20:21] = b"z"
    assert bytes(pool.read(a, 0, 4 * CS)) == want_a
    assert bytes(pool.read(c, 0, 4 * CS)) == want_c
    assert bytes(pool.read(b, 0, 4 * CS)) == data
    check(pool)


def test_zeros_into_a_shared_chunk_still_free_it_when_it_becomes_zero(pool):
    a = pool.create("A")
    pool.write(a, 0, b"q" * 100)
    job = pool.clones.start("A", "B")
    pool.clones.step(job, 64)
    pool.write(a, 0, bytes(100))                      # the chunk is now all zero
    assert pool.meta.slot_of(a, 0) == 0
    check(pool)


def test_fsck_checks_and_repair_fixes_partial_slots(path):
    pool = Pool(path)
    a, b, data = shared_pair(pool)
    pool.write(a, CS + 10, b"k" * 10)
    slot = pool.meta.slot_of(a, 1)
    pool.meta.partial[slot][1] = 0                     # an impossible mask
    pool.close()
    r = fsck(path)
    assert any("invalid block mask" in e for e in r.errors), r.errors
    r = repair(path)
    assert any("now read as zeros" in e for e in r.errors), r.errors
    assert fsck(path).clean
    pool = Pool(path)
    got = bytes(pool.read(pool.lookup("A"), CS, CS))
    assert got == bytes(CS)                            # the blocks it lacked: zeros
    assert bytes(pool.read(pool.lookup("B"), 0, 4 * CS)) == data
    pool.close()


def test_a_format_1_pool_opens_and_is_upgraded(path):
    """A version-1 checkpoint (no partial slots) reads as it is; what this code writes is
    version 2, which a version-1 vdiskfs refuses by name."""
    pool = Pool(path)
    a = pool.create("A")
    pool.write(a, 0, pattern(2 * CS, 4))
    pool.close()
    ck = os.path.join(path, layout.CHECKPOINT)
    with open(ck, "rb") as f:
        rec = codec.read_single_record(f.read(), ck)
    rec["v"] = 1
    del rec["partial"]
    with open(ck, "wb") as f:
        f.write(codec.frame_record(rec))
    pool = Pool(path)
    assert bytes(pool.read(pool.lookup("A"), 0, 2 * CS)) == pattern(2 * CS, 4)
    pool.close()
    with open(ck, "rb") as f:
        assert codec.read_single_record(f.read(), ck)["v"] == codec.FORMAT_VERSION


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_randomized_operations_with_partial_slots(path, monkeypatch, seed):
    """The engine's randomized model test (support/engine_model.py) at this geometry:
    writes of 1 byte to 3 chunks make and fill partial slots among clones, crashes,
    truncates and zero writes."""
    monkeypatch.setattr(engine_model, "CS", CS)
    monkeypatch.setattr(engine_model, "SPAN", CS * PE)
    stats = engine_model.run_random(path, seed, 700, inflight=seed == 3)
    assert stats.get("write", 0) >= 50, stats
