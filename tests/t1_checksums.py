"""Block checksums in the engine: every read verified, damage is EIO (never wrong bytes),
hot and cold slots, torn in-place writes after a crash, scrub, the sanity checks at
open, and the upgrade of a format 2 pool."""

from __future__ import annotations

import errno
import os
import random

import pytest

from support.engine import (CS, check, crash, flip_chunk_byte, new_pool, pattern,
                            reopen_after_crash, slot)

from vdiskfs.cow import codec, layout
from vdiskfs.cow.checksum import BLOCK
from vdiskfs.cow.codec import FormatError
from vdiskfs.cow.errors import VDiskError
from vdiskfs.cow.fsck import fsck, repair
from vdiskfs.cow.pool import Pool
from vdiskfs.cow.scrub import Scrub

BIG = 64 * 1024           # 16 blocks per chunk: in-chunk block positions matter here


@pytest.fixture
def path(tmp_path):
    return new_pool(tmp_path, BIG, 4)


def flip(pool_path: str, pos: int, name: str = layout.DATA) -> None:
    flip_chunk_byte(pool_path, pos, 0x5A, name)


def written(path: str, chunks: int, seed: int) -> bytes:
    """VDisk A holding ``chunks`` chunks of a pattern, the pool closed; returns the data."""
    p = Pool(path)
    data = pattern(chunks * BIG, seed)
    p.write(p.create("A", 0), 0, data)
    p.close()
    return data


def eio(call) -> bool:
    try:
        call()
    except VDiskError as e:
        assert e.errno == errno.EIO
        return True
    return False


def test_a_damaged_block_reads_eio_and_its_neighbours_exactly(path):
    data = written(path, 4, 1)
    p = Pool(path)
    a = p.lookup("A")
    s = slot(p, a, 1)
    flip(path, s * BIG + 3 * BLOCK + 100)           # block 3 of chunk 1
    bad = BIG + 3 * BLOCK
    assert eio(lambda: p.read(a, bad, 1))
    assert eio(lambda: p.read(a, 0, 4 * BIG))        # a read spanning it fails whole
    assert bytes(p.read(a, bad - BLOCK, BLOCK)) == data[bad - BLOCK:bad]
    assert bytes(p.read(a, bad + BLOCK, 3 * BLOCK)) == data[bad + BLOCK:bad + 4 * BLOCK]
    assert p.data.damage.errors[a.vid] == 2 and p.data.damage.bad_blocks == 1
    # A write over part of the damaged block would launder it: refused too.
    assert eio(lambda: p.write(a, bad + 10, b"x"))
    # A write of the whole block replaces it: then it reads again.
    p.write(a, bad, data[bad:bad + BLOCK])
    assert bytes(p.read(a, 0, 4 * BIG)) == data
    p.close()
    assert fsck(path, data=True).clean


def test_scrub_finds_exactly_the_damaged_ranges_of_every_vdisk_sharing_them(path):
    """1,000 flipped bytes at random positions of the mapped data, in batches of 100:
    every affected block reads EIO, every other block reads exactly, and scrub (and fsck
    --data) name exactly the damaged ranges, in the clone too, since it shares them."""
    p = Pool(path)
    a = p.create("A", 0)
    data = pattern(40 * BIG, 2)
    p.write(a, 0, data)
    p.clone(a, "B")
    p.close()
    rng = random.Random(7)
    for batch in range(10):
        p = Pool(path, readonly=True)
        a, b = p.lookup("A"), p.lookup("B")
        voffs = rng.sample(range(len(data)), 100)
        positions = [slot(p, a, v // BIG) * BIG + v % BIG for v in voffs]
        for pos in positions:
            flip(path, pos)
        damaged = {v // BLOCK for v in voffs}
        sc = Scrub(p, accept=False).run()
        want = sorted((name, blk * BLOCK) for blk in damaged for name in ("A", "B"))
        got = sorted((d.vdisk, s0) for d in sc.damaged() for s0 in range(d.start, d.end,
                                                                          BLOCK))
        assert got == want
        assert len(sc.bad) == len(damaged)
        for blk in range(len(data) // BLOCK):
            for vd in (a, b):
                if blk in damaged:
                    assert eio(lambda: p.read(vd, blk * BLOCK, BLOCK))
                else:
                    assert bytes(p.read(vd, blk * BLOCK, BLOCK)) == \
                        data[blk * BLOCK:(blk + 1) * BLOCK]
        p.close()
        r = fsck(path, data=True)
        assert not r.clean and r.stats["damaged_blocks"] == len(damaged)
        for pos in positions:
            flip(path, pos)                          # undone for the next batch
    assert fsck(path, data=True).clean


def test_many_flips_never_serve_wrong_bytes(path):
    """1,000 single-byte flips, one at a time, each at a random mapped position: the
    block it hits reads EIO, never other bytes."""
    data = written(path, 16, 3)
    p = Pool(path, readonly=True)
    a = p.lookup("A")
    rng = random.Random(11)
    slots = [slot(p, a, c) for c in range(16)]
    for _ in range(1000):
        voff = rng.randrange(len(data))
        pos = slots[voff // BIG] * BIG + voff % BIG
        flip(path, pos)
        blk = voff // BLOCK
        assert eio(lambda: p.read(a, blk * BLOCK, BLOCK))
        flip(path, pos)                              # undone
        assert bytes(p.read(a, blk * BLOCK, BLOCK)) == data[blk * BLOCK:(blk + 1) * BLOCK]
    p.close()


def test_cold_slots_are_copied_on_write_hot_ones_written_in_place(path):
    p = Pool(path)
    a = p.create("A", 0)
    p.write(a, 0, pattern(BIG, 4))
    s0 = slot(p, a, 0)
    p.sync()
    p.write(a, 10, b"hot")                            # born hot: in place
    assert slot(p, a, 0) == s0
    p.close()                                        # a clean unmount cools everything
    p = Pool(path)
    a = p.lookup("A")
    assert not p.meta.is_hot(s0) and not p.data.suspect
    p.write(a, 20, b"cold")                          # cold: copied into a fresh, hot slot
    s1 = slot(p, a, 0)
    assert s1 != s0 and p.meta.is_hot(s1)
    p.write(a, 30, b"again")                         # now in place
    assert slot(p, a, 0) == s1
    want = bytearray(pattern(BIG, 4))
    want[10:13], want[20:24], want[30:35] = b"hot", b"cold", b"again"
    assert bytes(p.read(a, 0, BIG)) == want
    check(p)
    p.close()


def test_cooling_passes(path):
    p = Pool(path)
    a = p.create("A", 0)
    p.write(a, 0, pattern(2 * BIG, 5))
    s0, s1 = slot(p, a, 0), slot(p, a, 1)
    assert p.cool() == 0                             # both written since the last pass
    p.write(a, BIG, b"x")                            # chunk 1 again
    assert p.cool() == 1                             # chunk 0 was idle for a whole pass
    assert not p.meta.is_hot(s0) and p.meta.is_hot(s1)
    p.sync()
    crash(p)
    p = Pool(path)
    assert p.data.suspect == {s1}                    # only recently written ones
    p.close()


def test_a_torn_in_place_write_is_accepted_once_in_a_suspect_slot(path):
    """After a crash, a block an in-place write left unmatched by its sum (data on disk,
    sum not, or the other way round) is an unacknowledged write: its bytes are served
    as they are, counted apart; in a slot that was cold the same would be damage."""
    p = Pool(path)
    a = p.create("A", 0)
    data = pattern(2 * BIG, 6)
    p.write(a, 0, data)
    p.sync()
    s = slot(p, a, 0)
    crash(p)
    flip(path, s * BIG + 5)                          # "a write the crash cut short"
    r = fsck(path, data=True)
    assert r.clean and r.stats.get("torn_blocks") == 1
    p = Pool(path)
    a = p.lookup("A")
    got = bytes(p.read(a, 0, BLOCK))
    assert got[5] != data[5] and got[6:] == data[6:BLOCK]
    assert p.data.damage.torn_accepted == 1 and not p.data.damage.errors
    assert bytes(p.read(a, 0, BLOCK)) == got          # its sum now matches
    p.close()                                        # the rest unchecked: still a suspect
    p = Pool(path)
    assert s in p.data.suspect          # (the other chunk, never read, as well)
    Scrub(p).run()                                   # every block checked: settled
    assert not p.data.suspect
    p.close()                                        # now it goes cold
    assert fsck(path, data=True).clean
    # The same in a cold slot: damage, EIO.
    flip(path, s * BIG + 5)
    p = Pool(path)
    assert eio(lambda: p.read(p.lookup("A"), 0, BLOCK))
    p.close()


def test_fsck_repair_accepts_torn_blocks_but_not_damage(path):
    p = Pool(path)
    a = p.create("A", 0)
    p.write(a, 0, pattern(2 * BIG, 7))
    p.sync()
    s0, s1 = slot(p, a, 0), slot(p, a, 1)
    p.cool()
    p.cool()                                         # both cold (idle for a pass)...
    p.write(a, 0, b"x")                              # ... chunk 0 copied into a hot slot
    s0 = slot(p, a, 0)
    p.sync()
    crash(p)
    flip(path, s0 * BIG + 9)                         # torn: hot slot
    flip(path, s1 * BIG + 9)                         # damage: cold slot
    r = repair(path, data=True)
    assert any("damaged" in e for e in r.errors)
    assert r.stats.get("damaged_blocks") == 1
    r = fsck(path, data=True)
    assert not r.clean and r.stats.get("damaged_blocks") == 1 and "torn_blocks" not in r.stats


@pytest.mark.local_chunks
def test_truncated_data_or_sums_file_is_refused_naming_it(path):
    written(path, 8, 8)
    for name, size in ((layout.DATA, 5 * BIG), (layout.SUMS, 100)):
        full = os.path.join(path, name)
        keep = open(full, "rb").read()
        os.truncate(full, size)
        with pytest.raises(FormatError, match=name):
            Pool(path)
        assert not fsck(path).clean
        with open(full, "wb") as f:
            f.write(keep)
    assert fsck(path, data=True).clean


@pytest.mark.parametrize("name", [layout.CHECKPOINT, layout.JOURNAL, layout.HEADER])
def test_a_file_from_another_pool_is_never_used(tmp_path, name):
    pools = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        d = new_pool(tmp_path / str(i), BIG, 4)
        p = Pool(d)
        a = p.create("A", 0)
        p.write(a, 0, pattern(BIG, 10 + i))
        p.close()
        pools.append(d)
    victim = os.path.join(pools[0], name)
    with open(os.path.join(pools[1], name), "rb") as f:
        other = f.read()
    for copy in ((victim, victim + layout.MIRROR) if name == layout.JOURNAL else (victim,)):
        with open(copy, "wb") as f:
            f.write(other)
    if name != layout.JOURNAL:
        # HEADER: the other header copy is this pool's, and the checkpoint agrees with it.
        # CHECKPOINT: refused as this pool's; the previous generation gives the state.
        assert any("another pool" in e for e in fsck(pools[0]).errors)
        p = Pool(pools[0])
        assert bytes(p.read(p.lookup("A"), 0, BIG)) == pattern(BIG, 10)
        p.close()
        return
    with pytest.raises(FormatError, match="another pool"):
        Pool(pools[0])


@pytest.mark.local_chunks
def test_a_format_2_pool_gets_its_sums_at_the_first_mount(path):
    data = written(path, 6, 12)
    # What a format 2 vdiskfs left: no sums, no mirror, no header copy, no uuid, no hot.
    for name in (layout.SUMS, layout.HEADER_COPY, layout.JOURNAL + layout.MIRROR,
                 layout.CHECKPOINT_PREV, layout.JOURNAL_PREV,
                 layout.JOURNAL_PREV + layout.MIRROR):
        os.unlink(os.path.join(path, name))
    ck = os.path.join(path, layout.CHECKPOINT)
    rec = codec.read_single_record(open(ck, "rb").read(), ck)
    rec["v"] = 2
    del rec["uuid"], rec["hot"]
    open(ck, "wb").write(codec.frame_record(rec))
    r = fsck(path, data=True)                        # read as it is, unchecked
    assert r.clean, r.errors
    p = Pool(path)
    assert bytes(p.read(p.lookup("A"), 0, len(data))) == data
    p.close()
    for name in (layout.SUMS, layout.HEADER_COPY, layout.JOURNAL + layout.MIRROR):
        assert os.path.exists(os.path.join(path, name))
    assert fsck(path, data=True).clean
    p = Pool(path)
    s = slot(p, p.lookup("A"), 2)
    p.close()
    flip(path, s * BIG + 1)                          # now checked
    p = Pool(path)
    assert eio(lambda: p.read(p.lookup("A"), 2 * BIG, BLOCK))
    p.close()


def test_reopen_after_crash_keeps_sums_of_acknowledged_writes(path):
    """Sums are synced with the data: a crash after fsync serves every acked block."""
    p = Pool(path)
    a = p.create("A", 0)
    data = pattern(5 * BIG, 13)
    p.write(a, 0, data)
    p.write(a, 3, b"in place")                       # hot slot, in place
    p.sync()
    p2 = reopen_after_crash(p)
    want = bytearray(data)
    want[3:11] = b"in place"
    assert bytes(p2.read(p2.lookup("A"), 0, len(data))) == want
    assert not p2.data.damage.torn_accepted
    p2.close()
