"""Damaged metadata: the mount refuses with a one-line reason naming the file, or recovers
from the journal; never serves wrong data silently. ``vdiskfs fsck --repair`` rebuilds
what it can, says what it could not save, and its result passes a second fsck."""

from __future__ import annotations

import os

import pytest

from support.common import journal_frames, vdiskfs
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
    assert proc.returncode != 0, "a damaged pool was mounted"
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


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
    proc = vdiskfs("fsck", "--repair", pool, check=False)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert (proc.returncode == 0) == ok, out
    if ok:
        second = vdiskfs("fsck", pool, check=False)
        assert second.returncode == 0, second.stdout + second.stderr
    return out


@pytest.mark.mount
@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_checkpoint_is_refused(pool_path, tmp_path, need_fuse, damage):
    ck = os.path.join(pool_path, layout.CHECKPOINT)
    if damage == "flip":
        flip(ck, os.path.getsize(ck) // 2)
    elif damage == "truncate":
        os.truncate(ck, os.path.getsize(ck) - 100)
    else:
        os.truncate(ck, 0)
    mount_fails(pool_path, tmp_path, ck)
    fsck_fails(pool_path, ck)
    out = repair(pool_path, ok=False)        # nothing to rebuild the maps from
    assert "cannot repair" in out
    os.unlink(ck)                             # leave nothing for the teardown fsck
    os.unlink(os.path.join(pool_path, layout.HEADER))


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
    flip(jpath, end - 2)
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
    os.truncate(jpath, os.path.getsize(jpath) - 5)     # the last batch lost its end
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
