"""Measure what decides the default chunk size: sequential 1 GiB write/read through the
mount and 4 KiB random writes into a fresh clone (each pays a copy of one chunk), for
several chunk sizes, next to the same I/O on a plain file. Run as root:

    .venv/bin/python bench/chunksize.py [--sizes 64K,256K,1M] [--gib 1]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import MiB, drop_caches  # noqa: E402  (no work dir set: sync(2), then drop)
from bench.mounts import VDISKFS  # noqa: E402
from vdiskfs.cli import parse_size  # noqa: E402
from vdiskfs.cow.pool import Pool, create_pool  # noqa: E402


def seq(path: str, src: str, nbytes: int) -> tuple[float, float]:
    """(write MiB/s with fsync at the end, cold read MiB/s) of ``path``."""
    buf = bytearray(MiB)
    t = time.perf_counter()
    with open(src, "rb", buffering=0) as s:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        for _ in range(nbytes // MiB):
            s.readinto(buf)
            os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)
    w = nbytes / MiB / (time.perf_counter() - t)
    drop_caches()
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    while os.readv(fd, [buf]):
        pass
    os.close(fd)
    r = nbytes / MiB / (time.perf_counter() - t)
    return w, r


def clone_writes(tmp: str, cs: int, n: int = 4000) -> float:
    """4 KiB random writes per second into a fresh clone of a fully written 256 MiB VDisk,
    in the engine (no FUSE): the cost of copy-on-write at this chunk size."""
    path = os.path.join(tmp, f"engine-{cs}")
    create_pool(path, cs)
    p = Pool(path)
    vd = p.create("SRC", 256 * MiB)
    block = os.urandom(MiB)
    for off in range(0, 256 * MiB, MiB):
        p.write(vd, off, block)
    p.sync()
    c = p.clone(vd, "DST")
    rnd = random.Random(1)
    data = os.urandom(4096)
    t = time.perf_counter()
    for _ in range(n):
        p.write(c, rnd.randrange(0, 256 * MiB // 4096) * 4096, data)
    rate = n / (time.perf_counter() - t)
    p.close()
    shutil.rmtree(path)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64K,256K,1M")
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    nbytes = int(args.gib * 1024) * MiB
    tmp = tempfile.mkdtemp(prefix="vdiskfs-bench-", dir=args.dir)
    src = os.path.join(tmp, "random.src")
    with open(src, "wb") as f:
        for _ in range(nbytes // MiB):
            f.write(os.urandom(MiB))
    try:
        plain = os.path.join(tmp, "plain")
        w, r = seq(plain, src, nbytes)
        os.unlink(plain)
        print(f"{'plain file':>12}: write {w:7.0f} MiB/s  read {r:7.0f} MiB/s")
        for text in args.sizes.split(","):
            cs = parse_size(text)
            pool, mnt = os.path.join(tmp, f"pool-{text}"), os.path.join(tmp, f"mnt-{text}")
            os.makedirs(mnt)
            subprocess.run(VDISKFS + ["mount", "--chunk-size", str(cs), pool, mnt],
                           check=True, capture_output=True)
            try:
                w, r = seq(os.path.join(mnt, "FOO"), src, nbytes)
            finally:
                subprocess.run(VDISKFS + ["umount", mnt], check=True)
            shutil.rmtree(pool)
            cw = clone_writes(tmp, cs)
            print(f"{'chunk ' + text:>12}: write {w:7.0f} MiB/s  read {r:7.0f} MiB/s  "
                  f"4K writes into a fresh clone {cw:7.0f}/s")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
