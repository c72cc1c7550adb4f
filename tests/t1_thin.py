"""Thin provisioning in the engine: fallocate (punch hole, zero range, preallocation),
SEEK_DATA/SEEK_HOLE, and sparse page tables (an empty VDisk costs the same at any size)."""

from __future__ import annotations

import errno
import os
import random
import tracemalloc

import pytest

from support.engine import (CS, PE, SPAN, check, crash, new_pool, pattern, read_all,
                            seek_model, slot)
from vdiskfs.cow import codec, layout
from vdiskfs.cow.errors import VDiskError
from vdiskfs.cow.pool import MAX_VDISK_SIZE, SEEK_DATA, SEEK_HOLE, Pool

PUNCH, ZERO, KEEP = 0x02, 0x10, 0x01


@pytest.fixture
def pool(tmp_path):
    p = Pool(new_pool(tmp_path))
    yield p
    if p._lock_fd >= 0:
        p.close()


def errno_of(call) -> int:
    with pytest.raises(VDiskError) as ei:
        call()
    return ei.value.errno


def mapped(pool, vd) -> list[int]:
    return [c for c in range(pool.meta.chunks_for(vd.size)) if slot(pool, vd, c)]


# ---------------------------------------------------------------------------- punch
def test_punch_unmaps_whole_chunks_and_zeroes_the_edges(pool):
    vd = pool.create("A")
    data = bytearray(pattern(4 * SPAN, 1))
    pool.write(vd, 0, data)
    used = pool.meta.slots_in_use()
    off, n = CS + 100, 5 * CS                     # cuts chunks 1 and 6, holds 2..5
    pool.fallocate(vd, PUNCH | KEEP, off, n)
    data[off:off + n] = bytes(n)
    assert read_all(pool, vd)[:vd.size] == data and vd.size == 4 * SPAN
    assert [c for c in range(2, 6) if slot(pool, vd, c)] == []
    assert slot(pool, vd, 1) and slot(pool, vd, 6)     # edges keep their other bytes
    assert vd.nalloc == 16 - 4
    check(pool)
    pool.sync()
    assert pool.meta.slots_in_use() == used - 4
    assert pool.usage(vd)["allocated"] == 12 * CS


def test_a_punched_edge_that_becomes_all_zeros_is_freed(pool):
    vd = pool.create("A")
    pool.write(vd, 0, b"\1" * 100)
    pool.fallocate(vd, PUNCH | KEEP, 0, 100)
    assert mapped(pool, vd) == [] and vd.size == 100
    assert read_all(pool, vd)[:100] == bytes(100)


def test_punch_to_the_end_frees_the_last_chunk_whatever_lies_past_it(pool):
    vd = pool.create("A")
    pool.write(vd, 0, pattern(3 * CS, 2))
    pool.truncate(vd, 2 * CS + 10)
    pool.fallocate(vd, PUNCH | KEEP, CS, 10 * CS)  # past the end: clipped, size kept
    assert vd.size == 2 * CS + 10 and mapped(pool, vd) == [0]
    check(pool)


def test_punch_of_whole_pages_drops_them_without_copying_a_shared_one(pool):
    a = pool.create("A")
    data = pattern(3 * SPAN, 3)
    pool.write(a, 0, data)
    b = pool.clone(a, "B")
    pages_before = len(pool.meta.pages)
    pool.fallocate(b, PUNCH | KEEP, 0, 2 * SPAN)
    assert len(pool.meta.pages) == pages_before   # no page copied, none freed (A has them)
    assert sorted(b.ptab) == [2] and b.nalloc == PE
    assert read_all(pool, a)[:a.size] == data    # the other VDisk never changes
    assert read_all(pool, b)[:b.size] == bytes(2 * SPAN) + data[2 * SPAN:]
    check(pool)
    pool.fallocate(a, PUNCH | KEEP, 0, 2 * SPAN)  # now the pages go
    assert len(pool.meta.pages) == pages_before - 2
    check(pool)


def test_punch_into_a_shared_chunk_copies_only_this_vdisks_side(pool):
    a = pool.create("A")
    data = pattern(2 * SPAN, 4)
    pool.write(a, 0, data)
    b = pool.clone(a, "B")
    pool.fallocate(b, PUNCH | KEEP, CS // 2, 3 * CS)
    assert read_all(pool, a)[:a.size] == data
    want = bytearray(data)
    want[CS // 2:CS // 2 + 3 * CS] = bytes(3 * CS)
    assert read_all(pool, b)[:b.size] == want
    pool.fallocate(a, PUNCH | KEEP, 0, 2 * SPAN)
    assert read_all(pool, b)[:b.size] == want
    check(pool)


def test_punch_on_a_clone_source_keeps_the_running_clone_point_in_time(pool):
    a = pool.create("A")
    data = pattern(5 * SPAN, 5)
    pool.write(a, 0, data)
    job = pool.clones.start("A", "B")
    pool.clones.step(job, 1)                       # page 0 is the clone's, 1..4 are not yet
    pool.fallocate(a, PUNCH | KEEP, 0, 5 * SPAN)
    pool.fallocate(a, ZERO, SPAN + 7, 2 * CS)
    assert mapped(pool, a) == []
    while job.running:
        pool.clones.step(job, 1)
    b = pool.lookup("B")
    assert read_all(pool, b)[:b.size] == data
    check(pool)


def test_punch_of_holes_on_a_clone_source_costs_no_records(pool):
    a = pool.create("A", 1 << 40)
    pool.write(a, 0, b"x" * CS)
    job = pool.clones.start("A", "B")
    assert job.running
    pool.sync()
    before = pool.journal.end
    pool.fallocate(a, PUNCH | KEEP, SPAN, (1 << 40) - SPAN)   # all holes
    pool.sync()
    assert pool.journal.end - before < 4096
    pool.clones.step(job, 64)
    assert not job.running and pool.read(pool.lookup("B"), 0, CS) == b"x" * CS


def test_zero_range_grows_without_keep_size_and_zeroes_with_it(pool):
    vd = pool.create("A")
    pool.write(vd, 0, pattern(2 * CS, 6))
    pool.fallocate(vd, ZERO | KEEP, CS, 10 * CS)
    assert vd.size == 2 * CS and mapped(pool, vd) == [0]
    pool.fallocate(vd, ZERO, CS, 10 * CS)
    assert vd.size == 11 * CS and mapped(pool, vd) == [0]
    assert read_all(pool, vd)[CS:vd.size] == bytes(10 * CS)
    check(pool)


def test_preallocation_grows_and_reserves_nothing(pool):
    vd = pool.create("A")
    pool.fallocate(vd, 0, 0, 1 << 30)
    assert vd.size == 1 << 30 and vd.nalloc == 0
    pool.fallocate(vd, KEEP, 0, 2 << 30)
    assert vd.size == 1 << 30
    assert errno_of(lambda: pool.fallocate(vd, 0, 0, MAX_VDISK_SIZE)) == errno.ENOSPC
    assert vd.size == 1 << 30


def test_unsupported_modes_and_bad_ranges_are_refused(pool):
    vd = pool.create("A", SPAN)
    for mode in (PUNCH, PUNCH | ZERO, PUNCH | ZERO | KEEP, 0x04, 0x08, 0x20, 0x40):
        assert errno_of(lambda: pool.fallocate(vd, mode, 0, CS)) == errno.EOPNOTSUPP
    assert errno_of(lambda: pool.fallocate(vd, PUNCH | KEEP, -1, CS)) == errno.EINVAL
    assert errno_of(lambda: pool.fallocate(vd, PUNCH | KEEP, 0, 0)) == errno.EINVAL
    assert errno_of(lambda: pool.fallocate(vd, ZERO, MAX_VDISK_SIZE, 1)) == errno.EFBIG


def test_a_punch_is_durable_once_synced_and_gone_after_a_crash_before(tmp_path):
    path = new_pool(tmp_path)
    p = Pool(path)
    vd = p.create("A")
    data = pattern(2 * SPAN, 7)
    p.write(vd, 0, data)
    p.sync()
    p.fallocate(vd, PUNCH | KEEP, 0, SPAN)
    crash(p)
    p = Pool(path)                                  # not synced: the data is back
    vd = p.lookup("A")
    assert read_all(p, vd)[:vd.size] == data
    p.fallocate(vd, PUNCH | KEEP, 0, SPAN)
    p.sync()
    crash(p)
    p = Pool(path)
    vd = p.lookup("A")
    assert read_all(p, vd)[:vd.size] == bytes(SPAN) + data[SPAN:]
    check(p)
    p.close()


@pytest.mark.local_chunks
def test_freed_slots_are_punched_in_the_data_file(tmp_path):
    path = new_pool(tmp_path, chunk_size=1 << 20, page_entries=16)
    p = Pool(path)
    vd = p.create("A")
    p.write(vd, 0, pattern(32 << 20, 8))
    p.sync()
    before = os.stat(os.path.join(path, layout.DATA)).st_blocks * 512
    p.fallocate(vd, PUNCH | KEEP, 0, 30 << 20)
    p.sync()
    after = os.stat(os.path.join(path, layout.DATA)).st_blocks * 512
    assert before - after >= 29 << 20
    p.close()


# ---------------------------------------------------------------------------- seek

def test_seek_data_and_hole_against_a_model_with_clones(pool):
    rnd = random.Random(11)
    a = pool.create("A")
    for _ in range(40):
        off = rnd.randrange(0, 12 * SPAN)
        pool.write(a, off, b"\7" * rnd.choice([1, CS, 3 * CS]))
    pool.truncate(a, 12 * SPAN + 123)
    b = pool.clone(a, "B")
    pool.fallocate(b, PUNCH | KEEP, 2 * SPAN, 3 * SPAN)
    pool.write(b, 9 * SPAN + 5, b"\1" * (2 * CS))          # a partial slot, new pages
    for vd in (a, b):
        chunks = [bool(slot(pool, vd, c)) for c in range(pool.meta.chunks_for(vd.size))]
        offsets = list(range(0, vd.size, CS // 2)) + [vd.size - 1, vd.size, vd.size + CS]
        for off in offsets:
            for whence in (SEEK_DATA, SEEK_HOLE):
                want = seek_model(chunks, vd.size, off, whence, CS)
                if want is None:
                    assert errno_of(lambda: pool.seek(vd, off, whence)) == errno.ENXIO
                else:
                    assert pool.seek(vd, off, whence) == want, (vd.name, off, whence)


def test_seek_on_a_fully_mapped_and_an_empty_vdisk(pool):
    vd = pool.create("A")
    pool.write(vd, 0, pattern(3 * SPAN, 9))
    assert pool.seek(vd, 0, SEEK_HOLE) == 3 * SPAN and pool.seek(vd, 5, SEEK_DATA) == 5
    e = pool.create("E", MAX_VDISK_SIZE)
    assert pool.seek(e, 0, SEEK_HOLE) == 0
    assert errno_of(lambda: pool.seek(e, 0, SEEK_DATA)) == errno.ENXIO
    assert errno_of(lambda: pool.seek(e, 0, 0)) == errno.EINVAL


# ---------------------------------------------------------------------------- sparse maps
def test_an_empty_petabyte_vdisk_and_its_clone_cost_almost_nothing(tmp_path):
    path = new_pool(tmp_path, chunk_size=256 << 10, page_entries=1024)
    p = Pool(path)
    tracemalloc.start()
    try:
        e = p.create("E", MAX_VDISK_SIZE)
        p.write(e, MAX_VDISK_SIZE - 4096, b"end")
        job = p.clones.start("E", "F")
        while job.running:
            p.clones.step(job, 64)
        p.fallocate(p.lookup("F"), PUNCH | KEEP, 0, MAX_VDISK_SIZE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    p.checkpoint()
    assert os.path.getsize(os.path.join(path, layout.CHECKPOINT)) < 64 << 10
    p.close()
    p = Pool(path)
    e, f = p.lookup("E"), p.lookup("F")
    assert p.read(e, MAX_VDISK_SIZE - 4096, 3) == b"end" and f.nalloc == 0
    assert e.npages == MAX_VDISK_SIZE // ((256 << 10) * 1024)
    check(p)
    p.close()


def test_a_format_3_dense_page_table_is_read_into_the_sparse_one(tmp_path):
    path = new_pool(tmp_path)
    p = Pool(path)
    vd = p.create("A")
    data = pattern(5 * SPAN, 10)
    p.write(vd, SPAN, data)
    p.close()
    ck = os.path.join(path, layout.CHECKPOINT)
    with open(ck, "rb") as f:
        rec = codec.read_single_record(f.read(), ck)
    from array import array
    for d in rec["vdisks"]:                        # write it as format 3 did
        pairs = codec.array_from_bin("Q", d.pop("pmap"), "test")
        dense = array("Q", bytes(8 * -(-d["size"] // SPAN)))
        for pidx, pid in zip(pairs[0::2], pairs[1::2]):
            dense[pidx] = pid
        d["ptab"] = codec.array_to_bin(dense)
    rec["v"] = 3
    layout.write_tmp(path, layout.CHECKPOINT, codec.frame_record(rec))
    p = Pool(path)
    vd = p.lookup("A")
    assert read_all(p, vd)[:vd.size] == bytes(SPAN) + data and sorted(vd.ptab) == [1, 2, 3, 4, 5]
    check(p)
    p.close()
