"""The randomized model test of the engine: random operations on a pool (writes, zero
writes, truncates, clones, clone jobs in steps, unlinks, renames, commits, checkpoints,
commits in flight and crashes), each followed by the refcount check, and every VDisk's
bytes checked against a model, including what a crash may leave.

Used by t1_engine (4 KiB chunks) and t1_engine_partial, which runs it at its own geometry
by monkeypatching ``CS`` and ``SPAN`` here.
"""

from __future__ import annotations

import errno
import random

import pytest

from support.engine import CS, SPAN, check, reopen_after_crash, slot
from vdiskfs.cow.errors import VDiskError
from vdiskfs.cow.fsck import fsck
from vdiskfs.cow.pool import Pool


class Model:
    """Byte-for-byte models of every VDisk (by name), plus what a crash may leave.

    ``disks`` are the ordinary VDisks, ``pending`` the destinations of running clone jobs
    (name -> the source's bytes at the clone point; checked when the job completes).
    ``durable``/``durable_pending`` are what the last completed commit made durable
    ({vid: (name, bytes)}); ``versions[(vid, cidx)]`` every content a chunk of that VDisk
    had since then. After a crash each VDisk must be back as it was durably, with each
    chunk holding its durable content or one the same VDisk wrote since (an in-place
    overwrite of a chunk it owned); anything else was overwritten although another VDisk
    still owned it durably, or was reused before its free was durable.
    """

    def __init__(self):
        self.disks: dict[str, bytearray] = {}
        self.pending: dict[str, bytes] = {}
        self.durable: dict[int, tuple[str, bytes]] = {}
        self.durable_pending: dict[int, tuple[str, bytes]] = {}
        self.versions: dict[tuple[int, int], list[bytes]] = {}
        # Chunk versions a clone destination had after its job completed in memory but
        # before that was durable: after a crash the job resumes, and the destination may
        # keep what was written to it in place meanwhile (unsynced writes may survive).
        self.pending_versions: dict[tuple[int, int], list[bytes]] = {}

    def chunk(self, name: str, c: int) -> bytes:
        return bytes(self.disks[name][c * CS:(c + 1) * CS]).ljust(CS, b"\0")

    def touched(self, vid: int, name: str, first: int, last: int) -> None:
        for c in range(first, last + 1):
            self.versions.setdefault((vid, c), []).append(self.chunk(name, c))

    def write(self, vid, name, off, data):
        d = self.disks[name]
        if off + len(data) > len(d):
            d.extend(bytes(off + len(data) - len(d)))
        d[off:off + len(data)] = data
        self.touched(vid, name, off // CS, (off + len(data) - 1) // CS)

    def truncate(self, vid, name, size):
        d = self.disks[name]
        if size < len(d):
            del d[size:]
            if size % CS:
                self.touched(vid, name, size // CS, size // CS)
        else:
            d.extend(bytes(size - len(d)))

    def fallocate(self, vid, name, mode, off, n):
        """fallocate(2) as Pool.fallocate documents it: punch and zero range read zeros;
        without KEEP_SIZE (1) the VDisk grows to cover the range."""
        d = self.disks[name]
        if not mode & 1 and off + n > len(d):
            d.extend(bytes(off + n - len(d)))
        end = min(off + n, len(d))
        if mode & 0x12 and off < end:
            d[off:end] = bytes(end - off)
            self.touched(vid, name, off // CS, (end - 1) // CS)

    def snapshot(self, pool: Pool):
        return ({pool.lookup(n).vid: (n, bytes(d)) for n, d in self.disks.items()},
                {pool.lookup(n).vid: (n, d) for n, d in self.pending.items()})

    def made_durable(self, pool: Pool) -> None:
        self.durable, self.durable_pending = self.snapshot(pool)
        self.versions = {}

    def check_after_crash(self, pool: Pool, versions=None) -> None:
        versions = self.versions if versions is None else versions
        unfinished = {vd.vid: vd.name for vd in pool.vdisks() if pool.clones.unfinished(vd)}
        got = {vd.vid: (vd.name, vd.size) for vd in pool.vdisks() if vd.vid not in unfinished}
        assert got == {vid: (n, len(d)) for vid, (n, d) in self.durable.items()}
        assert unfinished == {vid: n for vid, (n, _) in self.durable_pending.items()}
        assert {j.dst for j in pool.clones.running()} == set(unfinished)
        for vid, (name, data) in self.durable.items():
            vd = pool.get(vid)
            for c in range(pool.meta.chunks_for(vd.size)):
                have = bytes(pool.read(vd, c * CS, CS))
                options = [data[c * CS:(c + 1) * CS]] + versions.get((vid, c), [])
                # A partial slot's blocks come back from two places (itself: in-place
                # writes; its base: blocks whose mask bit was not durable), so an unsynced
                # write may come back block by block, as on a real power cut; never with
                # bytes the chunk never had.
                g = (pool.meta.block_size if pool.meta.slot_of(vd, c) in pool.meta.partial
                     else CS)
                for b in range(0, len(have), g):
                    part = have[b:b + g]
                    assert any(part == o[b:b + len(part)] for o in options), \
                        f"{name} chunk {c} (at {b}) holds data it never had (another VDisk's?)"
        for (vid, c), v in versions.items():
            if vid in unfinished:
                self.pending_versions.setdefault((vid, c), []).extend(v)
        self.disks = {vd.name: bytearray(pool.read(vd, 0, vd.size)) for vd in pool.vdisks()
                      if vd.vid not in unfinished}
        self.pending = {n: d for n, d in self.durable_pending.values()}
        self.made_durable(pool)


def verify(pool: Pool, model: Model, names=None) -> None:
    assert sorted(vd.name for vd in pool.vdisks()) == sorted([*model.disks, *model.pending])
    for name in names if names is not None else model.disks:
        vd = pool.lookup(name)
        want = model.disks[name]
        assert vd.size == len(want), name
        got = pool.read(vd, 0, vd.size + CS)
        assert got == want, f"{name}: contents differ"
        # Zero detection holds throughout: a chunk is mapped iff it holds a nonzero byte.
        for c in range(pool.meta.chunks_for(vd.size)):
            nonzero = any(want[c * CS:(c + 1) * CS])
            assert bool(slot(pool, vd, c)) == nonzero, (name, c)


def busy(pool: Pool, name: str) -> bool:
    vd = pool.lookup(name)
    return pool.clones.busy_source(vd) or pool.clones.unfinished(vd)


def expect_busy(call) -> None:
    with pytest.raises(VDiskError) as ei:
        call()
    assert ei.value.errno == errno.EBUSY


def run_random(path: str, seed: int, steps: int, *, inflight: bool,
               inflight_crash: bool = True) -> dict:
    """Random operations on a pool, checking refcounts after each and data against models.

    Clone jobs run in steps between the other operations, as the daemon runs them, and
    their destinations must end up holding the source as it was at the clone point. With
    ``inflight``, commits are also done the way the daemon's Syncer does them: prepare,
    more operations while the commit "runs", then run+finish or (with ``inflight_crash``)
    a crash."""
    rnd = random.Random(seed)
    model = Model()
    pool = Pool(path)
    maxsize = 6 * SPAN
    counter = 0
    stats: dict[str, int] = {}

    def new_name():
        nonlocal counter
        counter += 1
        return f"v{counter}"

    def data_op(names_):
        """One write, zero write, fallocate or truncate; returns the op's name."""
        name = rnd.choice(names_)
        vd = pool.lookup(name)
        r = rnd.random()
        if r < 0.5:
            off = rnd.randrange(0, maxsize)
            n = rnd.choice([1, 7, CS, 2 * CS, rnd.randrange(1, 3 * CS)])
            if rnd.random() < 0.3:
                off -= off % CS
            data = bytes([rnd.randrange(1, 256)]) * n if rnd.random() < 0.5 else \
                rnd.randbytes(n)
            pool.write(vd, off, data)
            model.write(vd.vid, name, off, data)
            return "write"
        if r < 0.75:
            off = rnd.randrange(0, maxsize)
            if rnd.random() < 0.5:
                off -= off % CS
            n = rnd.choice([CS, 2 * CS, rnd.randrange(1, 2 * CS)])
            pool.write(vd, off, bytes(n))
            model.write(vd.vid, name, off, bytes(n))
            return "zero"
        if r < 0.88:
            mode = rnd.choice([3, 3, 3, 16, 17, 0, 1])      # punch, zero range, preallocate
            off = rnd.randrange(0, maxsize)
            if rnd.random() < 0.5:
                off -= off % CS
            n = rnd.choice([CS, SPAN, 3 * SPAN, rnd.randrange(1, 3 * SPAN)])
            pool.fallocate(vd, mode, off, n)
            model.fallocate(vd.vid, name, mode, off, n)
            return "fallocate"
        size = rnd.choice([0, rnd.randrange(0, maxsize), rnd.randrange(0, maxsize)])
        pool.truncate(vd, size)
        model.truncate(vd.vid, name, size)
        return "truncate"

    def job_step():
        job = rnd.choice(pool.clones.running())
        pool.clones.step(job, rnd.choice([1, 1, 2, 64]))
        if job.state == "Completed":
            name = job.dst_name
            vd = pool.lookup(name)
            assert not pool.clones.unfinished(vd)
            want = model.pending.pop(name)
            if any(vid == vd.vid for vid, _ in model.pending_versions):
                assert vd.size == len(want)
                for c in range(pool.meta.chunks_for(vd.size)):
                    have = bytes(pool.read(vd, c * CS, CS))
                    options = [want[c * CS:(c + 1) * CS]] + \
                        model.pending_versions.get((vd.vid, c), [])
                    assert any(have == o[:len(have)] for o in options), (name, c)
                want = pool.read(vd, 0, vd.size)
            model.disks[name] = bytearray(want)
            verify(pool, model, [name])    # the source as it was at the clone point
            return "job completed"
        return "job step"

    try:
        for step in range(steps):
            names_ = sorted(model.disks)
            r = rnd.random()
            touched = None
            if not names_ or (r < 0.03 and len(names_) < 8):
                op = "create"
                name = new_name()
                size = rnd.choice([0, rnd.randrange(0, maxsize)])
                pool.create(name, size)
                model.disks[name] = bytearray(size)
                touched = [name]
            elif r < 0.60:
                op = data_op(names_)
                touched = None if op == "truncate" else names_
            elif r < 0.64:
                op = "clone"
                if len(names_) + len(model.pending) >= 8:
                    continue
                src = rnd.choice(names_)
                name = new_name()
                pool.clone(pool.lookup(src), name)
                model.disks[name] = bytearray(model.disks[src])
                touched = [src, name]
            elif r < 0.67:
                op = "job start"
                if len(names_) + len(model.pending) >= 8:
                    continue
                src, name = rnd.choice(names_), new_name()
                pool.clones.start(src, name)
                model.pending[name] = bytes(model.disks[src])
                if not pool.clones.unfinished(pool.lookup(name)):   # no data: done at once
                    model.disks[name] = bytearray(model.pending.pop(name))
            elif r < 0.75:
                if not pool.clones.running():
                    continue
                op = job_step()
            elif r < 0.76:
                if not pool.clones.running():
                    continue
                op = "job cancel"
                job = rnd.choice(pool.clones.running())
                pool.clones.stop(job)
                del model.pending[job.dst_name]
                assert pool.lookup(job.dst_name) is None
                if rnd.random() < 0.5:
                    pool.clones.purge()
                    assert not [j for j in pool.clones.jobs() if j.state != "running"]
            elif r < 0.80:
                op = "unlink"
                name = rnd.choice(names_ + sorted(model.pending))
                if busy(pool, name):
                    op = "unlink EBUSY"
                    expect_busy(lambda: pool.unlink(pool.lookup(name)))
                else:
                    pool.unlink(pool.lookup(name))
                    del model.disks[name]
                touched = []
            elif r < 0.84:
                op = "rename"
                name = rnd.choice(names_)
                if rnd.random() < 0.5 and len(names_) + len(model.pending) > 1:
                    target = rnd.choice([x for x in names_ + sorted(model.pending)
                                         if x != name])
                else:
                    target = new_name()
                if target in model.pending and not busy(pool, name):
                    op = "rename EEXIST"     # a clone's destination name is reserved
                    with pytest.raises(VDiskError) as ei:
                        pool.rename(pool.lookup(name), target)
                    assert ei.value.errno == errno.EEXIST
                elif busy(pool, name) or (target in pool.meta.names and busy(pool, target)):
                    op = "rename EBUSY"
                    expect_busy(lambda: pool.rename(pool.lookup(name), target))
                else:
                    model.disks.pop(target, None)        # replaced
                    pool.rename(pool.lookup(name), target)
                    model.disks[target] = model.disks.pop(name)
                    touched = [target]
            elif r < 0.90 and not (inflight and rnd.random() < 0.6):
                op = "sync"
                pool.sync()
                assert not pool.space.freed_slots and not pool.journal.buffer
                model.made_durable(pool)
            elif 0.90 <= r < 0.92:
                op = "checkpoint"
                pool.checkpoint()
                model.made_durable(pool)
            elif 0.92 <= r < 0.945:
                op = "sync+crash"
                pool.sync()
                model.made_durable(pool)
                pool = reopen_after_crash(pool)
                model.check_after_crash(pool)
            elif 0.945 <= r < 0.97:
                op = "crash"                        # whatever was not committed is lost
                pool = reopen_after_crash(pool)
                model.check_after_crash(pool)
            elif 0.97 <= r < 0.985 or not inflight:
                op = "close+reopen"
                pool.close()
                pool = Pool(path)
                assert pool.replayed == 0
                model.made_durable(pool)
            else:
                op = "inflight"
                batch = pool.prepare_commit()
                pending = model.snapshot(pool)
                before, model.versions = model.versions, {}
                for _ in range(rnd.randrange(1, 6)):
                    if model.disks:
                        k = data_op(sorted(model.disks))
                        stats[k] = stats.get(k, 0) + 1
                        check(pool)
                if inflight_crash and rnd.random() < 0.5:
                    op = "inflight+crash"
                    pool = reopen_after_crash(pool)
                    merged = dict(before)
                    for k, v in model.versions.items():
                        merged[k] = merged.get(k, []) + v
                    model.check_after_crash(pool, merged)
                else:
                    batch.run()
                    batch.finish()
                    model.durable, model.durable_pending = pending
            stats[op] = stats.get(op, 0) + 1
            check(pool)
            verify(pool, model, touched)
            if step % 100 == 0:
                verify(pool, model)
        while pool.clones.running():
            job_step()
        verify(pool, model)
        pool.close()
    except BaseException:
        if pool._lock_fd >= 0:
            pool.close(commit=False)
        raise
    r = fsck(path)
    assert r.clean, r.errors
    p = Pool(path)
    try:
        verify(p, model)
    finally:
        p.close()
    return stats
