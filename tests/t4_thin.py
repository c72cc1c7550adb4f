"""Thin provisioning through the mount: discard from ext4 guests on loop devices (fstrim,
mkfs.ext4), fallocate punch/zero range against a model with clones, SEEK_DATA/SEEK_HOLE
(dirty pages included), and what an empty petabyte VDisk costs the daemon."""

from __future__ import annotations

import errno
import hashlib
import os
import random

import pytest

from support.clones import ctl_path, follow
from support.common import (allocated, fallocate, fsync_path, read_file, run, sha256_file,
                            vdiskfs, wait_until, write_file)
from support.engine import seek_model

pytestmark = pytest.mark.mount

MiB = 1 << 20
GiB = 1 << 30
CS = 64 << 10                       # the chunk size of these tests' pools
PUNCH, ZERO, KEEP = 0x02, 0x10, 0x01
SEEK_DATA, SEEK_HOLE = os.SEEK_DATA, os.SEEK_HOLE

def data_file_bytes(pool: str) -> int:
    return os.stat(os.path.join(pool, "data")).st_blocks * 512


def clone(m, src: str, dst: str) -> None:
    with open(ctl_path(m.mnt), "w") as f:
        f.write(f"{src} {dst}\n")
    assert follow(m, src, dst, timeout=120)[-1] == "Completed"


@pytest.fixture
def m(new_mount):
    return new_mount.start("--chunk-size", "64K")


def ext4_image(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    run(["mkfs.ext4", "-q", "-F", path])


def trim_after_rm(target: str, name: str) -> str:
    """Delete a file in the guest, let ext4 commit the free, fstrim; fstrim's output."""
    os.unlink(os.path.join(target, name))
    run(["sync", "-f", target])                      # ext4 frees the blocks at commit
    return run(["fstrim", "-v", target]).stdout


def e2fsck_clean(image: str) -> None:
    proc = run(["e2fsck", "-fn", image], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def fill(path: str, n: int, seed: int) -> None:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(n // MiB):
            f.write(rnd.randbytes(MiB))
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------- discard
@pytest.mark.loop
def test_fstrim_in_a_guest_returns_a_deleted_files_space(m, kmounts, tmp_path):
    img = m.path("G")
    ext4_image(img, 1 * GiB)
    target = kmounts.loop_mount(img, str(tmp_path / "g"))
    fill(os.path.join(target, "big"), 200 * MiB, 1)
    run(["sync", "-f", target])
    fsync_path(img)
    alloc0, data0 = allocated(img), data_file_bytes(m.pool)
    assert "trimmed" in trim_after_rm(target, "big")
    fsync_path(img)                                  # the punches commit
    assert alloc0 - allocated(img) >= 0.9 * 200 * MiB
    assert os.stat(img).st_blocks * 512 == allocated(img)
    # Holes in the data file once I/O pauses (fs/puncher.py).
    wait_until(lambda: data0 - data_file_bytes(m.pool) >= 0.9 * 200 * MiB,
               "the data file to give back 180 MiB")
    kmounts.umount(target)
    e2fsck_clean(img)


@pytest.mark.loop
def test_fstrim_in_a_clone_and_in_its_source_leave_the_other_alone(m, kmounts, tmp_path):
    src = m.path("S")
    ext4_image(src, 512 * MiB)
    target = kmounts.loop_mount(src, str(tmp_path / "s"))
    fill(os.path.join(target, "a"), 64 * MiB, 2)
    fill(os.path.join(target, "b"), 64 * MiB, 3)
    kmounts.umount(target)
    clone(m, "S", "C")
    s_sum, s_alloc = sha256_file(src), allocated(src)
    # The clone deletes a and trims: its space goes, the source keeps its data.
    target = kmounts.loop_mount(m.path("C"), str(tmp_path / "c"))
    trim_after_rm(target, "a")
    c_files = read_file(os.path.join(target, "b"))
    kmounts.umount(target)
    fsync_path(m.path("C"))
    assert allocated(m.path("C")) <= s_alloc - 0.9 * 64 * MiB
    assert sha256_file(src) == s_sum and allocated(src) == s_alloc
    c_sum = sha256_file(m.path("C"))
    # The other way round.
    target = kmounts.loop_mount(src, str(tmp_path / "s"))
    trim_after_rm(target, "b")
    kmounts.umount(target)
    assert sha256_file(m.path("C")) == c_sum
    target = kmounts.loop_mount(m.path("C"), str(tmp_path / "c"))
    assert read_file(os.path.join(target, "b")) == c_files
    kmounts.umount(target)
    for img in (src, m.path("C")):
        e2fsck_clean(img)


@pytest.mark.loop
def test_fstrim_on_a_source_while_its_clone_runs_leaves_the_clone_exact(new_mount, kmounts,
                                                                       tmp_path):
    m = new_mount.start("--chunk-size", "64K", "--clone-speed", "16M")
    src = m.path("S")
    ext4_image(src, 512 * MiB)
    target = kmounts.loop_mount(src, str(tmp_path / "s"))
    fill(os.path.join(target, "a"), 96 * MiB, 4)
    kmounts.umount(target)
    want = sha256_file(src)
    with open(ctl_path(m.mnt), "w") as f:
        f.write("S C\n")
    target = kmounts.loop_mount(src, str(tmp_path / "s"))
    trim_after_rm(target, "a")
    kmounts.umount(target)
    fsync_path(src)
    assert follow(m, "S", "C", timeout=120)[-1] == "Completed"
    assert sha256_file(m.path("C")) == want
    assert allocated(src) < 16 * MiB


@pytest.mark.loop
def test_mkfs_ext4_of_100g_allocates_only_its_metadata(m):
    img = m.path("BIG")
    with open(img, "wb") as f:
        f.truncate(100 * GiB)
    run(["mkfs.ext4", "-q", "-F", img])               # defaults: discard, lazy init
    fsync_path(img)
    assert allocated(img) < 64 * MiB
    e2fsck_clean(img)
    # A punch of a written range gives it back.
    write_file(img, os.urandom(4 * MiB), 50 * GiB)
    before = allocated(img)
    fd = os.open(img, os.O_RDWR)
    try:
        fallocate(fd, PUNCH | KEEP, 50 * GiB, 4 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert before - allocated(img) == 4 * MiB


# ---------------------------------------------------------------------------- fallocate
class Model:
    """Bytes of one VDisk; chunks are mapped iff they hold a nonzero byte."""

    def __init__(self):
        self.d = bytearray()

    def write(self, off: int, data: bytes) -> None:
        if off + len(data) > len(self.d):
            self.d.extend(bytes(off + len(data) - len(self.d)))
        self.d[off:off + len(data)] = data

    def fallocate(self, mode: int, off: int, n: int) -> None:
        if not mode & KEEP and off + n > len(self.d):
            self.d.extend(bytes(off + n - len(self.d)))
        end = min(off + n, len(self.d))
        if mode & (PUNCH | ZERO) and off < end:
            self.d[off:end] = bytes(end - off)

    def chunks(self) -> list[bool]:
        zero = bytes(CS)
        return [not zero.startswith(self.d[c:c + CS]) for c in range(0, len(self.d), CS)]

    def seek(self, off: int, whence: int, chunks: list[bool]) -> int | None:
        return seek_model(chunks, len(self.d), off, whence, CS)


def check_seek(fd: int, model: Model, rnd: random.Random) -> None:
    size, chunks = len(model.d), model.chunks()
    for off in [0, size - 1, size] + [rnd.randrange(0, size + 1) for _ in range(20)]:
        for whence in (SEEK_DATA, SEEK_HOLE):
            want = model.seek(off, whence, chunks)
            try:
                got = os.lseek(fd, off, whence)
            except OSError as e:
                assert e.errno == errno.ENXIO and want is None, (off, whence, e)
                continue
            assert got == want, (off, whence, got, want)


def test_fallocate_and_seek_against_a_model_with_clones(m):
    rnd = random.Random(20261202)
    models = {"A": Model()}
    span = 64 * CS
    for step in range(400):
        name = rnd.choice(sorted(models))
        model = models[name]
        path = m.path(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            r = rnd.random()
            off = rnd.randrange(0, 6 * span)
            if rnd.random() < 0.5:
                off -= off % CS
            if r < 0.45:
                n = rnd.choice([1, 4096, CS, 3 * CS, rnd.randrange(1, 2 * CS)])
                data = rnd.randbytes(n) if rnd.random() < 0.7 else bytes(n)
                os.pwrite(fd, data, off)
                model.write(off, data)
            elif r < 0.9:
                mode = rnd.choice([PUNCH | KEEP, PUNCH | KEEP, ZERO, ZERO | KEEP, 0, KEEP])
                n = rnd.choice([CS, span, 2 * span, rnd.randrange(1, 3 * span)])
                fallocate(fd, mode, off, n)
                model.fallocate(mode, off, n)
            elif r < 0.95 and len(models) < 5:
                os.fsync(fd)
                new = f"C{step}"
                clone(m, name, new)
                models[new] = Model()
                models[new].d = bytearray(model.d)
            else:
                os.fsync(fd)
            if step % 10 == 0:
                assert os.fstat(fd).st_size == len(model.d)
                if model.d:
                    check_seek(fd, model, rnd)      # dirty pages are data
        finally:
            os.close(fd)
    for name, model in models.items():
        path = m.path(name)
        assert read_file(path) == model.d, name
        fd = os.open(path, os.O_RDONLY)
        try:
            if model.d:
                check_seek(fd, model, rnd)
        finally:
            os.close(fd)
        assert allocated(path) == sum(model.chunks()) * CS, name
    m.stop()
    proc = vdiskfs("fsck", m.pool, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_fallocate_modes_through_the_mount(m):
    path = m.path("F")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fallocate(fd, 0, 0, 10 * MiB)                     # preallocate: size, no space
        assert os.fstat(fd).st_size == 10 * MiB and allocated(path) == 0
        fallocate(fd, KEEP, 0, 20 * MiB)
        assert os.fstat(fd).st_size == 10 * MiB
        os.pwrite(fd, b"\1" * MiB, 0)
        fallocate(fd, ZERO, 9 * MiB, 2 * MiB)            # zero range grows the size
        assert os.fstat(fd).st_size == 11 * MiB
        fallocate(fd, PUNCH | KEEP, 4096, MiB)
        assert os.pread(fd, MiB, 0) == b"\1" * 4096 + bytes(MiB - 4096)
        with pytest.raises(OSError) as e:               # the kernel refuses these itself
            fallocate(fd, PUNCH, 0, MiB)
        assert e.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as e:               # collapse range: never ENOSYS
            fallocate(fd, 0x08, 0, CS)
        assert e.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)
        with pytest.raises(OSError) as e:               # more than the pool's disk holds
            fallocate(fd, 0, 0, 1 << 50)
        assert e.value.errno == errno.ENOSPC
        fallocate(fd, PUNCH | KEEP, 0, MiB)              # still on after the refusals
        assert allocated(path) == 0
    finally:
        os.close(fd)
    assert run(["fallocate", "-p", "-o", "0", "-l", "1M", path]).returncode == 0
    assert run(["fallocate", "-z", "-o", "0", "-l", "12M", path]).returncode == 0
    assert os.stat(path).st_size == 12 * MiB


# ---------------------------------------------------------------------------- seek
def test_seek_sees_dirty_pages_not_yet_written_back(m):
    path = m.path("D")
    with open(path, "wb") as f:
        f.truncate(1 * GiB)
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, SEEK_HOLE) == 0
        with pytest.raises(OSError) as e:
            os.lseek(fd, 0, SEEK_DATA)
        assert e.value.errno == errno.ENXIO
        os.pwrite(fd, b"dirty", 300 * MiB + 5)           # buffered: in the page cache
        assert os.lseek(fd, 0, SEEK_DATA) == 300 * MiB
        assert os.lseek(fd, 300 * MiB, SEEK_HOLE) == 300 * MiB + CS
        assert os.pread(fd, 5, 300 * MiB + 5) == b"dirty"
    finally:
        os.close(fd)


def test_seek_hole_writes_back_each_hole_it_would_report(m):
    """Dirty pages fill the first hole, and the next one in part: each hole SEEK_HOLE
    would answer is written back before it is answered, so it lands past both."""
    path = m.path("H")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"\1" * CS, 0)
        os.pwrite(fd, b"\3" * CS, 3 * CS)
        os.ftruncate(fd, 16 * CS)
        os.fsync(fd)
        os.pwrite(fd, b"\2" * 2 * CS, CS)                # chunks 1-2, dirty
        os.pwrite(fd, b"\4" * 100, 4 * CS + 7)           # part of chunk 4, dirty
        assert os.lseek(fd, 0, SEEK_HOLE) == 5 * CS
        os.pwrite(fd, b"\5", 9 * CS)                     # dirty, in a hole
        assert os.lseek(fd, 5 * CS, SEEK_DATA) == 9 * CS
        assert os.lseek(fd, 9 * CS, SEEK_HOLE) == 10 * CS
        os.pwrite(fd, b"\6", 20 * CS)                    # dirty, past the end
        assert os.lseek(fd, 17 * CS, SEEK_DATA) == 20 * CS
        assert os.lseek(fd, 20 * CS, SEEK_HOLE) == 20 * CS + 1
    finally:
        os.close(fd)


def test_cp_sparse_copies_only_the_data(m, tmp_path):
    path = m.path("S")
    with open(path, "wb") as f:
        f.truncate(64 * GiB)
    rnd = random.Random(5)
    extents = {i * 4 * GiB + 3 * CS: rnd.randbytes(MiB) for i in range(16)}
    for off, data in extents.items():
        write_file(path, data, off, fsync=False)
    out = str(tmp_path / "copy")
    run(["cp", "--sparse=auto", path, out])
    assert os.stat(out).st_size == 64 * GiB
    assert os.stat(out).st_blocks * 512 <= 32 * MiB     # cp saw the holes
    # The copy holds the data, and (being sparse) zeros elsewhere: reading 64 GiB of it
    # would only read holes, so its data extents are compared instead.
    fd = os.open(out, os.O_RDONLY)
    try:
        for off, data in extents.items():
            assert os.pread(fd, len(data), off) == data
        pos, found = 0, 0
        while True:
            try:
                pos = os.lseek(fd, pos, SEEK_DATA)
            except OSError as e:
                assert e.errno == errno.ENXIO
                break
            end = os.lseek(fd, pos, SEEK_HOLE)
            assert any(o - CS <= pos and end <= o + MiB + CS for o in extents), (pos, end)
            found += 1
            pos = end
        assert found >= len(extents)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- cost
def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_an_empty_petabyte_vdisk_and_its_clone_cost_almost_nothing(m):
    # Warm up every code path first (a small VDisk, its clone, a stat), so the figures
    # below measure the VDisks, not the first use of the code.
    run(["truncate", "-s", "1G", m.path("W")])
    clone(m, "W", "W2")
    os.stat(m.path("W2"))
    fsync_path(m.path("W"))
    ckpt = os.path.join(m.pool, "checkpoint")
    base = rss_kib(m.pid)
    run(["truncate", "-s", "1P", m.path("E")])
    clone(m, "E", "E2")
    for name in ("E", "E2"):
        assert os.stat(m.path(name)).st_size == 1 << 50
        fd = os.open(m.path(name), os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, SEEK_HOLE) == 0
        finally:
            os.close(fd)
    grown = rss_kib(m.pid) - base
    assert grown < 1024, f"RSS grew by {grown} KiB"
    m.stop()
    assert os.path.getsize(ckpt) < 64 << 10
    m.start()
    assert os.stat(m.path("E2")).st_size == 1 << 50
    assert hashlib.sha256(read_file(m.path("W"))).hexdigest() == sha256_file(m.path("W2"))
