"""Damaged metadata: the mount refuses with a one-line reason naming the file, or recovers
from the journal; never serves wrong data silently. ``vdiskfs fsck --repair`` rebuilds
what it can, says what it could not save, and its result passes a second fsck."""

from __future__ import annotations

import os

import pytest

from support.common import flip_byte, journal_frames, vdiskfs
from support.engine import crash
from vdiskfs.cow import codec, layout
from vdiskfs.cow.pool import Pool, create_pool

CS = 4096
SPAN = CS * 4          # one page of 4 entries


@pytest.fixture
def pool_path(pool_dir):
    """A pool with data in its checkpoint and in several journal batches after it."""
    create_pool(pool_dir, CS, page_entries=4)
    p = Pool(pool_dir)
    a = p.create("A", 0)
    for i in range(4):
        p.write(a, i * SPAN, b"early %d" % i)
    p.clone(a, "B")
    p.checkpoint()
    for i in range(4, 8):
        p.write(a, i * SPAN, b"late %d" % i)
        p.sync()
    crash(p)
    return pool_dir


def mount_fails(pool: str, tmp_path, needle: str) -> str:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    proc = vdiskfs("mount", pool, str(mnt), check=False, timeout=60)
    if proc.returncode == 0:                      # leave no mount behind the failure
        vdiskfs("umount", str(mnt), "--force", check=False, timeout=120)
    assert proc.returncode != 0, "a damaged pool was mounted"
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err


flip = flip_byte


def read_a(pool: str) -> bytes:
    p = Pool(pool)
    try:
        a = p.lookup("A")
        return bytes(p.read(a, 0, a.size))
    finally:
        p.close()


def fsck_fails(pool: str, needle: str) -> None:
    proc = vdiskfs("fsck", pool, check=False)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def repair(pool: str, *, ok: bool = True) -> str:
    """fsck --repair: exit 1 (corrected) when ``ok``, 4 (left uncorrected) otherwise, as
    e2fsck; a second fsck then says clean (0)."""
    proc = vdiskfs("fsck", "--repair", pool, check=False)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert proc.returncode == (1 if ok else 4), out
    if ok:
        second = vdiskfs("fsck", pool, check=False)
        assert second.returncode == 0, second.stdout + second.stderr
    return out


def damage_file(path: str, damage: str) -> None:
    if damage == "flip":
        flip(path, os.path.getsize(path) // 2)
    elif damage == "truncate":
        os.truncate(path, os.path.getsize(path) - 100)
    elif damage == "empty":
        os.truncate(path, 0)
    else:
        os.unlink(path)


@pytest.mark.mount
@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "delete"])
def test_damaged_checkpoint_falls_back_to_the_previous_generation(pool_path, tmp_path,
                                                                   need_fuse, damage):
    """One damaged checkpoint loses nothing: the previous generation and its journal give
    the same state; fsck names the file, the next mount writes a sound one."""
    want = read_a(pool_path)
    crash_reopen = Pool(pool_path)       # replays the journal; leaves the files as they are
    crash(crash_reopen)
    ck = os.path.join(pool_path, layout.CHECKPOINT)
    damage_file(ck, damage)
    fsck_fails(pool_path, ck)
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    vdiskfs("mount", pool_path, str(mnt), timeout=60)
    try:
        with open(mnt / "A", "rb") as f:
            assert f.read() == want
    finally:
        vdiskfs("umount", str(mnt), timeout=120)
    assert read_a(pool_path) == want
    assert vdiskfs("fsck", pool_path, check=False).returncode == 0


@pytest.mark.mount
@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_both_checkpoint_generations_damaged_is_refused(pool_path, tmp_path, need_fuse,
                                                        damage):
    Pool(pool_path).close()              # a checkpoint: now there is a previous generation
    for name in (layout.CHECKPOINT, layout.CHECKPOINT_PREV):
        damage_file(os.path.join(pool_path, name), damage)
    ck = os.path.join(pool_path, layout.CHECKPOINT)
    mount_fails(pool_path, tmp_path, ck)
    fsck_fails(pool_path, ck)
    out = repair(pool_path, ok=False)        # nothing to rebuild the maps from
    assert "cannot repair" in out
    for name in (layout.CHECKPOINT, layout.CHECKPOINT_PREV) + layout.HEADERS:
        os.unlink(os.path.join(pool_path, name))   # leave nothing for the teardown fsck


@pytest.mark.mount
@pytest.mark.parametrize("which", [layout.CHECKPOINT, layout.HEADER, layout.JOURNAL])
def test_newer_format_is_refused_by_name(pool_path, tmp_path, need_fuse, which):
    path = os.path.join(pool_path, which)
    with open(path, "rb") as f:
        data = f.read()
    payload, end = next(codec.iter_frames(data))
    rec = codec.unpackb(payload)
    rec["v"] = codec.FORMAT_VERSION + 1
    with open(path, "wb") as f:
        f.write(codec.frame_record(rec) + data[end:])
    err = mount_fails(pool_path, tmp_path, path)
    assert "newer" in err
    fsck_fails(pool_path, "newer")
    # Putting the old version back is all it takes: nothing was changed meanwhile.
    rec["v"] = codec.FORMAT_VERSION
    with open(path, "wb") as f:
        f.write(codec.frame_record(rec) + data[end:])
    assert read_a(pool_path).startswith(b"early 0")


@pytest.mark.mount
def test_damaged_middle_of_journal_is_refused_then_repaired(pool_path, tmp_path, need_fuse):
    jpath = os.path.join(pool_path, layout.JOURNAL)
    frames = journal_frames(pool_path)
    start, end = frames[1]                  # the first batch; three more follow it
    for copy in (jpath, jpath + layout.MIRROR):        # one copy alone loses nothing
        flip(copy, end - 2)
    err = mount_fails(pool_path, tmp_path, jpath)
    assert "--repair" in err
    fsck_fails(pool_path, "corrupt")
    out = repair(pool_path)
    assert "dropped" in out                 # says what could not be saved
    data = read_a(pool_path)
    for i in range(4):                      # the checkpoint's data is all there
        assert data[i * SPAN:i * SPAN + 7] == b"early %d" % i


@pytest.mark.mount
def test_torn_journal_tail_recovers_on_mount(pool_path, tmp_path, need_fuse):
    jpath = os.path.join(pool_path, layout.JOURNAL)
    for copy in (jpath, jpath + layout.MIRROR):        # a crash tears both copies
        os.truncate(copy, os.path.getsize(copy) - 5)   # the last batch lost its end
    data = read_a(pool_path)                            # mounts: the torn batch dropped
    for i in range(4, 7):
        assert data[i * SPAN:i * SPAN + 6] == b"late %d" % i
    assert len(data) == 6 * SPAN + 6


def test_broken_refcounts_and_leaks_are_rebuilt(pool_dir):
    create_pool(pool_dir, CS, page_entries=4)
    p = Pool(pool_dir)
    a = p.create("A", 0)
    p.write(a, 0, b"x" * (3 * CS))
    b = p.clone(a, "B")
    p.write(b, CS, b"y" * 10)
    want_a, want_b = bytes(p.read(a, 0, a.size)), bytes(p.read(b, 0, b.size))
    m = p.meta
    m.slot_ref[1] += 2                                      # wrong refcount
    m.slot_ref.extend([0] * 10)
    m.slot_ref[len(m.slot_ref) - 1] = 1                     # a leaked slot
    m.page_ref[next(iter(m.pages))] += 1                    # wrong page refcount
    p.checkpoint()
    p.close(commit=False)
    fsck_fails(pool_dir, "leaked")
    out = repair(pool_dir)
    assert "rebuilt" in out and "leaked" in out
    p = Pool(pool_dir)
    try:
        assert bytes(p.read(p.lookup("A"), 0, 3 * CS)) == want_a
        assert bytes(p.read(p.lookup("B"), 0, 3 * CS)) == want_b
    finally:
        p.close()


def test_truncated_data_file_is_reported_and_repaired(pool_dir):
    create_pool(pool_dir, CS, page_entries=4)
    p = Pool(pool_dir)
    a = p.create("A", 0)
    p.write(a, 0, b"k" * (4 * CS))
    p.close()
    os.truncate(os.path.join(pool_dir, layout.DATA), 2 * CS)   # slots 2 and 3 gone
    fsck_fails(pool_dir, "past the end of the data file")
    out = repair(pool_dir)
    assert "lost" in out
    data = read_a(pool_dir)
    assert data[:CS] == b"k" * CS                              # slot 1 survived
    assert data[2 * CS:] == bytes(2 * CS)                      # lost chunks read as zeros


def test_half_made_clone_without_its_job_is_removed(pool_dir):
    create_pool(pool_dir, CS, page_entries=4)
    p = Pool(pool_dir)
    a = p.create("A", 0)
    p.write(a, 0, b"z" * (8 * SPAN))
    job = p.clones.start("A", "B")
    p.clones.step(job, 1)
    with p.txn:                       # lose the job, keep the unfinished mark
        p.txn.apply(["jdel", job.id])
    p.checkpoint()
    p.close(commit=False)
    fsck_fails(pool_dir, "unfinished clone")
    out = repair(pool_dir)
    assert "removed" in out
    p = Pool(pool_dir)
    try:
        assert p.lookup("B") is None          # never openable half-made
        assert bytes(p.read(p.lookup("A"), 0, 4)) == b"zzzz"
    finally:
        p.close()


MATRIX_FILES = (layout.HEADER, layout.HEADER_COPY, layout.CHECKPOINT, layout.CHECKPOINT_PREV,
                layout.JOURNAL, layout.JOURNAL + layout.MIRROR, layout.JOURNAL_PREV,
                layout.JOURNAL_PREV + layout.MIRROR)


def test_corruption_matrix_one_damaged_metadata_file(tmp_path, capsys):
    """Every metadata file, one at a time: a byte flipped at 50 random offsets, the file
    cut to 10 random lengths, the file deleted. Each case opens with every acknowledged
    byte intact, or is refused naming the file; none serves other bytes."""
    import random
    import shutil
    from collections import Counter
    from vdiskfs.cow.codec import FormatError

    base = str(tmp_path / "base")
    create_pool(base, CS, page_entries=4)
    p = Pool(base)
    a = p.create("A", 0)
    for i in range(6):
        p.write(a, i * SPAN, b"gen0 %d" % i * 50)
    p.clone(a, "B")
    p.checkpoint()                          # a previous generation with a journal
    for i in range(3, 9):
        p.write(a, i * SPAN + 100, b"gen1 %d" % i * 30)
        p.sync()
    want = {vd.name: bytes(p.read(vd, 0, vd.size)) for vd in p.vdisks()}
    crash(p)
    rng = random.Random(20261201)
    outcomes: Counter = Counter()
    bad = []
    for name in MATRIX_FILES:
        size = os.path.getsize(os.path.join(base, name))
        cases = [("flip", rng.randrange(size)) for _ in range(50)]
        cases += [("cut", rng.randrange(size)) for _ in range(10)]
        cases += [("delete", 0)]
        for kind, where in cases:
            d = str(tmp_path / "case")
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(base, d)
            target = os.path.join(d, name)
            if kind == "flip":
                flip(target, where)
            elif kind == "cut":
                os.truncate(target, where)
            else:
                os.unlink(target)
            try:
                q = Pool(d)
            except FormatError as e:
                outcome = "refused, naming it" if name in str(e) else "refused, naming another"
                if outcome != "refused, naming it":
                    bad.append(f"{name} {kind}@{where}: {e}")
            else:
                got = {vd.name: bytes(q.read(vd, 0, vd.size)) for vd in q.vdisks()}
                q.close()
                outcome = "intact" if got == want else "OTHER BYTES"
                if got != want:
                    bad.append(f"{name} {kind}@{where}: other bytes")
            outcomes[(name, kind, outcome)] += 1
    with capsys.disabled():
        print("\ncorruption matrix (file, damage, outcome: cases):")
        for (name, kind, outcome), n in sorted(outcomes.items()):
            print(f"  {name:22s} {kind:6s} {outcome}: {n}")
    assert not bad, "\n".join(bad[:20])
