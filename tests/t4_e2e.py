"""End to end: the main use (SPEC §2) — ext4 on a VDisk, loop-mounted.

A filesystem tree with known checksums is written into an ext4 made on a thin VDisk; it
must come back byte for byte after a clean umount/remount of the pool and after the
daemon is killed with SIGKILL (once the data was fsynced), and both e2fsck and vdiskfs
fsck must find nothing wrong. Loop mounts go through the kmounts fixture, so teardown
unmounts them and detaches their loop devices before the vdiskfs mount is stopped.
"""

from __future__ import annotations

import hashlib
import os
import random
import time

import pytest

from support.common import allocated, fsck_clean, loop_devices_of, run, sha256_file

pytestmark = [pytest.mark.mount, pytest.mark.loop]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def make_tree(root: str, rng: random.Random) -> dict[str, str]:
    """Write a tree of files under ``root``; returns {relative path: sha256}."""
    files: dict[str, bytes] = {}
    # A few large random files, one of them not a multiple of any block size.
    for i, size in enumerate((3 * MiB, 5 * MiB + 4097, MiB + 1)):
        files[f"big/random{i}.bin"] = rng.randbytes(size)
    # Zeros and near-zeros: chunks the VDisk may store as holes.
    files["big/zeros.bin"] = bytes(2 * MiB)
    files["big/almost-zeros.bin"] = bytes(MiB) + b"\1" + bytes(MiB)
    files["empty"] = b""
    # Many small files in nested directories.
    for i in range(300):
        depth = rng.randrange(0, 4)
        d = "/".join(f"d{rng.randrange(0, 4)}" for _ in range(depth))
        name = f"{d}/f{i:03d}.dat" if d else f"f{i:03d}.dat"
        files[name] = rng.randbytes(rng.choice((0, 1, 100, 511, 512, 4095, 4096, 4097,
                                                rng.randrange(1, 40 * KiB))))
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def tree_hashes(root: str) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not (dirpath == root and d == "lost+found")]
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = sha256_file(path)
    return out


def assert_tree(root: str, expected: dict[str, str]) -> None:
    got = tree_hashes(root)
    assert sorted(got) == sorted(expected), "the set of files differs"
    bad = [rel for rel in expected if got[rel] != expected[rel]]
    assert not bad, f"{len(bad)} file(s) with a wrong checksum, e.g. {bad[:5]}"


def wait_loop_released(image: str, timeout: float = 30.0) -> None:
    """After umount, the auto-cleared loop device lets go of the image asynchronously; the
    vdiskfs mount cannot be unmounted while it still holds the VDisk open."""
    deadline = time.monotonic() + timeout
    while loop_devices_of(image):
        if time.monotonic() > deadline:
            raise AssertionError(f"loop devices still attached to {image}: "
                                 f"{loop_devices_of(image)}")
        time.sleep(0.05)


def make_ext4(image: str) -> None:
    run(["truncate", "-s", "1G", image])
    run(["mkfs.ext4", "-q", "-F", image])


def e2fsck_clean(image: str) -> None:
    proc = run(["e2fsck", "-fn", image], check=False)
    assert proc.returncode == 0, f"e2fsck -fn {image}: {proc.returncode}\n" \
                                 f"{proc.stdout}{proc.stderr}"


def test_ext4_on_vdisk_survives_umount_and_remount(need_loop, mount, kmounts, tmp_path):
    image = mount.path("FOO")
    target = str(tmp_path / "ext4")
    make_ext4(image)
    assert os.stat(image).st_size == GiB
    kmounts.loop_mount(image, target)
    expected = make_tree(target, random.Random(20240601))
    run(["sync"])
    assert_tree(target, expected)             # first through the page cache
    kmounts.umount(target)
    wait_loop_released(image)
    mount.stop()
    fsck_clean(mount.pool)

    mount.start()
    assert os.stat(image).st_size == GiB
    used = allocated(image)
    assert 9 * MiB < used < 128 * MiB, used   # the data is there, and the VDisk is thin
    kmounts.loop_mount(image, target)
    assert_tree(target, expected)
    kmounts.umount(target)
    wait_loop_released(image)
    e2fsck_clean(image)
    mount.stop()
    fsck_clean(mount.pool)


def test_ext4_on_vdisk_survives_kill9(need_loop, mount, kmounts, tmp_path):
    image = mount.path("FOO")
    target = str(tmp_path / "ext4")
    make_ext4(image)
    kmounts.loop_mount(image, target)
    expected = make_tree(target, random.Random(4242))
    run(["sync"])
    kmounts.umount(target)                    # ext4 flushes everything to the loop device
    wait_loop_released(image)
    # Make the VDisk durable in vdiskfs: fsync the VDisk file itself.
    fd = os.open(image, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    mount.kill9()
    fsck_clean(mount.pool)                    # consistent straight after the crash

    mount.start()
    assert os.stat(image).st_size == GiB
    kmounts.loop_mount(image, target)
    assert_tree(target, expected)
    # The recovered filesystem keeps working: change it, crash again, recover again.
    rng = random.Random(7)
    for rel in sorted(expected)[::7]:
        os.unlink(os.path.join(target, rel))
        del expected[rel]
    more = make_tree(os.path.join(target, "round2"), rng)
    expected.update({f"round2/{rel}": h for rel, h in more.items()})
    run(["sync"])
    kmounts.umount(target)
    wait_loop_released(image)
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    mount.kill9()
    fsck_clean(mount.pool)

    mount.start()
    kmounts.loop_mount(image, target)
    assert_tree(target, expected)
    kmounts.umount(target)
    wait_loop_released(image)
    e2fsck_clean(image)
    mount.stop()
    fsck_clean(mount.pool)
