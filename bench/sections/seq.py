"""Section seq: sequential write to a new file in 1 MiB and 128 KiB writes (fsync at the
end) and cold sequential reads, on the four file targets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.common import KiB, MiB, drop_caches, log, read_file

if TYPE_CHECKING:
    from bench.suite import Suite


def measure(s: Suite) -> None:
    s.mount_targets()
    n = s.cfg.seq_bytes
    for r in range(s.cfg.reps):
        for t in s.rotated(r):
            path = s.file(t, "seq")
            dt = s.data.write_file(path, n, MiB)
            s.res.add("seq_write_1m", t, n / MiB / dt)
            drop_caches()
            dt, got = read_file(path)
            if got != n:
                raise RuntimeError(f"{t}: read {got} bytes of {n}")
            s.res.add("seq_read_first", t, n / MiB / dt)
            drop_caches()
            s.res.add("seq_read", t, n / MiB / read_file(path)[0])
            s.removed(t, "seq")
            dt = s.data.write_file(path, n, 128 * KiB)
            s.res.add("seq_write_128k", t, n / MiB / dt)
            s.removed(t, "seq")
            log(f"  seq rep {r + 1} {t}: done")
    for fid in ("seq_write_1m", "seq_write_128k"):
        s.res.note(fid, f"{n // MiB} MiB to a new file, fsync at the end")
    s.res.note("seq_read", f"{n // MiB} MiB in 1 MiB reads after drop_caches, "
               "the second such read after writing (see the next row)")
    s.res.note("seq_read_first", "the first read after writing: on this VM slow for "
               "any file system, as the host reads freshly allocated blocks")
