"""Checksums through a real mount: damaged chunk data reads EIO (never other bytes), is
counted in ``user.vdisk.errors``; ``vdiskfs scrub`` finds exactly the damaged ranges,
also in a clone sharing them; ``vdiskfs fsck --data`` offline likewise."""

from __future__ import annotations

import errno
import json
import os
import random

import pytest

from support.common import flip_byte, vdiskfs

pytestmark = pytest.mark.mount

MiB = 1 << 20
BLOCK = 4096


def slot_of(pool: str, name: str, off: int) -> int:
    """Data-file position of byte ``off`` of VDisk ``name`` (read-only open: unmounted)."""
    from vdiskfs.cow.pool import Pool
    p = Pool(pool, readonly=True)
    try:
        cs = p.chunk_size
        return p.meta.slot_of(p.lookup(name), off // cs) * cs + off % cs
    finally:
        p.close()


def test_scrub_and_reads_of_damaged_data(mount):
    data = random.Random(1).randbytes(16 * MiB)
    with open(mount.path("FOO"), "wb") as f:
        f.write(data)
    vdiskfs("clone", "-s", "FOO", "-d", "BAR", "-w", "--mount", mount.mnt)
    proc = vdiskfs("scrub", "--mount", mount.mnt, "--json")
    assert json.loads(proc.stdout)["damaged_blocks"] == 0
    mount.stop()
    offs = sorted(random.Random(2).sample(range(len(data)), 5))
    for off in offs:
        flip_byte(os.path.join(mount.pool, "data"), slot_of(mount.pool, "FOO", off), 1)
    proc = vdiskfs("fsck", "--data", mount.pool, check=False)
    assert proc.returncode == 4
    assert proc.stdout.count("damaged") == 2 * len({o // BLOCK for o in offs})
    mount.start()
    # Reads of the damaged blocks fail; the blocks around them read exactly.
    fd = os.open(mount.path("FOO"), os.O_RDONLY | os.O_DIRECT)
    try:
        for off in offs:
            blk = off // BLOCK * BLOCK
            with pytest.raises(OSError) as e:
                os.preadv(fd, [memoryview(bytearray(BLOCK))], blk)
            assert e.value.errno == errno.EIO
            if blk + BLOCK not in {o // BLOCK * BLOCK for o in offs}:
                buf = bytearray(BLOCK)
                os.preadv(fd, [memoryview(buf)], blk + BLOCK)
                assert bytes(buf) == data[blk + BLOCK:blk + 2 * BLOCK]
    finally:
        os.close(fd)
    errors = int(os.getxattr(mount.path("FOO"), "user.vdisk.errors"))
    assert errors >= len(offs)
    proc = vdiskfs("scrub", "--mount", mount.mnt, "--json", check=False)
    assert proc.returncode == 1
    summary = json.loads(proc.stdout)
    want = sorted({(name, o // BLOCK * BLOCK) for o in offs for name in ("FOO", "BAR")})
    got = sorted((name, s) for name, start, end in summary["ranges"]
                 for s in range(start, end + 1, BLOCK))
    assert got == want
    proc = vdiskfs("scrub", "--mount", mount.mnt, check=False)
    for name, blk in want:
        assert f"damaged: VDisk {name} bytes {blk}-{blk + BLOCK - 1}" in proc.stdout
    # Rewriting the damaged blocks whole heals them.
    fd = os.open(mount.path("FOO"), os.O_WRONLY)
    try:
        for off in offs:
            blk = off // BLOCK * BLOCK
            os.pwrite(fd, data[blk:blk + BLOCK], blk)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(mount.path("FOO"), "rb") as f:
        assert f.read() == data
    mount.stop()
    # BAR still shares the damaged slots: fsck --repair cannot invent its bytes.
    proc = vdiskfs("fsck", "--data", mount.pool, check=False)
    assert proc.returncode == 4 and "VDisk BAR" in proc.stdout and "VDisk FOO" not in proc.stdout
    for off in offs:                                  # put the bytes back for the teardown
        flip_byte(os.path.join(mount.pool, "data"), slot_of(mount.pool, "BAR", off), 1)
    assert vdiskfs("fsck", "--data", mount.pool, check=False).returncode == 0
