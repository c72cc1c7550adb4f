"""Fail-stop on real failing I/O: the pool lives on an ext4 whose loop device is backed
by a file on a small tmpfs. Filling the tmpfs makes the loop device fail every write
into space the image has not allocated yet, so the ext4 holding the pool fails the
writeback of new chunk data and vdiskfs's fdatasync returns an error, as a dying disk's
would (fsyncgate: a retry may then "succeed" without the data)."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from support.common import Mount, read_file, run, vdiskfs

pytestmark = [pytest.mark.mount, pytest.mark.loop]

MiB = 1 << 20


class FailingDisk:
    """tmpfs (40 MiB) -> image (256 MiB, sparse) -> loop -> ext4 -> the pool."""

    def __init__(self, base: str):
        self.base = base
        self.tmpfs = os.path.join(base, "tmpfs")
        self.image = os.path.join(self.tmpfs, "img")
        self.ext = os.path.join(base, "ext")
        self.fill = os.path.join(self.tmpfs, "fill")
        self.loop = None
        self.mounted = []

    def start(self) -> "FailingDisk":
        os.makedirs(self.tmpfs)
        os.makedirs(self.ext)
        run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", self.tmpfs])
        self.mounted.append(self.tmpfs)
        run(["truncate", "-s", "256M", self.image])
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
             self.image])
        self.loop = run(["losetup", "-f", "--show", self.image]).stdout.strip()
        self.mount_ext()
        return self

    def mount_ext(self) -> None:
        run(["mount", "-o", "errors=continue", self.loop, self.ext])
        self.mounted.append(self.ext)

    def umount_ext(self) -> None:
        run(["umount", self.ext])
        self.mounted.remove(self.ext)

    def break_it(self) -> None:
        """From now on writes into new space of the image fail."""
        with open(self.fill, "wb") as f:
            try:
                while True:
                    f.write(bytes(MiB))
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC

    def mend(self) -> None:
        os.unlink(self.fill)

    def cleanup(self) -> None:
        for target in reversed(self.mounted):
            if run(["umount", target], check=False).returncode:
                run(["umount", "-l", target], check=False)
        self.mounted.clear()
        if self.loop:
            run(["losetup", "-d", self.loop], check=False)
            self.loop = None


@pytest.fixture
def disk(need_loop, tmp_path):
    d = FailingDisk(str(tmp_path / "disk")).start()
    yield d
    d.cleanup()


def test_a_failed_fdatasync_stops_writes_and_fsyncs_and_loses_nothing_acked(disk, tmp_path):
    pool = os.path.join(disk.ext, "pool")
    m = Mount(pool, str(tmp_path / "mnt"))
    m.start()
    try:
        acked = os.urandom(2 * MiB)
        fd = os.open(m.path("A"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, acked, 0)
            os.fsync(fd)
            disk.break_it()
            os.pwrite(fd, os.urandom(8 * MiB), 4 * MiB)      # new chunks: will not fit
            with pytest.raises(OSError) as e:
                os.fsync(fd)
            assert e.value.errno in (errno.EIO, errno.ENOSPC)
            disk.mend()                                      # the disk "recovers" ...
            with pytest.raises(OSError) as e:                # ... but no retry is trusted
                os.fsync(fd)
            assert e.value.errno == errno.EIO
            with pytest.raises(OSError):
                fd2 = os.open(m.path("B"), os.O_RDWR | os.O_CREAT, 0o600)
                os.close(fd2)
            assert os.pread(fd, len(acked), 0) == acked      # reads go on
        finally:
            os.close(fd)
        status = read_file(os.path.join(m.mnt, ".ctl", "status")).decode()
        assert "stopped writing" in status, status
        with open(os.path.join(pool, "daemon.log")) as f:
            assert "fail-stop" in f.read()
    finally:
        m.cleanup()
    # The backing ext4 may have aborted its journal: check it as after a bad disk.
    disk.umount_ext()
    subprocess.run(["e2fsck", "-fy", disk.loop], capture_output=True)
    disk.mount_ext()
    proc = vdiskfs("fsck", pool, check=False)
    assert proc.returncode == 4 and "stopped writing" in proc.stdout, proc.stdout
    m.start()                                                # a new mount clears it
    try:
        assert read_file(m.path("A"))[:len(acked)] == acked
    finally:
        m.stop()
    assert vdiskfs("fsck", pool, check=False).returncode == 0
