"""Concurrency: 8 writers on their own VDisks, clones of those VDisks started, cancelled,
verified and deleted while the writes go on (SPEC §3: point-in-time clones of a writable
source; §4: the control files).

Each writer thread owns one VDisk and a model of it (64 KiB blocks, copy-on-write, so a
snapshot is a cheap dict copy). Between its own writes it starts clones of its VDisk through
``.ctl/clone`` and records the model at the moment the command returned: no write of that
VDisk can race with the clone point, so the expected contents of every clone are exact. It
also cancels its clones now and then. A janitor thread follows ``.ctl/status``: every
Completed clone must equal its snapshot (while its source keeps changing), then most are
deleted; Cancelled ones must be gone. The mount uses ``--clone-speed 32M --chunk-size 64K``
and VDisks spanning two map pages, so clones run long enough for writes to land during them
(the guard path and copy-on-write after sharing).

At the end: every VDisk equals its model, every kept clone its snapshot, nothing else is
listed; after the unmount fsck is clean and daemon.log holds no unexpected error; after a
remount (cold cache) everything reads back again.
"""

from __future__ import annotations

import errno
import os
import random
import re
import threading
import time

import pytest

from support.common import (FALLOC_PUNCH, FALLOC_ZERO_KEEP, Mount, daemon_log, fallocate,
                            fsck_clean)

pytestmark = pytest.mark.mount

KiB = 1 << 10
MiB = 1 << 20
BS = 64 * KiB                  # model block = chunk size
WRITERS = 8
VDISK_SIZE = 72 * MiB          # two map pages at 64K chunks (1024 chunks = 64 MiB a page)
RUN_SECONDS = 18.0
MAX_OPEN_CLONES = 2            # a writer's clones not yet checked by the janitor
FINAL = ("Completed", "Error", "Cancelled")
ZERO = bytes(4 * MiB)


class Model:
    """A sparse byte model: size + {block index: bytes(BS)}; blocks are immutable, so
    ``snapshot()`` is a shallow dict copy."""

    def __init__(self, size: int):
        self.size = size
        self.blocks: dict[int, bytes] = {}

    def write(self, off: int, data: bytes) -> None:
        end = off + len(data)
        pos = off
        while pos < end:
            b, boff = divmod(pos, BS)
            n = min(BS - boff, end - pos)
            old = self.blocks.get(b, bytes(BS))
            self.blocks[b] = old[:boff] + data[pos - off:pos - off + n] + old[boff + n:]
            pos += n
        self.size = max(self.size, end)

    def truncate(self, size: int) -> None:
        if size < self.size:
            last, tail = divmod(size, BS)
            for b in [b for b in self.blocks if b > last or (b == last and tail == 0)]:
                del self.blocks[b]
            if tail and last in self.blocks:
                self.blocks[last] = self.blocks[last][:tail] + bytes(BS - tail)
        self.size = size

    def read(self, off: int, n: int) -> bytes:
        n = max(0, min(n, self.size - off))
        out = bytearray(n)
        b0, b1 = off // BS, (off + n - 1) // BS
        for b in range(b0, b1 + 1) if n else ():
            blk = self.blocks.get(b)
            if blk is None:
                continue
            lo, hi = max(off, b * BS), min(off + n, (b + 1) * BS)
            out[lo - off:hi - off] = blk[lo - b * BS:hi - b * BS]
        return bytes(out)

    def snapshot(self) -> "Model":
        s = Model(self.size)
        s.blocks = dict(self.blocks)
        return s


def compare(path: str, model: Model, what: str) -> None:
    """The whole file equals the model (read in 4 MiB pieces; a difference is located)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        assert size == model.size, f"{what}: size {size}, expected {model.size}"
        for off in range(0, size, len(ZERO)):
            n = min(len(ZERO), size - off)
            got = os.pread(fd, n, off)
            exp = model.read(off, n)
            if got != exp:
                bad = next(i for i in range(n) if got[i] != exp[i])
                raise AssertionError(
                    f"{what}: differs at byte {off + bad} (chunk {(off + bad) // BS}): got "
                    f"{got[bad:bad + 40]!r}, expected {exp[bad:bad + 40]!r}")
    finally:
        os.close(fd)


def ctl_command(m: Mount, cmd: str) -> int:
    fd = os.open(os.path.join(m.mnt, ".ctl", "clone"), os.O_WRONLY)
    try:
        os.write(fd, cmd.encode() + b"\n")
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def status_rows(m: Mount) -> list[tuple[str, str, str]]:
    with open(os.path.join(m.mnt, ".ctl", "status"), "rb") as f:
        lines = f.read().decode().splitlines()
    assert lines[0].split() == ["Source", "Destination", "Progress"], lines
    rows = []
    for line in lines[1:]:
        src, dst, state = line.split()
        assert state in FINAL or re.fullmatch(r"\d{1,2}%", state), line
        rows.append((src, dst, state))
    return rows


def pattern(vd: int, seq: int, off: int, n: int) -> bytes:
    """Recognisable data: which VDisk, which write, which offset."""
    tag = f"<V{vd} w{seq} @{off}>".encode()
    return (tag * (n // len(tag) + 1))[:n]


class Stress:
    def __init__(self, m: Mount, seed: int):
        self.m = m
        self.seed = seed
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.models = [Model(VDISK_SIZE) for _ in range(WRITERS)]
        self.snapshots: dict[str, tuple[int, Model]] = {}  # clone -> (source, snapshot)
        self.open_clones = [0] * WRITERS       # started, not yet settled by the janitor
        self.settled: dict[str, str] = {}      # clone -> final state seen by the janitor
        self.kept: set[str] = set()            # Completed clones left for the final check
        self.stats = {"writes": 0, "fsyncs": 0, "punches": 0, "truncates": 0, "clones": 0,
                      "cancel_ok": 0, "cancel_enoent": 0, "verified": 0, "deleted": 0,
                      "ebusy_seen": 0, "reads": 0}

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] += n

    def fail(self, msg: str) -> None:
        with self.lock:
            self.errors.append(msg)
        self.stop.set()

    # ------------------------------------------------------------ setup
    def create(self) -> None:
        rnd = random.Random(self.seed)
        for i in range(WRITERS):
            path = self.m.path(f"V{i}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(fd, VDISK_SIZE)
                # ~6 MiB of data over both map pages, so a clone has data to pace.
                for k in range(24):
                    off = rnd.randrange(0, VDISK_SIZE - 256 * KiB)
                    data = pattern(i, -k - 1, off, 256 * KiB)
                    os.pwrite(fd, data, off)
                    self.models[i].write(off, data)
                os.fsync(fd)
            finally:
                os.close(fd)

    # ------------------------------------------------------------ threads
    def writer(self, i: int) -> None:
        rnd = random.Random(self.seed * 100 + i)
        name = f"V{i}"
        path = self.m.path(name)
        model = self.models[i]
        seq = nclones = 0
        cancel_at = -1
        fd = os.open(path, os.O_RDWR)
        try:
            while not self.stop.is_set():
                seq += 1
                r = rnd.random()
                if r < 0.80:
                    n = rnd.choice([512, 4096, 4096, 65536, 100_000, 256 * KiB])
                    off = rnd.randrange(0, model.size + 64 * KiB)
                    if rnd.random() < 0.5:
                        off -= off % 4096
                    data = pattern(i, seq, off, n)
                    assert os.pwrite(fd, data, off) == n
                    model.write(off, data)
                    self.count("writes")
                elif r < 0.85:
                    if rnd.random() < 0.4:         # a discard or write-zeroes, as from a guest
                        off = rnd.randrange(0, model.size)
                        n = rnd.choice([4096, BS, 3 * BS + 512, rnd.randrange(1, 8 * MiB)])
                        fallocate(fd, rnd.choice([FALLOC_PUNCH, FALLOC_ZERO_KEEP]), off, n)
                        model.write(off, bytes(min(n, model.size - off)))  # KEEP_SIZE
                        self.count("punches")
                    else:
                        os.fsync(fd)
                        self.count("fsyncs")
                elif r < 0.88:
                    size = rnd.randrange(VDISK_SIZE - 10 * MiB, VDISK_SIZE + 1)
                    os.ftruncate(fd, size)
                    model.truncate(size)
                    self.count("truncates")
                elif r < 0.95:
                    with self.lock:
                        busy = self.open_clones[i] >= MAX_OPEN_CLONES
                    if not busy:
                        self.clone(i, nclones := nclones + 1)
                        if rnd.random() < 0.3:      # cancel this one a few ops later
                            cancel_at = seq + rnd.randrange(1, 30)
                else:
                    off = rnd.randrange(0, model.size)
                    got = os.pread(fd, 128 * KiB, off)
                    assert got == model.read(off, 128 * KiB), f"V{i}: read-back at {off}"
                    self.count("reads")
                if seq == cancel_at:
                    e = ctl_command(self.m, f"cancel {name}")
                    if e not in (0, errno.ENOENT):
                        self.fail(f"cancel {name}: {errno.errorcode.get(e, e)}")
                        return
                    self.count("cancel_ok" if e == 0 else "cancel_enoent")
                    if e == 0:
                        self.check_cancelled(name)
        except Exception as e:  # noqa: BLE001 — reported by the main thread
            self.fail(f"writer V{i} at op {seq}: {e!r}")
        finally:
            os.close(fd)

    def clone(self, i: int, n: int) -> None:
        name, dst = f"V{i}", f"V{i}_c{n}"
        e = ctl_command(self.m, f"{name} {dst}")
        assert e == 0, f"clone {name} {dst}: {errno.errorcode[e]}"
        # The clone point: everything this thread wrote so far, nothing after.
        with self.lock:
            self.snapshots[dst] = (i, self.models[i].snapshot())
            self.open_clones[i] += 1
        self.count("clones")

    def check_cancelled(self, name: str) -> None:
        """Right after ``cancel NAME`` returned: its cancelled clones are gone for good (the
        command returns once the names are invalidated in the kernel)."""
        for src, dst, state in status_rows(self.m):
            if src == name and state == "Cancelled":
                try:
                    os.stat(self.m.path(dst))
                    raise AssertionError(f"cancelled {dst} can be stat'ed after the "
                                         f"cancel returned")
                except FileNotFoundError:
                    pass
                try:
                    os.open(self.m.path(dst), os.O_RDONLY)
                    raise AssertionError(f"cancelled {dst} can be opened")
                except FileNotFoundError:
                    pass

    def janitor(self) -> None:
        rnd = random.Random(self.seed + 7)
        deadline = None
        try:
            while not self.stop.is_set() or self._unsettled():
                if self.stop.is_set():
                    deadline = deadline or time.monotonic() + 90
                    assert time.monotonic() < deadline, "clones still unsettled after 90 s"
                for src, dst, state in status_rows(self.m):
                    if dst in self.settled:
                        continue
                    if state not in FINAL:
                        self._check_busy(src, dst)
                        continue
                    with self.lock:
                        snap = self.snapshots.get(dst)
                    if snap is None:
                        continue   # the writer has not recorded it yet: next round
                    self.settle(src, dst, state, snap[1], delete=rnd.random() < 0.75)
                time.sleep(0.01)
        except Exception as e:  # noqa: BLE001
            self.fail(f"janitor: {e!r}")

    def _unsettled(self) -> bool:
        with self.lock:
            return any(d not in self.settled for d in self.snapshots)

    def _check_busy(self, src: str, dst: str) -> None:
        """A clone in progress cannot be opened (EBUSY); if it opens, it has Completed."""
        try:
            fd = os.open(self.m.path(dst), os.O_RDONLY)
        except OSError as e:
            if e.errno == errno.EBUSY:
                self.count("ebusy_seen")
                return
            assert e.errno == errno.ENOENT, f"open {dst} while running: {e!r}"
            return   # cancelled meanwhile
        os.close(fd)
        state = [r[2] for r in status_rows(self.m) if r[1] == dst]
        assert state == ["Completed"], f"{dst} opened while its row says {state}"

    def settle(self, src: str, dst: str, state: str, snap: Model, delete: bool) -> None:
        i = int(src[1:])
        assert state in ("Completed", "Cancelled"), f"clone {src} -> {dst} ended {state}"
        if state == "Completed":
            compare(self.m.path(dst), snap, f"clone {dst} of {src}")
            self.count("verified")
            if delete:
                os.unlink(self.m.path(dst))
                self.count("deleted")
            else:
                with self.lock:
                    self.kept.add(dst)
        else:
            # (A stat here could still be answered from the kernel's attribute cache while
            # the cancel command is finishing; the writer checks that after it returned.)
            assert dst not in os.listdir(self.m.mnt), f"cancelled {dst} is still listed"
        with self.lock:
            self.settled[dst] = state
            self.open_clones[i] -= 1

    def run(self, seconds: float) -> None:
        threads = [threading.Thread(target=self.writer, args=(i,), name=f"writer{i}")
                   for i in range(WRITERS)]
        threads.append(threading.Thread(target=self.janitor, name="janitor"))
        for t in threads:
            t.start()
        self.stop.wait(seconds)
        self.stop.set()
        for t in threads:
            t.join(120)
            assert not t.is_alive(), f"{t.name} hangs"

    # ------------------------------------------------------------ checks
    def verify_all(self, what: str) -> None:
        for i, model in enumerate(self.models):
            compare(self.m.path(f"V{i}"), model, f"{what}: VDisk V{i}")
        for dst in sorted(self.kept):
            compare(self.m.path(dst), self.snapshots[dst][1], f"{what}: clone {dst}")
        expected = {".ctl"} | {f"V{i}" for i in range(WRITERS)} | self.kept
        assert set(os.listdir(self.m.mnt)) == expected, what


def test_writers_and_clones(new_mount):
    m = new_mount.start("--clone-speed", "32M", "--chunk-size", "64K")
    seed = random.randrange(1 << 30)
    s = Stress(m, seed)
    s.create()
    s.run(RUN_SECONDS)
    assert not s.errors, f"seed {seed}: " + "\n".join(s.errors) + \
        f"\n{daemon_log(m.pool, must_exist=True)[-3000:]}"

    # Every clone ended and was settled: Completed or Cancelled, never Error.
    rows = status_rows(m)
    assert all(r[2] in FINAL for r in rows), rows
    assert set(s.settled) == set(s.snapshots), "clones the janitor never saw end"
    assert not [r for r in rows if r[2] == "Error"], rows
    completed = [d for d, st in s.settled.items() if st == "Completed"]
    assert completed, f"no clone completed: {s.stats}"
    assert s.stats["writes"] > 100 and s.stats["punches"] > 5, s.stats

    s.verify_all("after the run")
    assert ctl_command(m, "purge") == 0
    assert status_rows(m) == []

    m.stop()
    fsck_clean(m.pool)
    log = daemon_log(m.pool, must_exist=True)
    assert "unexpected error" not in log and "Traceback" not in log, log[-4000:]

    m.start()
    s.verify_all("after a remount")
    print(f"seed {seed}: {s.stats}; cancelled {len(s.snapshots) - len(completed)}")
