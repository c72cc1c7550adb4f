"""Cloning through a real FUSE mount (SPEC §3–§5): the ``.ctl/`` files, the command grammar
and its errnos, clone jobs watched while they run, point-in-time copies of a source that
keeps changing, cancel, purge, space accounting, restarts and crashes in the middle of a
clone, and the ``vdiskfs clone`` / ``qclone`` command line.

To watch a clone in progress the pool is made with 4 KiB chunks (one map page then covers
4 MiB of a VDisk) and each job is limited to 8 MiB of mapped source data per second: a
source holding 40 MiB of data takes about five seconds to clone, in ten visible steps.
Nothing here asserts how long anything takes; waits are polls with generous bounds, only to
reach a state.

Every test runs the daemon as users run it (``vdiskfs mount`` in a subprocess) and cleans
up through the conftest fixtures; the pool_dir fixture fscks every pool at teardown.
"""

from __future__ import annotations

import errno
import os
import random
import re
import subprocess
import sys
import time

import pytest

from support.clones import (FINAL, HEADER, SLOW, ctl_path, follow, parse_status, pct,
                            read_ctl, state_of, status_rows, valid_progress)
from support.common import (Mount, assert_user_error, daemon_log, fsck_clean, fsync_path,
                            read_file, run, used_bytes, wait_until, write_file)

pytestmark = pytest.mark.mount

KiB = 1 << 10
MiB = 1 << 20

PAGE = 4 * MiB                  # the VDisk bytes one map page covers with 4 KiB chunks
QCLONE = os.path.join(os.path.dirname(sys.executable), "qclone")
VDISKFS_BIN = os.path.join(os.path.dirname(sys.executable), "vdiskfs")


# ---------------------------------------------------------------- helpers
def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


put = write_file
get = read_file


def patched(base: bytes, offset: int, data: bytes) -> bytes:
    """``base`` with ``data`` written at ``offset`` (growing it with zeros if needed)."""
    if offset > len(base):
        base = base + bytes(offset - len(base))
    return base[:offset] + data + base[offset + len(data):]


def same(path: str, expect: bytes, what: str = "") -> None:
    got = get(path)
    if got != expect:
        if len(got) != len(expect):
            raise AssertionError(f"{what or path}: size {len(got)}, expected {len(expect)}")
        i = next(i for i in range(len(got)) if got[i] != expect[i])
        raise AssertionError(f"{what or path}: contents differ from byte {i} "
                             f"(page {i // PAGE} with 4K chunks)")


def errno_of(fn, *args) -> int:
    """The errno ``fn(*args)`` fails with, or 0 if it succeeds."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def open_errno(path: str, flags: int = os.O_RDONLY) -> int:
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        return e.errno
    os.close(fd)
    return 0


def ctl(mnt: str, command: str | bytes) -> None:
    """One command = one write() to .ctl/clone (an OSError carries the refusal's errno)."""
    data = command.encode() if isinstance(command, str) else command
    fd = os.open(ctl_path(mnt), os.O_WRONLY)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def ctl_errno(mnt: str, command: str | bytes) -> int:
    return errno_of(ctl, mnt, command)


def jobs_rows(mnt: str) -> list[tuple[str, str, str, float, int]]:
    """.ctl/jobs: the status table plus Elapsed (seconds, "4.5s") and Shared (bytes)."""
    text = read_ctl(mnt, "jobs")
    lines = text.splitlines()
    assert lines and lines[0].split() == HEADER + ["Elapsed", "Shared"], text
    rows = []
    for line in lines[1:]:
        f = line.split()
        assert len(f) == 5 and valid_progress(f[2]), f"bad jobs row {line!r}"
        m = re.fullmatch(r"(\d+(?:\.\d+)?)s", f[3])
        assert m and f[4].isdigit(), f"bad jobs row {line!r}"
        rows.append((f[0], f[1], f[2], float(m.group(1)), int(f[4])))
    return rows


def wait_completed(m: Mount, src: str, dst: str, timeout: float = 60.0) -> list[str]:
    seen = follow(m, src, dst, timeout)
    assert seen[-1] == "Completed", f"{src} -> {dst} ended {seen}:\n{daemon_log(m.pool, tail=30)}"
    return seen


def wait_running(m: Mount, src: str, dst: str, at_least: int = 0,
                 timeout: float = 60.0) -> int:
    """Wait until SRC -> DST runs at >= ``at_least``%; the test needs it still running."""
    deadline = time.monotonic() + timeout
    while True:
        st = state_of(m.mnt, src, dst)
        assert st is None or st.endswith("%"), (
            f"{src} -> {dst} ended ({st}) before reaching {at_least}%: the test needs a "
            f"clone in progress (is --clone-speed honoured?)\n{daemon_log(m.pool, tail=30)}")
        if st is not None and pct(st) >= at_least:
            return pct(st)
        if time.monotonic() > deadline:
            raise AssertionError(f"{src} -> {dst} did not reach {at_least}% in "
                                 f"{timeout:.0f}s (last {st})\n{daemon_log(m.pool, tail=30)}")
        time.sleep(0.02)


def assert_running(m: Mount, *pairs: tuple[str, str]) -> None:
    """A precondition of the test (not a timing assertion): the clones still run."""
    for src, dst in pairs:
        st = state_of(m.mnt, src, dst)
        assert pct(st) is not None, (
            f"{src} -> {dst} is {st} already: the test needs it in progress here")


def commit(path: str) -> None:
    """fsync a VDisk: commits the whole pool (so freed chunks go back to the backing fs)."""
    fsync_path(path)


def data_du(pool: str) -> int:
    return os.stat(os.path.join(pool, "data")).st_blocks * 512


def xattr(path: str, name: str) -> str:
    return os.getxattr(path, f"user.vdisk.{name}").decode()


def listing(mnt: str) -> set[str]:
    return set(os.listdir(mnt)) - {".ctl"}


def slow_source(m: Mount, name: str = "FOO", size: int = 40 * MiB, seed: int = 1) -> bytes:
    """A VDisk whose every 4 MiB page is full of data (the rate limit then makes each page
    of the clone a visible step)."""
    data = pattern(seed, size)
    put(m.path(name), data)
    return data


def cli(*args: str, env: dict | None = None, prog: str = QCLONE,
        timeout: float = 120) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "VDISKFS_MOUNT"}
    e.update(env or {})
    return subprocess.run([prog, *args], capture_output=True, text=True, env=e,
                          timeout=timeout)


def assert_ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n" \
                                 f"{proc.stdout}{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stdout


# ================================================================ .ctl files
def test_ctl_files_exist_with_modes(mount):
    ctl_dir = os.path.join(mount.mnt, ".ctl")
    assert os.path.isdir(ctl_dir)
    assert sorted(os.listdir(ctl_dir)) == ["clone", "jobs", "scrub", "status", "vdisks"]
    modes = {n: os.stat(ctl_path(mount.mnt, n)).st_mode
             for n in ("clone", "status", "jobs", "vdisks")}
    for name, mode in modes.items():
        assert (mode & 0o170000) == 0o100000, f"{name} is not a regular file: {oct(mode)}"
    assert {n: m & 0o7777 for n, m in modes.items()} == \
        {"clone": 0o200, "status": 0o444, "jobs": 0o444, "vdisks": 0o444}
    # Contents are made when read: nothing cloned yet, just the header lines.
    assert read_ctl(mount.mnt).splitlines() == [" ".join(HEADER)]
    assert read_ctl(mount.mnt, "jobs").split() == HEADER + ["Elapsed", "Shared"]
    # clone is write-only and status/jobs read-only, even for root (no DAC override).
    assert open_errno(ctl_path(mount.mnt, "clone"), os.O_RDONLY) == errno.EACCES
    assert open_errno(ctl_path(mount.mnt, "clone"), os.O_RDWR) == errno.EACCES
    for name in ("status", "jobs"):
        assert open_errno(ctl_path(mount.mnt, name), os.O_WRONLY) == errno.EACCES
    proc = run(["sh", "-c", f"cat {ctl_path(mount.mnt)}"], check=False)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr


def test_clone_both_spellings_and_shell_echo(mount):
    foo = mount.path("FOO")
    data = patched(pattern(2, 3 * MiB), 7 * MiB, pattern(3, 100_000))   # holes in between
    put(foo, data)
    os.truncate(foo, 16 * MiB)
    data = data + bytes(16 * MiB - len(data))
    # `echo "FOO BAR" > MNT/.ctl/clone`: the shell's own open (O_TRUNC) and write.
    run(["sh", "-c", f'echo "FOO BAR" > {ctl_path(mount.mnt)}'])
    # The flag spelling, no trailing newline.
    ctl(mount.mnt, "-s FOO -d BAZ")
    # Extra blanks are just separators.
    ctl(mount.mnt, "  FOO \t QUX  \n")
    for dst in ("BAR", "BAZ", "QUX"):
        wait_completed(mount, "FOO", dst)
    assert status_rows(mount.mnt) == [("FOO", "BAR", "Completed"), ("FOO", "BAZ", "Completed"),
                                      ("FOO", "QUX", "Completed")]
    assert listing(mount.mnt) == {"FOO", "BAR", "BAZ", "QUX"}
    for dst in ("BAR", "BAZ", "QUX"):
        st = os.stat(mount.path(dst))
        assert st.st_size == 16 * MiB
        assert st.st_blocks == os.stat(foo).st_blocks   # the same chunks, shared
        same(mount.path(dst), data, dst)
    same(foo, data, "FOO")
    # Each write() is one command, also several through one open file.
    fd = os.open(ctl_path(mount.mnt), os.O_WRONLY)
    try:
        os.write(fd, b"FOO W1\n")
        os.write(fd, b"-s FOO -d W2")
    finally:
        os.close(fd)
    for dst in ("W1", "W2"):
        wait_completed(mount, "FOO", dst)
        same(mount.path(dst), data, dst)


def test_bad_command_is_a_shell_write_error_and_changes_nothing(mount):
    put(mount.path("FOO"), b"x" * 5000)
    before = read_ctl(mount.mnt)
    # /bin/sh (dash on Debian) reports a failed echo as its own generic message;
    # bash shows the errno of the write, as the SPEC's example does.
    proc = run(["sh", "-c", f'echo "NOPE BAR" > {ctl_path(mount.mnt)}'], check=False)
    assert proc.returncode != 0 and "echo" in proc.stderr, proc
    proc = run(["bash", "-c", f'echo "NOPE BAR" > {ctl_path(mount.mnt)}'], check=False)
    assert proc.returncode != 0
    assert "write error: No such file or directory" in proc.stderr, proc.stderr
    proc = run(["bash", "-c", f'echo "FOO" > {ctl_path(mount.mnt)}'], check=False)
    assert "write error: Invalid argument" in proc.stderr, proc.stderr
    assert read_ctl(mount.mnt) == before
    assert listing(mount.mnt) == {"FOO"}


def test_command_errnos(mount):
    put(mount.path("FOO"), pattern(4, 64 * KiB))
    put(mount.path("EXIST"), b"e")
    cases = [
        # start: no source
        ("NOPE BAR", errno.ENOENT), ("-s NOPE -d BAR", errno.ENOENT),
        # start: destination exists (also the source itself)
        ("FOO EXIST", errno.EEXIST), ("-s FOO -d EXIST", errno.EEXIST), ("FOO FOO", errno.EEXIST),
        # bad names
        ("FOO .ctl", errno.EINVAL), ("FOO .hidden", errno.EINVAL), ("FOO a/b", errno.EINVAL),
        ("FOO " + "X" * 65, errno.EINVAL), ("-s FOO -d B@R", errno.EINVAL),
        ("FOO BÄR".encode("utf-8"), errno.EINVAL), ("NOPE .bad", errno.EINVAL),
        # bad syntax
        ("FOO", errno.EINVAL), ("FOO BAR BAZ", errno.EINVAL), ("\n", errno.EINVAL),
        ("FOO BAR\nFOO BAZ\n", errno.EINVAL), ("FOO BAR\0", errno.EINVAL),
        ("-s FOO", errno.EINVAL), ("-d BAR", errno.EINVAL), ("-s FOO -d", errno.EINVAL),
        ("-s FOO -d BAR -c", errno.EINVAL), ("-s FOO -d BAR -p", errno.EINVAL),
        ("-s FOO -s BAR -d BAZ", errno.EINVAL), ("-x FOO", errno.EINVAL),
        ("-c", errno.EINVAL), ("cancel", errno.EINVAL), ("cancel FOO BAR", errno.EINVAL),
        ("purge FOO BAR", errno.EINVAL),
        # a first word purge/cancel is the keyword: extra words are EINVAL
        ("purge FOO", errno.EINVAL), ("purge now", errno.EINVAL), ("-p -p", errno.EINVAL),
        ("-s FOO -c -c", errno.EINVAL),
        # the word after -s/-d is a name, even "-s" (no such VDisk here)
        ("-s -s -d BAR", errno.ENOENT), ("-s -d -d EXIST", errno.ENOENT),
        # cancel with nothing in progress (or no such VDisk)
        ("cancel FOO", errno.ENOENT), ("-s FOO -c", errno.ENOENT), ("cancel NOPE", errno.ENOENT),
        ("-c -s FOO", errno.ENOENT),
    ]
    got = {c if isinstance(c, str) else c.decode(): errno.errorcode.get(ctl_errno(mount.mnt, c), 0)
           for c, _ in cases}
    want = {c if isinstance(c, str) else c.decode(): errno.errorcode[e] for c, e in cases}
    assert got == want
    # Refused commands changed nothing; purge with nothing to purge is fine.
    assert status_rows(mount.mnt) == []
    assert listing(mount.mnt) == {"FOO", "EXIST"}
    assert ctl_errno(mount.mnt, "purge") == 0 and ctl_errno(mount.mnt, "-p\n") == 0
    # VDisks named like the keywords are cloned with the flag spelling.
    put(mount.path("cancel"), b"c" * 100)
    ctl(mount.mnt, "-s cancel -d purge")
    wait_completed(mount, "cancel", "purge")
    assert get(mount.path("purge")) == b"c" * 100


def test_ctl_clone_written_like_a_file_closes_cleanly(mount):
    put(mount.path("FOO"), b"foo" * 1000)
    errors = []
    for i in range(5):
        try:
            with open(ctl_path(mount.mnt), "w") as f:   # O_WRONLY|O_CREAT|O_TRUNC
                f.write(f"FOO C{i}\n")
                f.flush()                                # the command: one write()
                time.sleep(0.05)                         # a script busy for a moment
        except OSError as e:                             # ... then close()
            errors.append(f"C{i}: {e}")
    for i in range(5):
        wait_completed(mount, "FOO", f"C{i}")            # every command did run
    assert not errors, f"close() after a successful command failed: {errors}"


# ================================================================ watching a clone
def test_progress_goes_up_and_completed_only_at_the_end(new_mount):
    m = new_mount.start(*SLOW)
    data = slow_source(m)                   # 10 full pages
    ctl(m.mnt, "FOO BAR")
    bar = m.path("BAR")
    seen: list[str] = []
    shared_seen: list[int] = []
    elapsed_seen: list[float] = []
    busy_seen = 0
    deadline = time.monotonic() + 60
    while True:
        s1 = state_of(m.mnt, "FOO", "BAR")
        err = open_errno(bar)
        job = [r for r in jobs_rows(m.mnt) if r[:2] == ("FOO", "BAR")]
        s2 = state_of(m.mnt, "FOO", "BAR")
        assert len(job) == 1
        _, _, s_job, elapsed, shared = job[0]
        for s in (s1, s_job, s2):
            assert s is not None and valid_progress(s)
            if not seen or seen[-1] != s:
                seen.append(s)
        # Completed means openable; openable means the job has finished its work.
        if s1 == "Completed":
            assert err == 0, f"BAR shown Completed but open() gave {errno.errorcode[err]}"
        if err:
            assert err == errno.EBUSY, f"open(BAR) during the clone: {errno.errorcode[err]}"
            assert s1 != "Completed"
            busy_seen += 1
        else:
            assert s2 in ("Completed", "99%"), f"BAR opened while the clone shows {s2}"
        # The percentage is the share of the work done: with full pages, of the data.
        if pct(s_job) is not None and s_job != "99%":
            assert shared * 100 // len(data) == pct(s_job), (s_job, shared)
        shared_seen.append(shared)
        elapsed_seen.append(elapsed)
        if s2 in FINAL and s_job in FINAL:   # the jobs row was read before s2: once more
            break
        assert time.monotonic() < deadline, \
            f"no end after 60s: {seen}\n{daemon_log(m.pool, tail=30)}"
        time.sleep(0.05)
    assert seen[-1] == "Completed", seen
    pcts = [pct(s) for s in seen[:-1]]
    assert None not in pcts and pcts == sorted(pcts), f"progress not monotonic: {seen}"
    assert len({p for p in pcts if 0 < p < 100}) >= 2, f"progress not gradual: {seen}"
    assert busy_seen >= 2, "never saw the destination unopenable while the clone ran"
    assert shared_seen == sorted(shared_seen) and shared_seen[-1] == len(data)
    assert elapsed_seen == sorted(elapsed_seen) and elapsed_seen[-1] > 0
    # Completed stays (rows stay until purged) and BAR is an ordinary VDisk now.
    assert status_rows(m.mnt) == [("FOO", "BAR", "Completed")]
    same(bar, data, "BAR")
    put(bar, b"now writable", 5)


def test_status_is_a_snapshot_rows_oldest_first_and_purge(new_mount):
    m = new_mount.start(*SLOW)
    slow_source(m)
    put(m.path("SMALL"), pattern(5, MiB))
    ctl(m.mnt, "SMALL S1")
    wait_completed(m, "SMALL", "S1")
    ctl(m.mnt, "FOO BAR")
    ctl(m.mnt, "SMALL S2")
    wait_completed(m, "SMALL", "S2")
    first = wait_running(m, "FOO", "BAR", 10)
    rows = status_rows(m.mnt)
    assert [r[:2] for r in rows] == [("SMALL", "S1"), ("FOO", "BAR"), ("SMALL", "S2")]
    assert rows[0][2] == rows[2][2] == "Completed" and pct(rows[1][2]) is not None

    # An open status file is a snapshot: reading it again (even from offset 0) gives
    # the same table while new opens see the progress.
    fd = os.open(ctl_path(m.mnt, "status"), os.O_RDONLY)
    try:
        snap = os.read(fd, 1 << 16)
        snap_rows = parse_status(snap.decode())
        snap_pct = pct(dict(((s, d), p) for s, d, p in snap_rows)[("FOO", "BAR")])
        assert snap_pct >= first
        wait_running(m, "FOO", "BAR", snap_pct + 1)
        assert os.pread(fd, 1 << 16, 0) == snap
        assert os.read(fd, 1 << 16) == b""
    finally:
        os.close(fd)
    # Reading in small pieces reassembles one consistent table.
    with open(ctl_path(m.mnt, "status"), "rb", buffering=0) as f:
        pieces = iter(lambda: f.read(7), b"")
        assert [r[:2] for r in parse_status(b"".join(pieces).decode())] == \
            [("SMALL", "S1"), ("FOO", "BAR"), ("SMALL", "S2")]

    # purge clears the finished rows only; the running clone keeps its row.
    ctl(m.mnt, "purge")
    rows = status_rows(m.mnt)
    assert [r[:2] for r in rows] == [("FOO", "BAR")] and pct(rows[0][2]) is not None
    ctl(m.mnt, "-s FOO -c")
    assert status_rows(m.mnt) == [("FOO", "BAR", "Cancelled")]
    ctl(m.mnt, "SMALL S3")
    wait_completed(m, "SMALL", "S3")
    assert status_rows(m.mnt) == [("FOO", "BAR", "Cancelled"), ("SMALL", "S3", "Completed")]
    ctl(m.mnt, "-p")
    assert status_rows(m.mnt) == []
    # Purging forgets operations, not VDisks.
    assert listing(m.mnt) == {"FOO", "SMALL", "S1", "S2", "S3"}
    for name in ("S1", "S2", "S3"):
        assert get(m.path(name)) == pattern(5, MiB)


# ================================================================ point in time
def test_point_in_time_while_the_source_changes(new_mount):
    m = new_mount.start(*SLOW)
    foo, shr = m.path("FOO"), m.path("SHR")
    orig = slow_source(m, "FOO", 40 * MiB, seed=6)     # pages 0-9 full
    os.truncate(foo, 48 * MiB)                          # pages 10-11: holes
    orig += bytes(8 * MiB)
    shr_orig = slow_source(m, "SHR", 24 * MiB, seed=7)
    ctl(m.mnt, "FOO BAR")
    ctl(m.mnt, "-s SHR -d SHC")

    # While both run: change FOO ahead of the job (a mapped page and a hole), behind it
    # (page 0 is shared first) and past its end; shrink SHR, regrow it and rewrite a page.
    now = orig
    for off, data in ((9 * PAGE + 12345, pattern(8, MiB)), (11 * PAGE, pattern(9, MiB)),
                      (100, pattern(10, 4 * KiB)), (52 * MiB, b"past the end")):
        put(foo, data, off)
        now = patched(now, off, data)
    os.truncate(shr, MiB)
    os.truncate(shr, 24 * MiB)
    put(shr, pattern(11, 2 * MiB), 5 * PAGE)
    shr_now = patched(shr_orig[:MiB] + bytes(23 * MiB), 5 * PAGE, pattern(11, 2 * MiB))
    # (SHR's job may be done already: the shrink handed it all its pages at once.)
    assert_running(m, ("FOO", "BAR"))

    wait_completed(m, "FOO", "BAR")
    wait_completed(m, "SHR", "SHC")
    same(m.path("BAR"), orig, "BAR (clone as of its start)")
    same(foo, now, "FOO")
    same(m.path("SHC"), shr_orig, "SHC (clone as of its start)")
    same(shr, shr_now, "SHR")

    # Independent afterwards, both ways.
    put(m.path("BAR"), b"B" * 5000, 3 * PAGE - 10)
    same(foo, now, "FOO after writing BAR")
    put(foo, b"F" * 5000, 2 * PAGE)
    same(m.path("BAR"), patched(orig, 3 * PAGE - 10, b"B" * 5000), "BAR after writing FOO")
    same(m.path("SHC"), shr_orig, "SHC")


def test_several_clones_from_one_source(new_mount):
    m = new_mount.start(*SLOW)
    foo = m.path("FOO")
    v0 = slow_source(m, "FOO", 24 * MiB, seed=12)
    x, y, z = (pattern(s, MiB) for s in (13, 14, 15))
    ctl(m.mnt, "FOO B1")
    put(foo, x, 5 * PAGE)           # after B1 started: not in B1
    v1 = patched(v0, 5 * PAGE, x)
    ctl(m.mnt, "-s FOO -d B2")
    put(foo, y, 4 * PAGE + 7)       # not in B1 or B2
    v2 = patched(v1, 4 * PAGE + 7, y)
    ctl(m.mnt, "FOO B3")
    put(foo, z, 3 * PAGE)           # in none of them
    v3 = patched(v2, 3 * PAGE, z)
    assert_running(m, ("FOO", "B1"), ("FOO", "B2"), ("FOO", "B3"))
    for dst in ("B1", "B2", "B3"):
        wait_completed(m, "FOO", dst)
    same(m.path("B1"), v0, "B1")
    same(m.path("B2"), v1, "B2")
    same(m.path("B3"), v2, "B3")
    same(foo, v3, "FOO")
    serials = {xattr(m.path(n), "serial") for n in ("FOO", "B1", "B2", "B3")}
    assert len(serials) == 4, serials


def test_clone_of_a_clone_three_deep(mount):
    foo = mount.path("FOO")
    base = patched(pattern(16, 2 * MiB), 9 * MiB + 3, pattern(17, 300_000))
    put(foo, base)
    chain = ["FOO", "BAR", "BAZ", "QUX"]
    for src, dst in zip(chain, chain[1:]):
        ctl(mount.mnt, f"{src} {dst}")
        wait_completed(mount, src, dst)
    for name in chain:
        same(mount.path(name), base, name)
    # Each level is its own VDisk: a write to one shows in no other.
    for i, name in enumerate(chain):
        put(mount.path(name), name.encode() * 1000, MiB + 1)
    for name in chain:
        same(mount.path(name), patched(base, MiB + 1, name.encode() * 1000), name)
    assert len({xattr(mount.path(n), "serial") for n in chain}) == 4


def test_clone_inherits_size_and_lba_size_with_own_serial(mount):
    foo = mount.path("FOO")
    run(["truncate", "-s", "100M", foo])
    os.setxattr(foo, "user.vdisk.lba_size", b"4096")
    os.chmod(foo, 0o640)
    put(foo, pattern(18, 600_000), 50 * MiB)
    ctl(mount.mnt, "FOO BAR")
    wait_completed(mount, "FOO", "BAR")
    bar = mount.path("BAR")
    assert os.stat(bar).st_size == 100 * MiB
    assert xattr(bar, "lba_size") == "4096"
    assert xattr(foo, "lba_size") == "4096"
    assert os.stat(bar).st_mode & 0o7777 == 0o640
    assert xattr(bar, "serial") and xattr(bar, "serial") != xattr(foo, "serial")
    # The property is the clone's own from now on.
    os.setxattr(bar, "user.vdisk.lba_size", b"512")
    assert (xattr(bar, "lba_size"), xattr(foo, "lba_size")) == ("512", "4096")
    # A default source gives a default clone.
    run(["truncate", "-s", "1M", mount.path("PLAIN")])
    ctl(mount.mnt, "PLAIN P2")
    wait_completed(mount, "PLAIN", "P2")
    assert xattr(mount.path("P2"), "lba_size") == "512"
    assert os.stat(mount.path("P2")).st_size == MiB


def test_clone_of_empty_and_thin_vdisks(mount):
    put(mount.path("EMPTY"), b"")
    run(["truncate", "-s", "10G", mount.path("THIN")])
    put(mount.path("ZEROS"), bytes(3 * MiB))           # written, but all zero: no chunks
    for src in ("EMPTY", "THIN", "ZEROS"):
        ctl(mount.mnt, f"{src} {src}2")
        wait_completed(mount, src, f"{src}2")
        st = os.stat(mount.path(f"{src}2"))
        assert st.st_size == os.stat(mount.path(src)).st_size and st.st_blocks == 0
    assert get(mount.path("EMPTY2")) == b""
    assert get(mount.path("ZEROS2")) == bytes(3 * MiB)
    with open(mount.path("THIN2"), "rb") as f:
        f.seek(10 * 1024 * MiB - MiB)
        assert f.read() == bytes(MiB)
    put(mount.path("THIN2"), b"x", 5 * 1024 * MiB)
    assert os.stat(mount.path("THIN")).st_blocks == 0


def test_writeback_data_is_flushed_into_the_clone(mount):
    """Data written (no fsync, file still open) just before the clone command is in the
    clone: the daemon flushes the kernel's dirty pages of the source first."""
    foo = mount.path("FOO")
    data = pattern(19, 6 * MiB + 1234)
    fd = os.open(foo, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.pwrite(fd, b"tail", 20 * MiB)
        ctl(mount.mnt, "FOO BAR")
        wait_completed(mount, "FOO", "BAR")
    finally:
        os.close(fd)
    same(mount.path("BAR"), patched(data, 20 * MiB, b"tail"), "BAR")


# ================================================================ busy names
def test_source_and_destination_are_protected_while_cloning(new_mount):
    m = new_mount.start(*SLOW)
    data = slow_source(m)
    put(m.path("OTHER"), b"other")
    ctl(m.mnt, "FOO BAR")
    assert "BAR" in listing(m.mnt)            # listed at once
    wait_running(m, "FOO", "BAR", 10)
    foo, bar = m.path("FOO"), m.path("BAR")
    # The destination is listed at once, with the source's size, and cannot be opened.
    assert "BAR" in listing(m.mnt)
    assert os.stat(bar).st_size == len(data)
    assert open_errno(bar, os.O_RDONLY) == errno.EBUSY
    assert open_errno(bar, os.O_RDWR) == errno.EBUSY
    # Its name is reserved.
    assert open_errno(bar, os.O_RDWR | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    assert ctl_errno(m.mnt, "FOO BAR") == errno.EEXIST
    assert ctl_errno(m.mnt, "-s OTHER -d BAR") == errno.EEXIST
    # An unfinished clone is no source.
    assert ctl_errno(m.mnt, "BAR BAZ") == errno.EBUSY
    assert ctl_errno(m.mnt, "-s BAR -d BAZ") == errno.EBUSY
    # The source cannot be deleted or renamed.
    assert errno_of(os.unlink, foo) == errno.EBUSY
    assert errno_of(os.rename, foo, m.path("FOO2")) == errno.EBUSY
    proc = run(["rm", "-f", foo], check=False)
    assert proc.returncode != 0 and "busy" in proc.stderr.lower(), proc
    assert_running(m, ("FOO", "BAR"))
    assert listing(m.mnt) == {"FOO", "BAR", "OTHER"}
    # ... but it stays readable and writable.
    same(foo, data, "FOO")
    wait_completed(m, "FOO", "BAR")
    same(bar, data, "BAR")
    # Once complete, everything is allowed again.
    os.rename(foo, m.path("FOO2"))
    os.unlink(m.path("FOO2"))
    same(bar, data, "BAR after its source went")
    assert listing(m.mnt) == {"BAR", "OTHER"}


def test_rename_onto_a_reserved_destination_is_eexist(new_mount):
    m = new_mount.start(*SLOW)
    data = slow_source(m)
    put(m.path("OTHER"), b"other")
    ctl(m.mnt, "FOO BAR")
    wait_running(m, "FOO", "BAR", 10)
    err = errno_of(os.rename, m.path("OTHER"), m.path("BAR"))
    assert_running(m, ("FOO", "BAR"))
    assert listing(m.mnt) == {"FOO", "BAR", "OTHER"}
    assert get(m.path("OTHER")) == b"other"
    ctl(m.mnt, "cancel FOO")
    assert err == errno.EEXIST, f"rename onto the reserved name: {errno.errorcode.get(err, err)}"
    same(m.path("FOO"), data)


# ================================================================ cancel and space
def test_cancel_removes_destination_and_releases_space(new_mount):
    m = new_mount.start(*SLOW)
    foo = m.path("FOO")
    data = slow_source(m)
    commit(foo)
    used0, du0 = used_bytes(m.mnt), data_du(m.pool)
    ctl(m.mnt, "FOO BAR")
    wait_running(m, "FOO", "BAR", 30)
    ctl(m.mnt, "-s FOO -d BAZ")
    # Overwrite the first two pages (shared with BAR and BAZ by now): new chunks for FOO,
    # the old ones are held by the clones only.
    new = pattern(20, 2 * PAGE)
    put(foo, new)
    assert_running(m, ("FOO", "BAR"), ("FOO", "BAZ"))
    grown = used_bytes(m.mnt) - used0
    assert grown >= 2 * PAGE, f"the clones should hold the overwritten chunks ({grown})"

    ctl(m.mnt, "cancel FOO")          # cancels every clone in progress from FOO
    assert status_rows(m.mnt) == [("FOO", "BAR", "Cancelled"), ("FOO", "BAZ", "Cancelled")]
    assert [(r[2], r[4]) for r in jobs_rows(m.mnt)] == [("Cancelled", 0)] * 2   # holds nothing
    assert listing(m.mnt) == {"FOO"}
    for name in ("BAR", "BAZ"):
        assert open_errno(m.path(name)) == errno.ENOENT
        assert errno_of(os.stat, m.path(name)) == errno.ENOENT
    assert ctl_errno(m.mnt, "cancel FOO") == errno.ENOENT
    assert ctl_errno(m.mnt, "-s FOO -c") == errno.ENOENT
    commit(foo)
    # The backing filesystem gets the space back once I/O pauses (fs/puncher.py).
    wait_until(lambda: abs(used_bytes(m.mnt) - used0) < MiB and abs(data_du(m.pool) - du0) < MiB,
               f"df used ({used0}) and du of POOL/data ({du0}) as before the clones")
    same(foo, new + data[len(new):], "FOO")

    # The names are free again.
    ctl(m.mnt, "FOO BAR")
    assert_running(m, ("FOO", "BAR"))
    ctl(m.mnt, "-s FOO -c")
    assert status_rows(m.mnt)[-1] == ("FOO", "BAR", "Cancelled")
    assert listing(m.mnt) == {"FOO"}
    m.stop()
    fsck_clean(m.pool)
    assert abs(data_du(m.pool) - du0) < MiB, (du0, data_du(m.pool))


def test_cancelled_destination_is_gone_when_cancel_returns(new_mount):
    m = new_mount.start(*SLOW)
    slow_source(m)
    stale = []
    for i in range(50):
        ctl(m.mnt, "FOO BAR")
        os.stat(m.path("BAR"))                      # the kernel now knows the name
        assert open_errno(m.path("BAR")) == errno.EBUSY
        ctl(m.mnt, "cancel FOO")
        if errno_of(os.stat, m.path("BAR")) != errno.ENOENT:
            stale.append(i)
        assert open_errno(m.path("BAR")) == errno.ENOENT
    ctl(m.mnt, "purge")
    assert listing(m.mnt) == {"FOO"}
    assert not stale, f"stat(BAR) succeeded after the cancel returned in rounds {stale}"


def test_clone_of_256mib_takes_no_data_space(mount):
    foo = mount.path("FOO")
    block = pattern(21, MiB)
    fd = os.open(foo, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for i in range(256):
            os.pwrite(fd, block[i:] + block[:i], i * MiB)   # 256 different MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    used0, du0 = used_bytes(mount.mnt), data_du(mount.pool)
    assert du0 >= 256 * MiB
    ctl(mount.mnt, "FOO BAR")
    wait_completed(mount, "FOO", "BAR")
    commit(foo)
    used1, du1 = used_bytes(mount.mnt), data_du(mount.pool)
    assert du1 - du0 < MiB, f"POOL/data grew by {du1 - du0} bytes"
    assert used1 - used0 < MiB, f"df used grew by {used1 - used0} bytes"
    bar = mount.path("BAR")
    assert int(xattr(bar, "shared")) == 256 * MiB
    assert int(xattr(bar, "allocated")) == 256 * MiB
    assert int(xattr(bar, "unique")) == 0
    assert int(xattr(foo, "shared")) == 256 * MiB
    jobs = [r for r in jobs_rows(mount.mnt) if r[:2] == ("FOO", "BAR")]
    assert jobs and jobs[0][2:3] == ("Completed",) and jobs[0][4] == 256 * MiB
    with open(bar, "rb") as f:
        for i in (0, 77, 255):
            f.seek(i * MiB)
            assert f.read(MiB) == block[i:] + block[:i], f"BAR MiB {i}"
    # Writing the clone takes space for what was written only.
    put(bar, pattern(22, MiB), 10 * MiB)
    assert int(xattr(bar, "unique")) == MiB
    assert int(xattr(foo, "unique")) == MiB
    assert MiB <= used_bytes(mount.mnt) - used1 < 2 * MiB


# ================================================================ restarts and crashes
def test_clone_resumes_after_remount(new_mount):
    m = new_mount.start(*SLOW)
    data = slow_source(m)
    slow_source(m, "SRC2", 20 * MiB, seed=25)
    ctl(m.mnt, "FOO BAR")
    ctl(m.mnt, "SRC2 BAZ")
    before = wait_running(m, "FOO", "BAR", 20)
    m.stop()
    m.start(*SLOW)
    # Still the same single row, not gone back, and BAR still unopenable while it runs.
    st = state_of(m.mnt, "FOO", "BAR")
    err = open_errno(m.path("BAR"))
    st2 = state_of(m.mnt, "FOO", "BAR")
    assert st is not None and st != "Error", f"after remount: {status_rows(m.mnt)}"
    if pct(st) is not None:
        assert pct(st) >= before, f"progress went back from {before}% to {st}"
        assert err == errno.EBUSY or st2 == "Completed"
    # A resumed clone can be cancelled like any other.
    if pct(state_of(m.mnt, "SRC2", "BAZ")) is not None:
        ctl(m.mnt, "cancel SRC2")
        assert state_of(m.mnt, "SRC2", "BAZ") == "Cancelled"
        assert "BAZ" not in listing(m.mnt)
    wait_completed(m, "FOO", "BAR")
    assert [r[:2] for r in status_rows(m.mnt)] == [("FOO", "BAR"), ("SRC2", "BAZ")]
    same(m.path("BAR"), data, "BAR")
    m.stop()
    fsck_clean(m.pool)


def test_clone_resumes_after_kill9(new_mount):
    m = new_mount.start(*SLOW)
    foo = m.path("FOO")
    data = slow_source(m)
    ctl(m.mnt, "FOO BAR")
    # A change ahead of the job, made durable (it commits the clone's start with it).
    put(foo, pattern(23, MiB), 8 * PAGE + 5)
    now = patched(data, 8 * PAGE + 5, pattern(23, MiB))
    wait_running(m, "FOO", "BAR", 30)
    m.kill9()
    fsck_clean(m.pool)          # a crashed pool with a clone in progress is consistent
    m.start(*SLOW)
    st = state_of(m.mnt, "FOO", "BAR")
    err = open_errno(m.path("BAR"))
    st2 = state_of(m.mnt, "FOO", "BAR")
    assert st is not None and st not in ("Error", "Cancelled"), \
        f"after kill -9: {status_rows(m.mnt)}\n{daemon_log(m.pool, tail=30)}"
    if pct(st) is not None:
        assert err == errno.EBUSY or st2 == "Completed", "a half-made clone was opened"
    wait_completed(m, "FOO", "BAR")
    same(m.path("BAR"), data, "BAR")
    same(foo, now, "FOO")
    m.stop()
    fsck_clean(m.pool)


def test_completed_is_durable(new_mount):
    """Once the status says Completed, a crash does not take it back."""
    # One full 4 MiB page at 2 MiB/s: the job's only step is also its last.
    m = new_mount.start("--chunk-size", "4K", "--clone-speed", "2M")
    data = slow_source(m, size=PAGE)
    ctl(m.mnt, "FOO BAR")
    wait_completed(m, "FOO", "BAR")
    m.kill9()
    m.start("--chunk-size", "4K", "--clone-speed", "2M")
    rows = status_rows(m.mnt)
    assert rows == [("FOO", "BAR", "Completed")], \
        f"after kill -9: {rows}, VDisks {sorted(listing(m.mnt))}"
    assert open_errno(m.path("BAR")) == 0
    same(m.path("BAR"), data, "BAR")
    m.stop()
    fsck_clean(m.pool)


def test_started_clone_survives_a_crash(new_mount):
    """A clone whose start was acknowledged is resumed (or reported) after kill -9."""
    m = new_mount.start(*SLOW)
    data = slow_source(m)
    ctl(m.mnt, "FOO BAR")
    assert_running(m, ("FOO", "BAR"))
    m.kill9()
    m.start(*SLOW)
    rows = status_rows(m.mnt)
    assert [r[:2] for r in rows] == [("FOO", "BAR")], \
        f"the clone vanished in the crash: rows {rows}, VDisks {sorted(listing(m.mnt))}"
    if follow(m, "FOO", "BAR")[-1] == "Completed":
        same(m.path("BAR"), data, "BAR")
    else:
        assert "BAR" not in listing(m.mnt)


def test_cancel_survives_a_crash(new_mount):
    """A cancelled clone stays cancelled: it does not come back after kill -9."""
    m = new_mount.start(*SLOW)
    slow_source(m)
    ctl(m.mnt, "FOO BAR")
    commit(m.path("FOO"))                 # the clone's start is durable
    wait_running(m, "FOO", "BAR", 10)
    ctl(m.mnt, "cancel FOO")
    assert state_of(m.mnt, "FOO", "BAR") == "Cancelled"
    m.kill9()
    m.start(*SLOW)
    st = state_of(m.mnt, "FOO", "BAR")
    names = sorted(listing(m.mnt))
    assert st == "Cancelled" and names == ["FOO"], \
        f"after kill -9 the cancelled clone is {st}, VDisks {names}"


# ================================================================ the command line
def test_cli_start_wait_list_purge(mount):
    put(mount.path("FOO"), pattern(24, 3 * MiB))
    mnt = mount.mnt
    out = assert_ok(cli("-s", "FOO", "-d", "BAR", "--mount", mnt))
    assert out.strip() == "Clone of FOO to BAR successfully started"
    wait_completed(mount, "FOO", "BAR")
    # -w: started, then waits for the end (not a tty: one line per state).
    out = assert_ok(cli("-s", "FOO", "-d", "BAZ", "-w", "--mount", mnt))
    lines = out.strip().splitlines()
    assert lines[0] == "Clone of FOO to BAZ successfully started"
    assert "Completed" in lines[-1], out
    assert state_of(mnt, "FOO", "BAZ") == "Completed"
    # The same program as `vdiskfs clone`.
    out = assert_ok(cli("clone", "-s", "FOO", "-d", "QUX", "--wait", "--mount", mnt,
                        prog=VDISKFS_BIN))
    assert out.splitlines()[0] == "Clone of FOO to QUX successfully started"
    for name in ("BAR", "BAZ", "QUX"):
        same(mount.path(name), pattern(24, 3 * MiB), name)

    out = assert_ok(cli("-l", "--mount", mnt))
    assert parse_status(out) == [("FOO", "BAR", "Completed"), ("FOO", "BAZ", "Completed"),
                                 ("FOO", "QUX", "Completed")]
    out = assert_ok(cli("-l", "-e", "--mount", mnt))
    lines = out.splitlines()
    assert lines[0].split() == HEADER + ["Elapsed", "Shared"]
    for line in lines[1:]:
        f = line.split()
        assert len(f) == 5 and f[2] == "Completed", line
        assert re.fullmatch(r"\d+(\.\d+)?s", f[3]), line
        assert int(f[4]) == 3 * MiB, line
    out = assert_ok(cli("-l", "-p", "--mount", mnt))
    assert len(parse_status(out)) == 3          # printed, then purged
    assert status_rows(mnt) == []
    assert parse_status(assert_ok(cli("-l", "--mount", mnt))) == []
    # -p alone purges too.
    assert_ok(cli("-s", "FOO", "-d", "Q2", "-w", "--mount", mnt))
    assert_ok(cli("-p", "--mount", mnt))
    assert status_rows(mnt) == []
    assert_ok(cli("--help"))
    assert_ok(cli("clone", "--help", prog=VDISKFS_BIN))


def test_cli_cancel_and_wait_reports_cancelled(new_mount):
    m = new_mount.start(*SLOW)
    data = slow_source(m)
    waiter = subprocess.Popen([QCLONE, "-s", "FOO", "-d", "BAR", "-w", "--mount", m.mnt],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_running(m, "FOO", "BAR", 10)
        out = assert_ok(cli("-s", "FOO", "-c", "--mount", m.mnt))
        assert "FOO" in out
        out, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode != 0, f"-w exited 0 for a cancelled clone:\n{out}{err}"
    assert "Traceback" not in out + err
    assert out.splitlines()[0] == "Clone of FOO to BAR successfully started"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cancel" in lines[0].lower(), err
    assert state_of(m.mnt, "FOO", "BAR") == "Cancelled"
    assert listing(m.mnt) == {"FOO"}
    same(m.path("FOO"), data)
    # Cancelling again: nothing in progress.
    assert_user_error(cli("-s", "FOO", "-c", "--mount", m.mnt), "FOO")


def test_cli_errors_are_one_line(mount):
    put(mount.path("FOO"), b"foo")
    put(mount.path("EXIST"), b"exist")
    mnt = mount.mnt
    cases = [
        (["-s", "NOPE", "-d", "BAR"], "NOPE"),
        (["-s", "FOO", "-d", "EXIST"], "EXIST"),
        (["-s", "FOO", "-d", "FOO"], "FOO"),
        (["-s", "FOO", "-c"], "FOO"),
        (["-s", "FOO", "-d", ".bad"], ".bad"),
        (["-s", "FOO", "-d", "a/b"], ""),
        (["-s", "FOO", "-d", "X" * 65], ""),
        (["-s", "FOO"], ""),
        (["-d", "BAR"], ""),
        (["-c"], ""),
        (["-l", "-s", "FOO"], ""),
        (["-p", "-s", "FOO"], ""),
        ([], ""),
    ]
    for args, needle in cases:
        assert_user_error(cli(*args, "--mount", mnt), needle)
    assert_user_error(cli("-l", "--mount", os.path.dirname(mnt)), "not a vdiskfs mount")
    # An unknown flag is refused by the argument parser (usage text allowed), no traceback.
    proc = cli("-s", "FOO", "-d", "BAR", "--bogus", "--mount", mnt)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert status_rows(mnt) == []
    assert listing(mnt) == {"FOO", "EXIST"}


def test_cli_finds_the_mount(mount, tmp_path):
    put(mount.path("FOO"), b"foo" * 1000)
    mnt = mount.mnt
    # --mount, then $VDISKFS_MOUNT (--mount wins over it).
    assert parse_status(assert_ok(cli("-l", "--mount", mnt))) == []
    assert parse_status(assert_ok(cli("-l", env={"VDISKFS_MOUNT": mnt}))) == []
    assert_ok(cli("-s", "FOO", "-d", "E1", "-w", env={"VDISKFS_MOUNT": mnt}))
    assert_ok(cli("-l", "--mount", mnt, env={"VDISKFS_MOUNT": str(tmp_path)}))
    assert_user_error(cli("-l", env={"VDISKFS_MOUNT": str(tmp_path)}), "not a vdiskfs mount")

    # The only vdiskfs mount in /proc/mounts. Other test sessions may have mounts of their
    # own: hide them in a private mount namespace (their daemons are not affected).
    hide = ("for m in $(awk '$3 == \"fuse.vdiskfs\" {print $2}' /proc/self/mounts); do "
            "[ \"$m\" = \"$1\" ] || umount -l \"$m\" 2>/dev/null; done; ")
    env = {k: v for k, v in os.environ.items() if k != "VDISKFS_MOUNT"}
    proc = run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                hide + f"exec {QCLONE} -s FOO -d AUTO -w", "sh", mnt], check=False, env=env)
    assert_ok(proc)
    assert state_of(mnt, "FOO", "AUTO") == "Completed"
    assert get(mount.path("AUTO")) == b"foo" * 1000
    # No vdiskfs mount at all: a clear error.
    proc = run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                hide + f"exec {QCLONE} -l", "sh", "(none)"], check=False, env=env)
    assert_user_error(proc, "no vdiskfs mount")
    assert os.path.ismount(mnt)   # hidden in the namespace only

    # Two mounts: ambiguous without --mount or $VDISKFS_MOUNT.
    second = Mount(str(tmp_path / "pool2"), str(tmp_path / "mnt2"))
    try:
        second.start()
        put(second.path("TWO"), b"two")
        line = assert_user_error(cli("-l"), "several")
        assert mnt in line and second.mnt in line
        assert_ok(cli("-s", "TWO", "-d", "TWO2", "-w", "--mount", second.mnt))
        assert_ok(cli("-s", "FOO", "-d", "ONE2", "-w", env={"VDISKFS_MOUNT": mnt}))
        assert get(second.path("TWO2")) == b"two"
        assert listing(second.mnt) == {"TWO", "TWO2"}
        assert listing(mnt) == {"FOO", "E1", "AUTO", "ONE2"}
        second.stop()
    finally:
        second.cleanup()
    fsck_clean(second.pool)
