"""Clone figures: time from the command to Completed for VDisks holding 1 GiB and 16 GiB
of mapped data, metadata bytes added per clone, and a concurrent writer's throughput while
clones run, against the writer alone. Run as root:

    .venv/bin/python bench/clone.py [--sizes 1,16] [--dir /var/tmp]

The big sources are filled through the engine with one byte per chunk (a sparse data file:
every chunk is mapped, little is stored); the clones and the writer go through the mount.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vdiskfs.cow import layout  # noqa: E402
from vdiskfs.cow.pool import Pool, create_pool  # noqa: E402

VDISKFS = [sys.executable, "-m", "vdiskfs"]
GiB, MiB = 1 << 30, 1 << 20


def fill(pool_dir: str, name: str, nbytes: int) -> None:
    p = Pool(pool_dir)
    vd = p.create(name, nbytes)
    for off in range(0, nbytes, p.chunk_size):
        p.write(vd, off, b"\x01")
    p.close()


def meta_bytes(pool_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(pool_dir, f))
               for f in (layout.CHECKPOINT, layout.JOURNAL))


def ctl(mnt: str, cmd: str) -> None:
    with open(os.path.join(mnt, ".ctl", "clone"), "w") as f:
        f.write(cmd + "\n")


def wait_done(mnt: str, src: str, dst: str) -> str:
    while True:
        with open(os.path.join(mnt, ".ctl", "status")) as f:
            rows = [r.split() for r in f.read().splitlines()[1:]]
        state = [r for r in rows if r[:2] == [src, dst]][-1][2]
        if not state.endswith("%"):
            return state
        time.sleep(0.0005)


def clone_time(mnt: str, src: str, dst: str) -> float:
    t = time.perf_counter()
    ctl(mnt, f"{src} {dst}")
    state = wait_done(mnt, src, dst)
    assert state == "Completed", state
    return time.perf_counter() - t


def writer(path: str, seconds: float, out: list) -> None:
    buf = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        os.pwrite(fd, buf, (n % 256) * MiB)
        n += 1
    os.fsync(fd)
    os.close(fd)
    out.append(n / (time.perf_counter() - t0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,16", help="GiB of mapped data per source")
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vdiskfs-clone-", dir=args.dir)
    pool, mnt = os.path.join(tmp, "pool"), os.path.join(tmp, "mnt")
    os.makedirs(mnt)
    create_pool(pool, layout.DEFAULT_CHUNK_SIZE)
    sizes = [int(s) for s in args.sizes.split(",")]
    for gib in sizes:
        fill(pool, f"S{gib}", gib * GiB)
    subprocess.run(VDISKFS + ["mount", pool, mnt], check=True, capture_output=True)
    try:
        for gib in sizes:
            before = meta_bytes(pool)
            t = clone_time(mnt, f"S{gib}", f"C{gib}")
            t2 = clone_time(mnt, f"C{gib}", f"CC{gib}")
            os.sync()
            added = (meta_bytes(pool) - before) / 2
            print(f"clone of {gib:3d} GiB mapped: {t * 1000:7.1f} ms to Completed; "
                  f"clone of that clone {t2 * 1000:7.1f} ms; "
                  f"~{added:.0f} metadata bytes per clone (journal, before checkpoint)")
        alone: list = []
        writer(os.path.join(mnt, "W"), 5, alone)
        busy: list = []
        th = threading.Thread(target=writer, args=(os.path.join(mnt, "W"), 5, busy))
        th.start()
        n = 0
        while th.is_alive():
            clone_time(mnt, f"S{sizes[-1]}", f"X{n}")
            os.unlink(os.path.join(mnt, f"X{n}"))
            n += 1
        th.join()
        print(f"writer alone {alone[0]:.0f} MiB/s; with {n} clones of {sizes[-1]} GiB "
              f"running back to back {busy[0]:.0f} MiB/s ({busy[0] / alone[0]:.2f}x)")
    finally:
        subprocess.run(VDISKFS + ["umount", mnt], check=True)
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
