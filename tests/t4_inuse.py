"""A VDisk in use by a guest (ext4 on a loop device) is never dropped under it: rm and mv
onto it fail with EBUSY, ``vdiskfs umount`` refuses naming the VDisk and the loop
device, SIGTERM keeps serving; the guest stays readable and e2fsck-clean."""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest

from support.common import assert_user_error, daemon_log, read_file, run, vdiskfs

pytestmark = [pytest.mark.mount, pytest.mark.loop]

MiB = 1 << 20


@pytest.fixture
def guest(mount, kmounts, tmp_path):
    """VDisk FOO with an ext4 on a loop device, mounted at tmp_path/guest."""
    foo = mount.path("FOO")
    with open(foo, "wb") as f:
        f.truncate(64 * MiB)
    run(["mkfs.ext4", "-q", "-F", foo])
    dev = kmounts.attach(foo)
    target = str(tmp_path / "guest")
    os.makedirs(target)
    run(["mount", dev, target])
    kmounts.mounts.append(target)
    with open(os.path.join(target, "file"), "wb") as f:
        f.write(b"guest data" * 1000)
        os.fsync(f.fileno())
    return mount, dev, target


def guest_ok(target: str) -> None:
    with open(os.path.join(target, "file"), "rb") as f:
        assert f.read() == b"guest data" * 1000
    with open(os.path.join(target, "more"), "wb") as f:     # and writable
        f.write(b"x" * MiB)
        os.fsync(f.fileno())


def release_guest(kmounts, dev: str, target: str, image: str) -> None:
    kmounts.umount(target)
    kmounts.detach(dev)
    proc = run(["e2fsck", "-fn", image], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rm_and_mv_onto_an_attached_vdisk_are_ebusy(guest, kmounts):
    mount, dev, target = guest
    with open(mount.path("BAR"), "wb") as f:
        f.write(b"bar")
    for call in (lambda: os.unlink(mount.path("FOO")),
                 lambda: os.rename(mount.path("BAR"), mount.path("FOO"))):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EBUSY
    assert sorted(os.listdir(mount.mnt)) == [".ctl", "BAR", "FOO"]
    assert "(deleted)" not in run(["losetup", "-a"]).stdout
    guest_ok(target)
    release_guest(kmounts, dev, target, mount.path("FOO"))
    os.unlink(mount.path("FOO"))                       # free now


def test_umount_with_a_guest_attached_refuses_naming_it(guest, kmounts):
    mount, dev, target = guest
    proc = vdiskfs("umount", mount.mnt, check=False)
    line = assert_user_error(proc, "in use", "FOO", dev)
    assert "--force" in line
    guest_ok(target)
    release_guest(kmounts, dev, target, mount.path("FOO"))
    mount.stop()                                       # idle: it stops as before


def test_sigterm_with_a_guest_attached_keeps_serving(guest, kmounts):
    mount, dev, target = guest
    os.kill(mount.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while "not unmounting" not in daemon_log(mount.pool) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "not unmounting, VDisks in use: FOO" in daemon_log(mount.pool)
    guest_ok(target)
    release_guest(kmounts, dev, target, mount.path("FOO"))
    assert read_file(os.path.join(mount.mnt, ".ctl", "status"))   # still mounted, serving
    mount.stop()


def test_umount_force_detaches(guest, kmounts):
    mount, dev, target = guest
    vdiskfs("umount", "--force", mount.mnt, timeout=120)
    mount.pid = None
    assert not os.path.ismount(mount.mnt)
    kmounts.cleanup()                                  # the guest lost its disk: as told
