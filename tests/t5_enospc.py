"""A full backing filesystem (RELIABILITY.md promise 3; SPEC §1-§3).

The pool lives on a small loop-mounted ext4 image. A writer fills it through a VDisk while a
rate-limited clone runs; it must see ENOSPC (at write(), or with the writeback cache at
fsync()/close()). Then, with the disk still full: the mount serves reads (data fsync'd
before reads back exactly), a write that needs new space fails at fsync, metadata stays
consistent and the clone still completes (a clone needs no data space). After space is
freed by truncating and deleting a VDisk, fsync succeeds and writes work again. Then
``vdiskfs umount``, ``vdiskfs fsck`` clean (before the backing image goes), and after a
remount everything fsync'd before and after the episode reads back.

A second test fills the backing filesystem from outside the pool: deleting a VDisk must
still commit (the journal keeps room for that) and return the space.
"""

from __future__ import annotations

import errno
import os

import pytest

from support.common import Mount, daemon_log, fsck_clean, read_file, run, wait_until

pytestmark = [pytest.mark.mount, pytest.mark.loop]

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 64 * KiB
PAGE_SPAN = 1024 * CHUNK          # one map page at 64K chunks
IMAGE_MIB = 80
NOSPACE = (errno.ENOSPC, errno.EIO)


# ---------------------------------------------------------------- helpers
def pread_exact(path: str, off: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def status_rows(m: Mount) -> list[list[str]]:
    with open(os.path.join(m.mnt, ".ctl", "status")) as f:
        lines = f.read().splitlines()
    assert lines[0].split() == ["Source", "Destination", "Progress"], lines
    return [line.split() for line in lines[1:]]


def clone_state(m: Mount, src: str, dst: str) -> str:
    rows = [r[2] for r in status_rows(m) if r[:2] == [src, dst]]
    assert rows, f"no status row {src} {dst}"
    return rows[-1]


def ctl(m: Mount, cmd: str) -> None:
    fd = os.open(os.path.join(m.mnt, ".ctl", "clone"), os.O_WRONLY)
    try:
        os.write(fd, cmd.encode() + b"\n")
    finally:
        os.close(fd)


def backing_free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def write_and_sync(path: str, off: int, data: bytes, *, create: bool = False) -> int:
    """pwrite + fsync + close; returns 0 or the errno of the first step that failed."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o644)
    err = 0
    try:
        os.pwrite(fd, data, off)
        os.fsync(fd)
    except OSError as e:
        err = e.errno
    finally:
        try:
            os.close(fd)
        except OSError as e:
            err = err or e.errno
    return err


class Extents:
    """Expected contents of a VDisk as {offset: bytes} (non-overlapping) plus its size."""

    def __init__(self, size: int):
        self.size = size
        self.parts: dict[int, bytes] = {}

    def put(self, off: int, data: bytes) -> None:
        for o, d in list(self.parts.items()):
            assert off + len(data) <= o or o + len(d) <= off, "test bug: overlapping extents"
        self.parts[off] = data
        self.size = max(self.size, off + len(data))

    def forget(self, off: int) -> None:
        self.parts.pop(off, None)

    def check(self, path: str, what: str) -> None:
        st = os.stat(path)
        assert st.st_size == self.size, f"{what}: size {st.st_size}, expected {self.size}"
        for off, data in sorted(self.parts.items()):
            got = pread_exact(path, off, len(data))
            assert got == data, f"{what}: bytes at {off} (+{len(data)}) differ"


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def small_pool(need_loop, tmp_path, kmounts):
    """A vdiskfs Mount (not started) whose pool is on an 80 MiB ext4 loop mount. Teardown:
    unmount vdiskfs, fsck the pool while the backing fs is still there, then kmounts
    unmounts the image."""
    image = str(tmp_path / "backing.img")
    with open(image, "wb") as f:
        f.truncate(IMAGE_MIB * MiB)
    run(["mkfs.ext4", "-q", "-F", "-m", "0", image])
    backing = kmounts.loop_mount(image, str(tmp_path / "backing"))
    m = Mount(os.path.join(backing, "pool"), str(tmp_path / "mnt"))
    m.backing = backing
    yield m
    m.cleanup()
    hog = os.path.join(backing, "hog")
    if os.path.exists(hog):
        os.unlink(hog)
    if os.path.exists(os.path.join(m.pool, "vdiskfs-pool")):
        fsck_clean(m.pool)


# ---------------------------------------------------------------- the pool fills the disk
def test_enospc_while_cloning_then_recover(small_pool):
    m = small_pool.start("--chunk-size", "64K", "--clone-speed", "1M")
    rnd_keep = os.urandom(4 * MiB)

    # Data fsync'd before the episode.
    keep = Extents(16 * MiB)
    with open(m.path("KEEP"), "wb") as f:
        f.truncate(16 * MiB)
    for i in range(4):
        off = i * 4 * MiB + 12345
        assert write_and_sync(m.path("KEEP"), off, rnd_keep[i * MiB:(i + 1) * MiB]) == 0
        keep.put(off, rnd_keep[i * MiB:(i + 1) * MiB])

    # A clone source with data on four map pages; the clone is paced at 1 MiB/s.
    src = Extents(4 * PAGE_SPAN)
    with open(m.path("SRC"), "wb") as f:
        f.truncate(4 * PAGE_SPAN)
    for p in range(4):
        data = os.urandom(MiB)
        assert write_and_sync(m.path("SRC"), p * PAGE_SPAN + 7 * CHUNK, data) == 0
        src.put(p * PAGE_SPAN + 7 * CHUNK, data)
    ctl(m, "SRC SRCC")

    # Fill the backing filesystem through FILL: 1 MiB writes, fsync every 4 MiB.
    fill = Extents(0)
    fd = os.open(m.path("FILL"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    off = synced = 0
    pending: list[tuple[int, bytes]] = []
    failure = None
    limit = 3 * IMAGE_MIB * MiB
    while off < limit and failure is None:
        data = os.urandom(MiB)
        try:
            os.pwrite(fd, data, off)
            pending.append((off, data))
            off += len(data)
            if off % (4 * MiB) == 0:
                os.fsync(fd)
                for o, d in pending:
                    fill.put(o, d)
                synced, pending = off, []
        except OSError as e:
            failure = ("write/fsync", e.errno)
    if failure is None:
        try:
            os.close(fd)
            fd = -1
        except OSError as e:
            failure = ("close", e.errno)
    assert failure is not None, (f"wrote {off >> 20} MiB to a pool on a {IMAGE_MIB} MiB "
                                 f"filesystem without an error")
    assert failure[1] == errno.ENOSPC, f"the writer saw {failure}, not ENOSPC"
    clone_when_full = clone_state(m, "SRC", "SRCC")
    fill.size = os.stat(m.path("FILL")).st_size   # written but unsynced bytes: unknown

    # --- While the disk is full --------------------------------------------------------
    # Reads are served: everything fsync'd before reads back exactly.
    keep.check(m.path("KEEP"), "KEEP while full")
    src.check(m.path("SRC"), "SRC while full")
    fill.check(m.path("FILL"), f"FILL (first {synced >> 20} MiB fsync'd) while full")
    # Metadata is consistent: names, sizes, status, properties.
    assert sorted(os.listdir(m.mnt)) == [".ctl", "FILL", "KEEP", "SRC", "SRCC"]
    assert os.getxattr(m.path("KEEP"), "user.vdisk.lba_size") == b"512"
    # A write that needs new space fails (at fsync with the writeback cache), again.
    # 2 MiB: more than the failed request left free (the writer's last request reserved
    # up to 1 MiB of slots in one fallocate; a smaller write may still fit).
    hole = 15 * MiB                                        # a hole in KEEP
    err = write_and_sync(m.path("KEEP"), 14 * MiB, os.urandom(2 * MiB))
    assert err in NOSPACE, f"a write into a hole on a full disk gave {errno.errorcode.get(err)}"
    # The clone needs no data space: it completes while the disk is full.
    wait_until(lambda: clone_state(m, "SRC", "SRCC") in ("Completed", "Error", "Cancelled"),
               "the clone to end", timeout=60)
    assert clone_state(m, "SRC", "SRCC") == "Completed", daemon_log(m.pool, tail=60)
    snap = Extents(src.size)
    snap.parts = dict(src.parts)
    snap.check(m.path("SRCC"), "the clone, completed on a full disk")
    # An fsync that fails keeps its records for the next try: nothing of the above is lost.
    keep.check(m.path("KEEP"), "KEEP after failed fsyncs")

    # --- Free space: shrink FILL, then delete it ---------------------------------------
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass          # the close may report the writeback error once more
    half = (synced // 2) // CHUNK * CHUNK
    os.truncate(m.path("FILL"), half)
    for o in [o for o in fill.parts if o + len(fill.parts[o]) > half]:
        fill.forget(o)
    fill.size = half
    # After the shrink is committed its chunks are returned: a write into new space works.
    new1 = os.urandom(256 * KiB)
    wait_until(lambda: write_and_sync(m.path("KEEP"), hole, new1) == 0,
               "an fsync to succeed after shrinking FILL", timeout=30, interval=0.2)
    keep.put(hole, new1)
    fill.check(m.path("FILL"), "FILL after the shrink")
    free_before = backing_free(m.backing)
    os.unlink(m.path("FILL"))
    new2 = os.urandom(MiB)
    assert write_and_sync(m.path("KEEP"), 14 * MiB, new2) == 0
    keep.put(14 * MiB, new2)
    # The delete gives the space back to the backing filesystem (once committed).
    wait_until(lambda: write_and_sync(m.path("KEEP"), 0, b"sync") == 0
               and backing_free(m.backing) > free_before + 8 * MiB,
               "the deleted VDisk's space to come back", timeout=30, interval=0.2)
    keep.put(0, b"sync")
    # Writes work again: a new VDisk of 8 MiB, fsync'd.
    after = Extents(0)
    for i in range(8):
        data = os.urandom(MiB)
        assert write_and_sync(m.path("AFTER"), i * MiB, data, create=True) == 0
        after.put(i * MiB, data)
    after.check(m.path("AFTER"), "AFTER")

    log = daemon_log(m.pool, tail=100000)
    assert "unexpected error" not in log and "Traceback" not in log, log[-4000:]
    m.stop()
    fsck_clean(m.pool)

    m.start()
    for ext, name in [(keep, "KEEP"), (src, "SRC"), (snap, "SRCC"), (after, "AFTER")]:
        ext.check(m.path(name), f"{name} after the remount")
    assert sorted(os.listdir(m.mnt)) == [".ctl", "AFTER", "KEEP", "SRC", "SRCC"]
    print(f"ENOSPC at {failure[0]} after {off >> 20} MiB ({synced >> 20} MiB fsync'd); "
          f"clone was {clone_when_full} when the disk filled")


# ---------------------------------------------------------------- something else fills it
def fill_with_hog(backing: str) -> str:
    """Take every free block of the backing fs with a file outside the pool."""
    hog = os.path.join(backing, "hog")
    fd = os.open(hog, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        block = os.urandom(MiB)
        for size in (MiB, 64 * KiB, 4 * KiB, 1 * KiB):
            while True:
                try:
                    os.write(fd, block[:size])
                    os.fsync(fd)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    finally:
        os.close(fd)
    return hog


def test_delete_frees_space_when_something_else_filled_the_disk(small_pool):
    m = small_pool.start("--chunk-size", "64K")
    keep = Extents(8 * MiB)
    big = os.urandom(16 * MiB)
    with open(m.path("BIG"), "wb") as f:
        f.write(big)
        f.flush()
        os.fsync(f.fileno())
    data = os.urandom(MiB)
    with open(m.path("KEEP"), "wb") as f:
        f.truncate(8 * MiB)
    assert write_and_sync(m.path("KEEP"), MiB, data) == 0
    keep.put(MiB, data)

    hog = fill_with_hog(m.backing)
    # Full: new space cannot be had, reads are served.
    err = write_and_sync(m.path("KEEP"), 4 * MiB, os.urandom(256 * KiB))
    assert err in NOSPACE, f"write into new space on a full disk: {errno.errorcode.get(err)}"
    keep.check(m.path("KEEP"), "KEEP while full")
    assert read_file(m.path("BIG")) == big

    # Deleting a VDisk must still commit on the full disk, and return its space.
    os.unlink(m.path("BIG"))
    free0 = backing_free(m.backing)
    new = os.urandom(256 * KiB)
    wait_until(lambda: write_and_sync(m.path("KEEP"), 4 * MiB, new) == 0,
               "a write to succeed after deleting BIG on a full disk", timeout=30,
               interval=0.2)
    keep.put(4 * MiB, new)
    assert backing_free(m.backing) > free0, "the delete returned no space"
    keep.check(m.path("KEEP"), "KEEP after the delete")
    assert sorted(os.listdir(m.mnt)) == [".ctl", "KEEP"]

    m.stop()
    fsck_clean(m.pool)
    os.unlink(hog)
    m.start()
    keep.check(m.path("KEEP"), "KEEP after the remount")
    log = daemon_log(m.pool, tail=100000)
    assert "unexpected error" not in log and "Traceback" not in log, log[-4000:]


# ---------------------------------------------------------------- a commit that cannot fit
def test_failed_commit_keeps_its_records(small_pool):
    """On a full disk, metadata-only changes fill the journal's reserve until a commit
    fails: fsync reports it (ENOSPC/EIO), nothing is lost, and once space is back the next
    commit makes everything durable (a failed commit keeps its records for the next try)."""
    m = small_pool.start("--chunk-size", "64K")
    keep = Extents(4 * MiB)
    data = os.urandom(MiB)
    with open(m.path("KEEP"), "wb") as f:
        f.truncate(4 * MiB)
    assert write_and_sync(m.path("KEEP"), 0, data) == 0
    keep.put(0, data)
    hog = fill_with_hog(m.backing)

    names: list[str] = []
    failed = 0
    fd = os.open(m.path("KEEP"), os.O_RDONLY)
    try:
        while len(names) < 30000:
            for _ in range(100):
                name = f"M{len(names):05d}-" + "x" * 57
                os.close(os.open(m.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
                names.append(name)
            try:
                os.fsync(fd)
            except OSError as e:
                failed = e.errno
                break
        assert failed in NOSPACE, (f"{len(names)} creates on a full disk and every fsync "
                                   f"succeeded (or failed with {failed})")
        # More of the same is still accepted (in memory) and served.
        for i in range(50):
            name = f"LATE{i:03d}"
            os.close(os.open(m.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            names.append(name)
        assert set(os.listdir(m.mnt)) == {".ctl", "KEEP"} | set(names)
        keep.check(m.path("KEEP"), "KEEP while commits fail")
        # Still short of space: the next fsync fails too.
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno in NOSPACE
        # Space comes back: the next commit carries everything.
        os.unlink(hog)
        wait_until(lambda: _fsync_ok(fd), "an fsync to succeed once space is back",
                   timeout=30, interval=0.2)
    finally:
        os.close(fd)

    m.stop()
    fsck_clean(m.pool)
    m.start()
    assert set(os.listdir(m.mnt)) == {".ctl", "KEEP"} | set(names), "records lost"
    assert os.stat(m.path(names[-1])).st_mode & 0o777 == 0o600
    print(f"a commit failed with {errno.errorcode[failed]} after {len(names) - 50} creates "
          "on the full disk")
    keep.check(m.path("KEEP"), "KEEP after the remount")
    log = daemon_log(m.pool, tail=100000)
    assert "unexpected error" not in log and "Traceback" not in log, log[-4000:]


def _fsync_ok(fd: int) -> bool:
    try:
        os.fsync(fd)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- freed space, at once
def test_space_freed_by_delete_is_usable_at_once(small_pool):
    m = small_pool.start("--chunk-size", "64K")
    big = os.urandom(8 * MiB)
    with open(m.path("BIG"), "wb") as f:
        f.write(big)
        f.flush()
        os.fsync(f.fileno())
    with open(m.path("KEEP"), "wb") as f:
        f.truncate(8 * MiB)
    fill_with_hog(m.backing)
    err = write_and_sync(m.path("KEEP"), 0, os.urandom(256 * KiB))
    assert err in NOSPACE, "precondition: the disk is full"

    os.unlink(m.path("BIG"))     # 8 MiB freed
    err = write_and_sync(m.path("KEEP"), MiB, os.urandom(256 * KiB))
    assert err == 0, (f"write+fsync of 256 KiB right after deleting an 8 MiB VDisk: "
                      f"{errno.errorcode.get(err)}")
