"""End to end (SPEC §3–§4, §2 loop devices): clone a VDisk holding a mounted ext4 filesystem
while a writer keeps adding files to it, the way a storage admin clones a live disk.

The clone must be a crash-consistent, point-in-time image of the filesystem: after journal
recovery it checks clean, every file that was written and synced before the clone command
is there with its checksum, nothing created after the clone completed is, and the two
filesystems are independent afterwards. Files written while the clone ran may or may not be
in it (that depends on timing), so nothing is asserted about them.

The pool has 4 KiB chunks and a clone speed limit (SLOW in support/clones.py) so that the
clone takes a few seconds and overlaps the writer; no assertion depends on timing.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time

import pytest

from support.clones import SLOW, ctl_path, follow, state_of
from support.common import daemon_log, fsck_clean, run, sha256_file

pytestmark = [pytest.mark.mount, pytest.mark.loop]

KiB = 1 << 10
MiB = 1 << 20


def write_synced(path: str, data: bytes) -> None:
    """Write a new file, fsync it and its directory (ext4 commits its creation too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Writer(threading.Thread):
    """Adds files live/wNNNN to a mounted filesystem until stopped; records for each
    file when its write began and when write + fsync had returned."""

    def __init__(self, root: str):
        super().__init__(daemon=True)
        self.dir = os.path.join(root, "live")
        os.makedirs(self.dir)
        self.stop_event = threading.Event()
        self.files: list[tuple[str, str, float, float]] = []   # name, sha, began, synced
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(99)
        i = 0
        try:
            while not self.stop_event.is_set():
                name = f"w{i:04d}"
                data = rng.randbytes(rng.randrange(4 * KiB, 256 * KiB))
                began = time.monotonic()
                write_synced(os.path.join(self.dir, name), data)
                self.files.append((name, hashlib.sha256(data).hexdigest(), began,
                                   time.monotonic()))
                i += 1
                self.stop_event.wait(0.03)
        except BaseException as e:   # reported by the test
            self.error = e

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=60)
        assert not self.is_alive(), "the writer thread did not stop"


def check_files(root: str, expect: dict[str, str], what: str) -> None:
    for rel, digest in expect.items():
        path = os.path.join(root, rel)
        assert os.path.isfile(path), f"{what}: {rel} is missing"
        assert sha256_file(path) == digest, f"{what}: {rel} has other contents"


def test_clone_of_a_live_ext4_filesystem(new_mount, need_loop, kmounts, tmp_path):
    m = new_mount.start(*SLOW)
    foo, bar = m.path("FOO"), m.path("BAR")
    run(["truncate", "-s", "512M", foo])
    run(["mkfs.ext4", "-q", "-F", foo])
    foo_fs = kmounts.loop_mount(foo, str(tmp_path / "foo_fs"))

    # Before the clone: files with known checksums, synced (about 32 MiB, so that the
    # rate-limited clone runs for a few seconds).
    rng = random.Random(7)
    before: dict[str, str] = {}
    os.makedirs(os.path.join(foo_fs, "before"))
    for i in range(64):
        data = rng.randbytes(rng.randrange(256 * KiB, 768 * KiB))
        rel = f"before/f{i:02d}"
        with open(os.path.join(foo_fs, rel), "wb") as f:
            f.write(data)
        before[rel] = hashlib.sha256(data).hexdigest()
    run(["sync"])

    writer = Writer(foo_fs)
    writer.start()
    try:
        # Let the writer get going, then clone under it: `echo "FOO BAR" > .ctl/clone`.
        deadline = time.monotonic() + 60
        while len(writer.files) < 5 and writer.error is None:
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.02)
        t_command = time.monotonic()
        run(["sh", "-c", f'echo "FOO BAR" > {ctl_path(m.mnt)}'])
        seen = follow(m, "FOO", "BAR", timeout=120)
        t_completed = time.monotonic()
        assert seen[-1] == "Completed", f"{seen}\n{daemon_log(m.pool, tail=30)}"
        # A few more files after the clone completed: they must not be in it.
        deadline = time.monotonic() + 60
        while (sum(1 for f in writer.files if f[2] > t_completed) < 5
               and writer.error is None):
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.02)
    finally:
        writer.stop()
    assert writer.error is None, f"writer failed: {writer.error!r}"

    synced_before = {f"live/{n}": d for n, d, _, synced in writer.files if synced < t_command}
    during = [n for n, _, began, synced in writer.files
              if synced >= t_command and began <= t_completed]
    after = [f"live/{n}" for n, _, began, _ in writer.files if began > t_completed]
    assert synced_before and after
    # Precondition (not a timing assertion): the clone really ran under the writer.
    assert during, "no file was written while the clone ran: the test did not overlap them"
    assert state_of(m.mnt, "FOO", "BAR") == "Completed"

    # The clone as a crash image: its journal may need recovery. Check a copy.
    image = str(tmp_path / "bar.img")
    run(["cp", "--sparse=always", bar, image])
    proc = run(["e2fsck", "-fy", image], check=False)
    assert proc.returncode in (0, 1), f"e2fsck -fy of the clone: {proc.returncode}\n" \
                                      f"{proc.stdout}{proc.stderr}"
    proc = run(["e2fsck", "-fn", image], check=False)
    assert proc.returncode == 0, f"still not clean after repair:\n{proc.stdout}{proc.stderr}"
    os.unlink(image)

    # The clone itself, mounted read-write (ext4 replays its journal).
    bar_fs = kmounts.loop_mount(bar, str(tmp_path / "bar_fs"))
    check_files(bar_fs, before, "clone")
    check_files(bar_fs, synced_before, "clone")
    present_after = [rel for rel in after if os.path.exists(os.path.join(bar_fs, rel))]
    assert not present_after, f"files created after the clone completed are in it: " \
                              f"{present_after}"

    # Independent: a write into the clone's filesystem does not reach the source's.
    only_in_bar = rng.randbytes(3 * MiB + 5)
    with open(os.path.join(bar_fs, "only_in_bar"), "wb") as f:
        f.write(only_in_bar)
    os.unlink(os.path.join(bar_fs, "before/f00"))
    run(["sync"])

    all_foo = dict(before)
    all_foo.update({f"live/{n}": d for n, d, _, _ in writer.files})
    check_files(foo_fs, all_foo, "source (still mounted)")
    kmounts.umount(foo_fs)
    proc = run(["e2fsck", "-fn", foo], check=False)
    assert proc.returncode == 0, f"source fs not clean:\n{proc.stdout}{proc.stderr}"
    foo_fs = kmounts.loop_mount(foo, str(tmp_path / "foo_fs"), "ro")
    check_files(foo_fs, all_foo, "source (remounted)")
    assert not os.path.exists(os.path.join(foo_fs, "only_in_bar"))

    # ... and the clone kept its own change.
    kmounts.umount(bar_fs)
    proc = run(["e2fsck", "-fn", bar], check=False)
    assert proc.returncode == 0, f"clone fs not clean:\n{proc.stdout}{proc.stderr}"
    bar_fs = kmounts.loop_mount(bar, str(tmp_path / "bar_fs"), "ro")
    assert sha256_file(os.path.join(bar_fs, "only_in_bar")) == \
        hashlib.sha256(only_in_bar).hexdigest()
    assert not os.path.exists(os.path.join(bar_fs, "before/f00"))
    kmounts.cleanup()
    m.stop()
    fsck_clean(m.pool)
