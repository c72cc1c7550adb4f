"""Power-loss harness: cut the power under a vdiskfs pool and check what survives.

The method (xfstests' ``godown``): the pool lives on its own ext4 image, loop-mounted with
``commit=600`` so that the backing filesystem's journal commits only when someone fsyncs.
While I/O runs through vdiskfs, ``FS_IOC_SHUTDOWN`` with ``FS_GOING_FLAGS_NOLOGFLUSH`` is
issued on the backing mount: from that instant every write to the backing filesystem fails
and nothing more reaches the image, as if the power had gone (what ext4 had not committed
is lost). Then the daemon is killed with SIGKILL, the dead FUSE mount is lazily unmounted,
the backing ext4 is unmounted and loop-mounted again (ext4 replays its journal),
``vdiskfs fsck`` must find the pool clean, vdiskfs must mount it, and the data must be
what the model in this process says it may be.

The model (``DiskModel``) records every write this process made to a VDisk and which of
them were acknowledged as durable: by a successful fsync/fdatasync of the VDisk (covers
the writes made before the call) or by an O_DSYNC write returning. Every written sector
carries a header naming its VDisk (tag), its write (seq) and its offset, so a wrong sector
says where it came from. After the cut, each 512-byte sector must hold

  * the data of the newest acknowledged write to it (zeros if none), or
  * the data of a write to it that came after that one (not acknowledged: it may or may
    not have reached the disk),

and nothing else: not older data (lost acknowledged data), not another VDisk's data, not
garbage. Writes are 512-byte aligned, so a sector is never shared between writes.

Only an acknowledgement that returned *before* the cut counts. A real power loss
acknowledges nothing afterwards, but FS_IOC_SHUTDOWN does not stop calls already in the
kernel: an fdatasync in flight may return 0 after the shutdown although the journal
transaction it waited for was aborted and never written (jbd2_complete_transaction()
returns 0 for a transaction the shutdown's abort already retired without checking the
abort). Counting those would blame vdiskfs for the simulation's own loss.

Why sectors and not chunks: an unacknowledged write into a chunk its VDisk owns alone is a
plain ``pwrite`` in place (ARCHITECTURE.md, write path step 2), and pages are written
back in any order, so after a crash such a chunk may hold part of the new write, as a
region of any regular file may. A sector that is a byte-wise mixture of its allowed
values (a page copied while it was being written) is accepted too and counted as torn;
chunks whose sectors are not all as of one instant of the write history are counted too
("chunk not as of one instant": allowed, reported).

To make unacknowledged data actually reach the disk (otherwise, with commit=600, almost
nothing written without an fsync would), workloads close files (the kernel hands its
dirty pages to the daemon) and fdatasync the pool's chunk-data file from this process
(``Writer.writeback``: the page writeback the kernel may do at any moment), and some cuts
are timed to land inside a daemon commit (``Rig.wait_syncing``: the daemon's thread is in
fdatasync of POOL/data or POOL/journal, seen in /proc/PID/task/*/syscall).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import itertools
import os
import platform
import random
import shutil
import signal
import struct
import threading
import time
import traceback
from array import array
from collections import Counter, deque
from typing import Callable, Iterable

from support.common import Mount, fallocate, fsck_clean, is_mounted, loop_devices_of, run

KiB = 1 << 10
MiB = 1 << 20

# <linux/fs.h>: FS_IOC_SHUTDOWN = _IOR('X', 125, __u32); FS_GOING_FLAGS_NOLOGFLUSH = 2
# ("don't flush the log"). xfstests' src/godown.c uses the same call.
FS_IOC_SHUTDOWN = 0x8004587D
FS_GOING_FLAGS_NOLOGFLUSH = 2

SECTOR = 512
MAGIC = b"PLw1"
HEADER = struct.Struct("<4sIQQ")      # magic, VDisk tag, write seq, byte offset in VDisk
IMAGE_SIZE = 1 << 30                  # sparse backing image
BACKING_OPTS = ("commit=600",)        # the backing journal commits only on fsync


# fsync, fdatasync syscall numbers (to see the daemon in the middle of a commit)
SYNC_SYSCALLS = {"x86_64": (74, 75), "aarch64": (82, 83), "riscv64": (82, 83)}


def power_cut(path: str) -> None:
    """Shut the filesystem holding ``path`` down without flushing its journal."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", FS_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def write_back_range(fd: int, off: int, n: int) -> None:
    """sync_file_range(2): the kernel writes back the dirty pages of [off, off+n) only
    (through FUSE: hands them to the daemon as WRITEs; no fsync), and waits."""
    if _libc.sync_file_range(fd, off, n, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE
                             | SYNC_FILE_RANGE_WAIT_AFTER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def payload(tag: int, seq: int, off: int, length: int) -> bytes:
    """The data of write ``seq`` to the VDisk tagged ``tag``: random bytes, every sector
    stamped with (tag, seq, offset) so that its origin can be told."""
    assert off % SECTOR == 0 and length % SECTOR == 0 and length > 0
    data = bytearray(random.Random((tag << 40) ^ seq).randbytes(length))
    for p in range(0, length, SECTOR):
        HEADER.pack_into(data, p, MAGIC, tag, seq, off + p)
    return bytes(data)


# ---------------------------------------------------------------- the model
class Report:
    """What the check of one VDisk found."""

    def __init__(self, name: str):
        self.name = name
        self.counts: Counter = Counter()   # lost, foreign, garbage; newer, torn (accepted)
        self.runs: list[list] = []         # [kind, first sector, last sector, holds, expected]
        self.mixed: list[int] = []         # chunks not as of one instant (examples)
        self.mixed_text: list[str] = []

    def bad(self, kind: str, s: int, holds: str, expected: str) -> None:
        """Sector ``s`` is wrong; runs of like sectors are reported as one range."""
        self.counts[kind] += 1
        last = self.runs[-1] if self.runs else None
        if last and last[0] == kind and last[2] == s - 1 and _like(last[3], holds):
            last[2] = s
        elif len(self.runs) < 12:
            self.runs.append([kind, s, s, holds, expected])

    @property
    def examples(self) -> list[str]:
        out = []
        for kind, a, b, holds, expected in self.runs:
            where = (f"sector {a} (byte {a * SECTOR})" if a == b else
                     f"sectors {a}-{b} (bytes {a * SECTOR}-{(b + 1) * SECTOR - 1})")
            out.append(f"{kind}: {where}: holds {holds}{' ...' if a != b else ''}; "
                       f"expected {expected}{' ...' if a != b else ''}")
        return out

    ACCEPTED = ("newer", "torn", "chunk not as of one instant")

    @property
    def failures(self) -> int:
        return sum(n for k, n in self.counts.items() if k not in self.ACCEPTED)

    @property
    def ok(self) -> bool:
        return self.failures == 0

    def __str__(self) -> str:
        counts = ", ".join(f"{k}={n}" for k, n in sorted(self.counts.items())) or "all as fsynced"
        text = f"{self.name}: {counts}"
        return text + "".join(f"\n    {e}" for e in self.examples + self.mixed_text)


class DiskModel:
    """Expected contents of one VDisk: the acknowledged (durable) image plus, per sector,
    the later writes that may or may not have reached the disk."""

    def __init__(self, name: str, tag: int, size: int, base: bytes | None = None,
                 chunk_size: int = 64 * KiB):
        assert size % SECTOR == 0
        self.name = name
        self.tag = tag
        self.size = size
        self.chunk_size = chunk_size
        self.durable = bytearray(base) if base is not None else bytearray(size)
        assert len(self.durable) == size
        self._reset()

    def _reset(self) -> None:
        nsec = self.size // SECTOR
        self.dseq = array("Q", bytes(8 * nsec))     # seq of the durable write per sector
        self.pending: dict[int, list[int]] = {}     # sector -> later (unacked) write seqs
        self.writes: dict[int, tuple[int, bytes]] = {}   # seq -> (offset, data)
        self.refs: dict[int, int] = {}              # seq -> sectors still naming it
        self.unacked: dict[int, None] = {}          # in order, awaiting a sync

    @property
    def clean(self) -> bool:
        """Nothing written since the last acknowledgement."""
        return not self.pending

    def record(self, seq: int, off: int, data: bytes) -> None:
        """Write ``seq`` is about to be issued (recorded first: a write interrupted by the
        cut may still have reached the disk)."""
        n = len(data) // SECTOR
        assert off % SECTOR == 0 and len(data) % SECTOR == 0 and n
        assert 0 <= off and off + len(data) <= self.size, (self.name, off, len(data))
        self.writes[seq] = (off, data)
        self.refs[seq] = n
        pend = self.pending
        s0 = off // SECTOR
        for s in range(s0, s0 + n):
            lst = pend.get(s)
            if lst is None:
                pend[s] = [seq]
            else:
                lst.append(seq)
        self.unacked[seq] = None

    def ack(self, seqs: Iterable[int]) -> None:
        """These writes are durable now (a sync covering them succeeded)."""
        for seq in seqs:
            self.unacked.pop(seq, None)
            w = self.writes.get(seq)
            if w is None:
                continue    # every sector of it was overwritten by a durable write already
            off, data = w
            s0 = off // SECTOR
            for i in range(len(data) // SECTOR):
                s = s0 + i
                if seq > self.dseq[s]:
                    self.dseq[s] = seq
                    self.durable[s * SECTOR:(s + 1) * SECTOR] = data[i * SECTOR:(i + 1) * SECTOR]
                lst = self.pending.get(s)
                if lst:
                    d = self.dseq[s]
                    keep = [q for q in lst if q > d]
                    for q in lst:
                        if q <= d:
                            self._unref(q)
                    if keep:
                        self.pending[s] = keep
                    else:
                        del self.pending[s]

    def ack_all(self) -> None:
        self.ack(list(self.unacked))

    def _unref(self, seq: int) -> None:
        n = self.refs[seq] - 1
        if n:
            self.refs[seq] = n
        else:
            del self.refs[seq]
            del self.writes[seq]

    def _piece(self, seq: int, s: int) -> bytes:
        off, data = self.writes[seq]
        i = s - off // SECTOR
        return data[i * SECTOR:(i + 1) * SECTOR]

    def check(self, got: bytes, tag_names: dict[int, str]) -> Report:
        rep = Report(self.name)
        if len(got) != self.size:
            rep.bad("size", f"{len(got)} bytes, expected {self.size}")
            return rep
        block = 64 * KiB
        mgot, mdur = memoryview(got), memoryview(self.durable)
        touched: set[int] = set()     # chunks holding data newer than acknowledged
        for b in range(0, self.size, block):
            if mgot[b:b + block] == mdur[b:b + block]:
                continue   # the durable image is always allowed
            for s in range(b // SECTOR, min(b + block, self.size) // SECTOR):
                g = bytes(mgot[s * SECTOR:(s + 1) * SECTOR])
                d = bytes(mdur[s * SECTOR:(s + 1) * SECTOR])
                if g == d:
                    continue
                cands = [self._piece(q, s) for q in self.pending.get(s, ())]
                if g in cands:
                    rep.counts["newer"] += 1
                    touched.add(s * SECTOR // self.chunk_size)
                elif cands and _mixture(g, [d] + cands):
                    rep.counts["torn"] += 1
                    touched.add(s * SECTOR // self.chunk_size)
                else:
                    kind, what = self._classify(g, s, tag_names)
                    expect = (f"write #{self.dseq[s]}" if self.dseq[s] else
                              "zeros" if not any(d) else
                              "the data of the last check (or of the clone point)")
                    later = f" or one of writes {self.pending[s]}" if s in self.pending else ""
                    rep.bad(kind, s, what, expect + later)
        if rep.ok:
            for c in sorted(touched):
                if not self._one_instant(mgot, c):
                    rep.counts["chunk not as of one instant"] += 1
                    if len(rep.mixed) < 4:
                        rep.mixed.append(c)
                        rep.mixed_text.append(self._describe_chunk(mgot, c))
        return rep

    def _describe_chunk(self, got: memoryview, c: int) -> str:
        """Which write each run of sectors of chunk ``c`` shows, and the writes to it."""
        spc = self.chunk_size // SECTOR
        first, end = c * spc, min((c + 1) * spc, self.size // SECTOR)
        shown = []
        for s in range(first, end):
            g = got[s * SECTOR:(s + 1) * SECTOR]
            v = "acked" if g == self.durable[s * SECTOR:(s + 1) * SECTOR] else next(
                (f"#{q}" for q in self.pending.get(s, ()) if self._piece(q, s) == g), "?")
            if shown and shown[-1][0] == v and shown[-1][2] == s - 1:
                shown[-1][2] = s
            else:
                shown.append([v, s, s])
        seqs = sorted({q for s in range(first, end) for q in self.pending.get(s, ())})
        writes = [f"#{q} sectors {max(self.writes[q][0] // SECTOR, first) - first}-"
                  f"{min((self.writes[q][0] + len(self.writes[q][1])) // SECTOR, end) - 1 - first}"
                  for q in seqs]
        runs = ", ".join(f"{a - first}-{b - first}: {v}" for v, a, b in shown)
        return f"chunk {c}: shows [{runs}]; unacked writes to it: {', '.join(writes)}"

    def _one_instant(self, got: memoryview, c: int) -> bool:
        """Is chunk ``c`` as the writes left it at one instant (after the acknowledged
        ones, between two unacknowledged ones)? Not required of unsynced in-place writes
        (the kernel writes pages back in any order), only counted."""
        spc = self.chunk_size // SECTOR
        first, end = c * spc, min((c + 1) * spc, self.size // SECTOR)
        seqs = sorted({q for s in range(first, end) for q in self.pending.get(s, ())})
        for t in [0] + seqs:           # the instant just after write t
            for s in range(first, end):
                q = max((q for q in self.pending.get(s, ()) if q <= t), default=0)
                want = self._piece(q, s) if q else self.durable[s * SECTOR:(s + 1) * SECTOR]
                if got[s * SECTOR:(s + 1) * SECTOR] != want:
                    break
            else:
                return True
        return False

    def _classify(self, g: bytes, s: int, tag_names: dict[int, str]) -> tuple[str, str]:
        if not any(g):
            return "lost", "zeros"
        magic, tag, seq, off = HEADER.unpack_from(g)
        if magic != MAGIC:
            return "garbage", f"unrecognisable bytes {g[:16].hex()}..."
        who = tag_names.get(tag, f"tag {tag}")
        where = "" if off == s * SECTOR else f" meant for byte {off}"
        if tag == self.tag:
            return "lost", f"older write #{seq} of this VDisk{where}"
        return "foreign", f"write #{seq} of {who}{where}"

    def rebase(self, got: bytes) -> None:
        """After a verified recovery what was read back is the durable state."""
        self.durable = bytearray(got)
        self._reset()


def _like(a: str, b: str) -> bool:
    """Two descriptions of wrong sectors from the same source (same write or zeros)."""
    return a.split(" meant for")[0] == b.split(" meant for")[0]


def _mixture(g: bytes, cands: list[bytes]) -> bool:
    return all(any(c[i] == x for c in cands) for i, x in enumerate(g))


# ---------------------------------------------------------------- the backing filesystem + mount
def _wait(pred: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _alive(pid: int) -> bool:
    """Does any thread of ``pid`` still run? (A process whose main thread is a zombie may
    still have a thread exiting, and with it the open files of the pool.)"""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return True
        except OSError:
            pass
    return False


class Verdict:
    def __init__(self, reports: list[Report], problems: list[str]):
        self.reports = reports
        self.problems = problems          # listing/size/open problems

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.ok for r in self.reports)

    def count(self, kind: str) -> int:
        return sum(r.counts[kind] for r in self.reports)

    def __str__(self) -> str:
        return "\n".join(self.problems + [str(r) for r in self.reports])


class Rig:
    """A pool on its own loop-mounted ext4 image, a vdiskfs mount of it, and the models of
    its VDisks. ``cut`` → ``crash`` → ``recover`` → ``verify`` is one power loss."""

    def __init__(self, root: str, kmounts, chunk_size: int, opts: Iterable[str] = (),
                 label: str = ""):
        self.root = str(root)
        os.makedirs(self.root, exist_ok=True)
        self.kmounts = kmounts
        self.image = os.path.join(self.root, "backing.img")
        self.backing = os.path.join(self.root, "backing")
        self.pool = os.path.join(self.backing, "pool")
        self.mnt = os.path.join(self.root, "mnt")
        self.data_file = os.path.join(self.pool, "data")     # chunk slots (cow/layout.py)
        self.mount = Mount(self.pool, self.mnt)
        self.chunk_size = chunk_size
        self.opts = list(opts)
        self.label = label or os.path.basename(self.root)
        self.models: dict[str, DiskModel] = {}
        self.maybe: dict[str, DiskModel] = {}    # may or may not exist after a cut
        self.optional: set[str] = set()          # names whose presence is not checked
        self.absent: set[str] = set()            # names that must not exist
        self.tag_names: dict[int, str] = {}
        self._seq = itertools.count(1)
        self._tags = itertools.count(1)
        self._seq_lock = threading.Lock()
        self.cut_event = threading.Event()
        self.cut_time = self.cut_done = 0.0
        self.cuts = 0
        self.notes: list[str] = []
        # (time, op, VDisk, seq or None, offset, length) of every write and sync of the
        # current cycle: a failure prints the history of the sectors it is about.
        self.history: deque = deque(maxlen=200_000)

    def log(self, op: str, name: str, seq: int | None = None, off: int = 0,
            n: int = 0) -> None:
        self.history.append((time.monotonic(), op, name, seq, off, n))

    def history_of(self, name: str, first: int, last: int, limit: int = 40) -> str:
        """The writes to bytes [first, last] of ``name`` and the syncs of it after the
        first of them, up to the cut."""
        lines, started = [], False
        for t, op, vd, seq, off, n in self.history:
            if vd != name:
                continue
            if op.endswith("write") and off <= last and off + n > first:
                started = True
            elif not started or op.endswith("write"):
                continue
            rel = t - self.cut_time if self.cut_time else t
            lines.append(f"      {rel:+.4f}s {op} {f'#{seq} ' if seq else ''}"
                         f"{f'[{off}, {off + n})' if n else ''}")
        if len(lines) > limit:
            lines = lines[:limit // 2] + ["      ..."] + lines[-limit // 2:]
        if self.cut_time:
            lines.append(f"      (the shutdown ioctl was issued at +0.0000s and returned at "
                         f"{self.cut_done - self.cut_time:+.4f}s)")
        return "\n".join(lines)

    # ------------------------------------------------------------ setup
    def create(self) -> "Rig":
        run(["truncate", "-s", str(IMAGE_SIZE), self.image])
        # No lazy init: no kernel thread writing to the image behind the test's back.
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
             self.image])
        self.mount_backing()
        os.makedirs(self.pool)
        self.mount.start("--chunk-size", str(self.chunk_size), *self.opts)
        return self

    def mount_backing(self) -> None:
        self.kmounts.loop_mount(self.image, self.backing, *BACKING_OPTS)

    def path(self, name: str) -> str:
        return os.path.join(self.mnt, name)

    def next_seq(self) -> int:
        with self._seq_lock:
            return next(self._seq)

    def new_vdisk(self, name: str, size: int) -> DiskModel:
        fd = os.open(self.path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.add_model(name, size)

    def add_model(self, name: str, size: int, base: bytes | None = None) -> DiskModel:
        tag = next(self._tags)
        self.tag_names[tag] = name
        m = DiskModel(name, tag, size, base, self.chunk_size)
        self.models[name] = m
        return m

    def clone_model(self, name: str, src: DiskModel) -> DiskModel:
        """The model of a clone of ``src`` taken now (``src`` must be fully synced)."""
        assert src.clean, f"{src.name} has unsynced writes: the clone point is not exact"
        tag = next(self._tags)
        self.tag_names[tag] = name
        return DiskModel(name, tag, src.size, bytes(src.durable), self.chunk_size)

    # ------------------------------------------------------------ control files
    def ctl(self, command: str) -> None:
        """``echo COMMAND > MNT/.ctl/clone``; returns once the command is durable."""
        fd = os.open(os.path.join(self.mnt, ".ctl", "clone"), os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, command.encode() + b"\n")
        finally:
            os.close(fd)

    def status(self) -> list[list[str]]:
        with open(os.path.join(self.mnt, ".ctl", "status")) as f:
            return [line.split() for line in f.read().splitlines()[1:]]

    def clone_state(self, src: str, dst: str) -> str | None:
        rows = [r for r in self.status() if r[:2] == [src, dst]]
        return rows[-1][2] if rows else None

    def wait_clone(self, src: str, dst: str, timeout: float = 120) -> str | None:
        state = None

        def ended() -> bool:
            nonlocal state
            state = self.clone_state(src, dst)
            return state is None or not state.endswith("%")
        assert _wait(ended, timeout, 0.05), f"clone {src} -> {dst} still {state}"
        return state

    # ------------------------------------------------------------ the power cut
    def cut(self) -> None:
        self.cut_time = time.monotonic()
        self.cut_event.set()       # writers: errors from now on are expected
        power_cut(self.backing)
        self.cut_done = time.monotonic()
        self.cuts += 1

    def syncing(self) -> str | None:
        """The pool file (``data``, ``journal``, ...) the daemon is fsyncing right now."""
        pid = self.mount.pid
        nrs = SYNC_SYSCALLS.get(platform.machine(), ())
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return None
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                    fields = f.read().split()
                if not fields or not fields[0].isdigit() or int(fields[0]) not in nrs:
                    continue
                target = os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}")
            except (OSError, ValueError, IndexError):
                continue
            if os.path.dirname(target) == self.pool:
                return os.path.basename(target)
        return None

    def wait_syncing(self, name: str, timeout: float) -> bool:
        """Wait (polling, a few µs a look) until the daemon fsyncs POOL/``name``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.syncing() == name:
                return True
        return False

    def kill_daemon(self) -> None:
        """SIGKILL the daemon this rig started (if it still runs)."""
        pid = self.mount.pid
        if pid and _alive(pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                cmd = []
            if b"vdiskfs" in cmd and self.pool.encode() in cmd:   # ours, not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                assert _wait(lambda: not _alive(pid), 30), f"daemon {pid} survived SIGKILL"
        self.mount.pid = None

    def crash(self) -> None:
        """After the cut: kill the daemon, drop the FUSE mount, unmount the backing fs."""
        self.kill_daemon()
        if is_mounted(self.mnt):
            run(["umount", "-l", self.mnt], check=False)
        self.umount_backing(lazy_ok=False)

    def umount_backing(self, lazy_ok: bool = True) -> None:
        if self.backing in self.kmounts.mounts:
            for _ in range(50):       # a process that just died may take a moment
                proc = run(["umount", self.backing], check=False)
                if proc.returncode == 0 or "busy" not in proc.stderr:
                    break
                time.sleep(0.1)
            if proc.returncode:
                users = run(["fuser", "-vm", self.backing], check=False)
                run(["umount", "-l", self.backing], check=False)
            self.kmounts.mounts.remove(self.backing)
            if proc.returncode:
                assert lazy_ok, (f"backing fs busy at umount: {proc.stderr.strip()}\n"
                                 f"{users.stdout}{users.stderr}")
        if not _wait(lambda: not loop_devices_of(self.image), 30):
            for dev in loop_devices_of(self.image):   # only ours: they back our image
                run(["losetup", "-d", dev], check=False)
            assert lazy_ok, f"loop device of {self.image} not released"

    def recover(self, *opts: str, inspect: Callable[[], None] | None = None) -> str:
        """Remount the backing fs (ext4 replays its journal), fsck the pool, mount it.
        ``inspect`` runs on the pool files before anything else touches them."""
        self.mount_backing()
        self.keep_metadata()
        if inspect is not None:
            inspect()
        report = fsck_clean(self.pool)
        self.mount.start(*(opts if opts else self.opts))
        self.cut_event = threading.Event()
        return report

    def keep_metadata(self) -> None:
        """Copy the pool's metadata as the power cut left it (before the mount replays or
        cuts anything) to ROOT/after-last-cut/, for the post-mortem of a failure."""
        dest = os.path.join(self.root, "after-last-cut")
        os.makedirs(dest, exist_ok=True)
        for name in os.listdir(self.pool):
            if name not in ("data", "lock"):
                shutil.copy2(os.path.join(self.pool, name), os.path.join(dest, name))

    def restart(self, *opts: str) -> None:
        """Clean unmount, fsck, mount again (with other options)."""
        self.mount.stop()
        fsck_clean(self.pool)
        self.mount.start(*opts)

    def finish(self) -> None:
        """End of a test: clean unmount, fsck, unmount and e2fsck the backing image."""
        self.mount.stop()
        fsck_clean(self.pool)
        self.umount_backing(lazy_ok=False)
        proc = run(["e2fsck", "-fn", self.image], check=False)
        assert proc.returncode == 0, f"e2fsck of the backing image:\n{proc.stdout}{proc.stderr}"
        os.remove(self.image)      # all checked: give the space back (soak runs make many)

    def cleanup(self) -> None:
        """Teardown (after a failure too): never raises."""
        try:
            self.mount.cleanup()
        except Exception as e:
            self.notes.append(f"cleanup: {e}")
        try:
            self.kill_daemon()
            if is_mounted(self.mnt):
                run(["umount", "-l", self.mnt], check=False)
            self.umount_backing(lazy_ok=True)
        except Exception as e:
            self.notes.append(f"cleanup: {e}")

    def checkpoint_gen(self) -> int:
        """Generation of the pool's checkpoint (read from the backing fs): the current
        one, or in a cut between the renames of a new generation the previous one."""
        from vdiskfs.cow import codec, layout
        for name in (layout.CHECKPOINT, layout.CHECKPOINT_PREV):
            path = os.path.join(self.pool, name)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    return codec.read_single_record(f.read(), path)["gen"]
        raise FileNotFoundError(f"{self.pool}: no checkpoint")

    def daemon_log(self, lines: int = 40) -> str:
        try:
            with open(os.path.join(self.pool, "daemon.log")) as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no daemon log: {e})"

    # ------------------------------------------------------------ the check
    def check_all(self) -> Verdict:
        listing = set(os.listdir(self.mnt)) - {".ctl"}
        problems = []
        for name in sorted(set(self.models) - listing):
            problems.append(f"{name}: missing after recovery")
        for name in sorted(self.absent & listing):
            problems.append(f"{name}: still listed, but it must be gone")
        unexpected = listing - set(self.models) - set(self.maybe) - self.optional
        for name in sorted(unexpected - self.absent):
            problems.append(f"{name}: listed, but it was never created")
        for name in sorted(self.absent):
            try:
                os.close(os.open(self.path(name), os.O_RDONLY))
                problems.append(f"{name}: opens, but it must be gone")
            except OSError as e:
                if e.errno != errno.ENOENT:
                    problems.append(f"{name}: open gives {errno.errorcode[e.errno]}, "
                                    "expected ENOENT")
        reports = []
        self._read = {}
        for name, model in list(self.models.items()) + list(self.maybe.items()):
            if name not in listing:
                continue
            try:
                got = read_all(self.path(name))
            except OSError as e:
                problems.append(f"{name}: cannot be read: {e}")
                continue
            self._read[name] = got
            reports.append(model.check(got, self.tag_names))
        return Verdict(reports, problems)

    def verify(self, context: str = "") -> Verdict:
        """Check everything against the models; on success the read-back state becomes
        the new durable baseline (and surviving maybe-VDisks become ordinary ones)."""
        v = self.check_all()
        if not v.ok:
            hist = ""
            for rep in v.reports:
                if rep.runs:
                    kind, a, b, _, _ = rep.runs[0]
                    hist += (f"\n--- history of {rep.name} bytes {a * SECTOR}-"
                             f"{(b + 1) * SECTOR - 1} (times relative to the cut) ---\n"
                             + self.history_of(rep.name, a * SECTOR, (b + 1) * SECTOR - 1))
            raise AssertionError(f"[{self.label}{' ' + context if context else ''}] after a "
                                 f"power cut:\n{v}{hist}\n--- daemon log (recovered mount) "
                                 f"---\n{self.daemon_log()}--- pool metadata as the cut left "
                                 f"it: {self.root}/after-last-cut")
        self.history.clear()
        for name, got in self._read.items():
            model = self.models.get(name) or self.maybe.pop(name)
            model.rebase(got)
            self.models[name] = model
        self.maybe.clear()
        return v


def read_all(path: str) -> bytes:
    with open(path, "rb", buffering=0) as f:
        chunks = []
        while True:
            b = f.read(4 * MiB)
            if not b:
                return b"".join(chunks)
            chunks.append(b)


# ---------------------------------------------------------------- the I/O driver
class Stop(Exception):
    pass


class Writer(threading.Thread):
    """Runs ``plan(writer, rng)`` (a loop of the ops below) until stopped or cut. Every op
    updates the models: writes are recorded before they are issued, and acknowledged only
    when the sync (or O_DSYNC write) returned success. An error before the cut is a test
    failure; after it errors are expected and end the plan. Usable without a thread too
    (``run_inline``)."""

    def __init__(self, rig: Rig, plan: Callable[["Writer", random.Random], None],
                 rng: random.Random):
        super().__init__(daemon=True)
        self.rig = rig
        self.plan = plan
        self.rng = rng
        self.stop_event = threading.Event()
        self.fds: dict[tuple[str, bool], int] = {}
        self.error: BaseException | None = None
        self.trace = ""
        self.stats: Counter = Counter()

    # ------------------------------------------------------------ running
    def run(self) -> None:
        try:
            self.plan(self, self.rng)
        except Stop:
            pass
        except OSError as e:
            if not self.rig.cut_event.is_set():
                self.error, self.trace = e, traceback.format_exc()
        except BaseException as e:   # reported by finish()
            self.error, self.trace = e, traceback.format_exc()
        finally:
            self.close_all(quiet=True)

    def run_inline(self) -> None:
        self.run()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise AssertionError(f"I/O failed before the power cut: {self.error!r}\n"
                                 f"{self.trace}")

    def finish(self, timeout: float = 60) -> None:
        self.stop_event.set()
        self.join(timeout)
        if self.is_alive():      # stuck in a request: the daemon's death ends it
            self.rig.kill_daemon()
            self.join(timeout)
        assert not self.is_alive(), "the writer thread did not stop"
        self.raise_error()

    def check(self) -> None:
        if self.stop_event.is_set() or self.rig.cut_event.is_set():
            raise Stop

    def before_cut(self) -> bool:
        """Did the call that just returned return before the power cut was issued? Only
        then does its success count: a real power loss acknowledges nothing afterwards,
        and a sync in flight at FS_IOC_SHUTDOWN may return 0 without being durable
        (jbd2_complete_transaction() does not look at the abort for a transaction the
        shutdown's own abort-commit already retired)."""
        t = time.monotonic()
        return not self.rig.cut_event.is_set() or t < self.rig.cut_time

    # ------------------------------------------------------------ ops
    def _fd(self, model: DiskModel, dsync: bool) -> int:
        key = (model.name, dsync)
        fd = self.fds.get(key)
        if fd is None:
            flags = os.O_RDWR | (os.O_DSYNC if dsync else 0)
            fd = self.fds[key] = os.open(self.rig.path(model.name), flags)
        return fd

    def write(self, model: DiskModel, off: int, length: int, *, dsync: bool = False,
              zero: bool = False) -> None:
        self.check()
        seq = self.rig.next_seq()
        data = bytes(length) if zero else payload(model.tag, seq, off, length)
        model.record(seq, off, data)
        self.rig.log("dsync write" if dsync else "zero write" if zero else "write",
                     model.name, seq, off, length)
        fd = self._fd(model, dsync)
        view = memoryview(data)
        pos = off
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
        self.stats["dsync write" if dsync else "zero write" if zero else "write"] += 1
        self.stats["bytes"] += length
        if dsync:
            if self.before_cut():
                model.ack([seq])
                self.rig.log("dsync write returned", model.name, seq)
            else:
                self.rig.log("dsync write returned after the cut: not counted", model.name,
                             seq)

    def punch(self, model: DiskModel, off: int, length: int, *, mode: int = 3) -> None:
        """fallocate PUNCH_HOLE|KEEP_SIZE (3: discard, fstrim) or ZERO_RANGE|KEEP_SIZE
        (17: write zeroes) of the range: for the model a write of zeros, durable once a
        later sync covers it."""
        self.check()
        seq = self.rig.next_seq()
        model.record(seq, off, bytes(length))
        self.rig.log(f"fallocate mode {mode}", model.name, seq, off, length)
        fallocate(self._fd(model, False), mode, off, length)
        self.stats["punch" if mode == 3 else "zero range"] += 1
        self.stats["bytes punched"] += length

    def sync(self, model: DiskModel, datasync: bool = False) -> None:
        self.check()
        covered = list(model.unacked)
        fd = self._fd(model, False)
        op = "fdatasync" if datasync else "fsync"
        self.rig.log(op, model.name)
        (os.fdatasync if datasync else os.fsync)(fd)
        if not self.before_cut():
            self.rig.log(f"{op} returned after the cut: not counted", model.name)
            self.stats["sync returned after the cut"] += 1
            return
        model.ack(covered)
        self.rig.log(f"{op} returned (acks up to #{covered[-1]})" if covered
                     else f"{op} returned", model.name)
        self.stats["fdatasync" if datasync else "fsync"] += 1

    def flush(self, model: DiskModel) -> None:
        """Close the VDisk's fds: the kernel hands its dirty pages to the daemon (no sync)."""
        self.check()
        for dsync in (False, True):
            fd = self.fds.pop((model.name, dsync), None)
            if fd is not None:
                os.close(fd)
        self.rig.log("flush (close)", model.name)
        self.stats["flush"] += 1

    def writeback(self) -> None:
        """The kernel may write dirty pages back at any moment, without vdiskfs asking:
        make that happen now for the pool's chunk data (fdatasync of POOL/data from this
        process; no vdiskfs commit, no journal record). Data written in place then
        reaches the disk ahead of the metadata, as it may on a real machine."""
        self.check()
        fd = os.open(self.rig.data_file, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self.stats["writeback"] += 1

    def pause(self, seconds: float) -> None:
        self.check()
        self.rig.cut_event.wait(seconds)

    def close_all(self, quiet: bool = False) -> None:
        for key in list(self.fds):
            fd = self.fds.pop(key)
            try:
                os.close(fd)
            except OSError:
                if not quiet:
                    raise


# ---------------------------------------------------------------- workloads
def aligned(rng: random.Random, lo: int, hi: int) -> int:
    """A multiple of SECTOR in [lo, hi]."""
    return rng.randint(-(-lo // SECTOR), hi // SECTOR) * SECTOR


def random_extent(rng: random.Random, size: int, cs: int) -> tuple[int, int]:
    """A sector-aligned (offset, length) inside [0, size): small, chunk-straddling,
    multi-chunk or large, often crossing a chunk boundary."""
    kind = rng.random()
    if kind < 0.35 and size > cs:                   # straddles a chunk boundary
        b = rng.randrange(1, size // cs) * cs
        left = aligned(rng, SECTOR, min(cs, 64 * KiB))
        right = aligned(rng, SECTOR, min(cs, 64 * KiB))
        off, n = b - left, left + right
    elif kind < 0.6:                                # small, sub-page sizes included
        n = rng.choice((512, 1024, 3584, 4096, 4608, 8192, 12800))
        off = aligned(rng, 0, size - n)
    elif kind < 0.9:                                # one to a few chunks
        n = aligned(rng, SECTOR, 3 * cs + SECTOR)
        off = aligned(rng, 0, max(size - n, 0))
    else:                                           # large
        n = aligned(rng, 256 * KiB, MiB)
        off = aligned(rng, 0, max(size - n, 0))
    n = min(n, size - off)
    return off, n


def random_plan(models: list[DiskModel], cs: int, *, p_dsync: float = 0.1,
                p_zero: float = 0.0, p_fsync: float = 0.08, p_fdatasync: float = 0.08,
                p_flush: float = 0.04, p_pause: float = 0.0, p_writeback: float = 0.03,
                p_punch: float = 0.0,
                hot: dict[str, tuple[int, int, float]] | None = None):
    """Random writes (various sizes, straddling chunk boundaries), some O_DSYNC, some whole
    zero chunks (freed by zero detection), some punches and zero ranges (fallocate, as a
    loop device's discard and write-zeroes send them), interleaved with fsync, fdatasync
    and flushes. ``hot``: VDisk name -> (lo, hi, p): with probability p a write to it
    stays in [lo, hi)."""
    hot = hot or {}

    def plan(w: Writer, rng: random.Random) -> None:
        while True:
            m = rng.choice(models)
            region = hot.get(m.name)
            if rng.random() < p_punch:
                off, n = random_extent(rng, m.size, cs)
                if rng.random() < 0.3:                  # a discard of many chunks
                    off = aligned(rng, 0, m.size // 2)
                    n = aligned(rng, SECTOR, m.size - off)
                w.punch(m, off, n, mode=3 if rng.random() < 0.75 else 17)
            elif rng.random() < p_zero and m.size >= cs:
                k = rng.randint(1, min(3, m.size // cs))
                c = rng.randrange(m.size // cs - k + 1)
                w.write(m, c * cs, k * cs, zero=True)
            elif region and rng.random() < region[2]:
                lo, hi = region[0], min(region[1], m.size)
                off, n = random_extent(rng, hi - lo, cs)
                w.write(m, lo + off, n, dsync=rng.random() < p_dsync)
            else:
                off, n = random_extent(rng, m.size, cs)
                w.write(m, off, n, dsync=rng.random() < p_dsync)
            r = rng.random()
            if r < p_fsync:
                w.sync(m)
            elif r < p_fsync + p_fdatasync:
                w.sync(m, datasync=True)
            elif r < p_fsync + p_fdatasync + p_flush:
                w.flush(m)
            if rng.random() < p_writeback:
                w.writeback()
            if rng.random() < p_pause:
                w.pause(rng.uniform(0, 0.05))
    return plan


SEQ_SIZES = (4 * KiB, 3584, 8 * KiB, 64 * KiB, 64 * KiB + 512, 128 * KiB, 512 * KiB, MiB)


def sequential_plan(models: list[DiskModel], *, p_fsync: float = 0.12,
                    p_fdatasync: float = 0.06, p_flush: float = 0.04,
                    p_writeback: float = 0.03):
    """Each VDisk written front to back (wrapping), interleaved, with fsyncs between."""
    def plan(w: Writer, rng: random.Random) -> None:
        cursor = {m.name: 0 for m in models}
        while True:
            m = rng.choice(models)
            n = rng.choice(SEQ_SIZES)
            off = cursor[m.name]
            if off + n > m.size:
                off = 0
            w.write(m, off, n)
            cursor[m.name] = off + n
            r = rng.random()
            if r < p_fsync:
                w.sync(m)
            elif r < p_fsync + p_fdatasync:
                w.sync(m, datasync=True)
            elif r < p_fsync + p_fdatasync + p_flush:
                w.flush(m)
            if rng.random() < p_writeback:
                w.writeback()
    return plan


def fill(rig: Rig, model: DiskModel, rng: random.Random, per_span: int, span: int,
         extent: tuple[int, int] = (16 * KiB, 256 * KiB)) -> None:
    """Put about ``per_span`` bytes of data into every ``span`` of a VDisk, then fsync."""
    def plan(w: Writer, rng: random.Random) -> None:
        for base in range(0, model.size, span):
            done = 0
            while done < per_span:
                n = aligned(rng, *extent)
                off = base + aligned(rng, 0, span - n)
                w.write(model, off, n)
                done += n
        w.sync(model)
    Writer(rig, plan, rng).run_inline()
    assert model.clean
