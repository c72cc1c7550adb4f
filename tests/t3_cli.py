"""The command line as a user meets it (issue 13): ``vdiskfs list`` / ``info``, one-line
errors for every subcommand, mount refusals and dead mounts, ``qclone`` naming any VDisk,
``df -i`` and ``ls -a``, honest progress bars, progress that never goes back after a
crash, and the warnings of a filling or overcommitted pool.

Everything runs through the real CLI against real mounts (the ``mount`` fixtures)."""

from __future__ import annotations

import errno
import json
import os
import pty
import random
import re
import select
import subprocess
import sys
import time

import pytest

from support.clones import SLOW, state_of
from support.common import (VDISKFS, Mount, assert_user_error, daemon_log, flip_byte,
                            is_mounted, run, vdiskfs, wait_until, write_file)

pytestmark = pytest.mark.mount

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def qclone(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-c", "import sys; from vdiskfs.cli import qclone_main; "
                               "sys.exit(qclone_main())"] + list(args), check=check, **kw)


def listing(m: Mount) -> dict:
    return json.loads(vdiskfs("list", "--json", "--mount", m.mnt).stdout)


def rows(m: Mount, *opts: str) -> list[list[str]]:
    out = vdiskfs("list", "-H", *opts, "--mount", m.mnt).stdout
    return [line.split() for line in out.splitlines()]


# ---------------------------------------------------------------- list / info
def test_list_and_info_show_sizes_sharing_and_states(new_mount):
    m = new_mount.start(*SLOW)
    data = random.Random(3).randbytes(40 * MiB)      # 10 map pages: a visible clone
    write_file(m.path("FOO"), data)
    os.truncate(m.path("FOO"), 1 * GiB)
    vdiskfs("create", "SMALL", "10M", "--mount", m.mnt)
    vdiskfs("clone", "-s", "SMALL", "-d", "SMALL2", "-w", "--mount", m.mnt)

    doc = listing(m)
    assert doc["format"] == 1
    by = {v["name"]: v for v in doc["vdisks"]}
    assert sorted(by) == ["FOO", "SMALL", "SMALL2"]
    foo = by["FOO"]
    assert (foo["size"], foo["allocated"], foo["unique"], foo["shared"]) == \
        (GiB, 40 * MiB, 40 * MiB, 0)
    assert foo["state"] == "ok" and foo["lba_size"] == 512 and foo["errors"] == 0
    assert foo["serial"] == os.getxattr(m.path("FOO"), "user.vdisk.serial").decode()
    pool = doc["pool"]
    assert pool["vdisks"] == 3 and pool["provisioned"] == GiB + 20 * MiB
    assert pool["stored"] == 40 * MiB and pool["saved"] == 0
    assert pool["backing_capacity"] > 0 and 0 <= pool["backing_percent"] <= 100

    # A clone in progress: the destination is "cloning N%", its source "clone source";
    # an open VDisk is "in use". Then the clone shares everything: saved = its size.
    vdiskfs("clone", "-s", "FOO", "-d", "BAR", "--mount", m.mnt)
    wait_until(lambda: (state_of(m.mnt, "FOO", "BAR") or "").endswith("%"), "clone running")
    with open(m.path("SMALL"), "rb"):
        table = rows(m, "-o", "name,state")
    states = {r[0]: " ".join(r[1:]) for r in table}
    assert states["FOO"] == "clone source", table
    assert re.fullmatch(r"cloning \d+%", states["BAR"]), table
    assert states["SMALL"] == "in use" and states["SMALL2"] == "ok", table
    vdiskfs("clone", "-s", "FOO", "-d", "BAR2", "--mount", m.mnt, check=False)
    wait_until(lambda: listing(m)["pool"]["saved"] == 80 * MiB
               and all(v["state"] != "cloning" for v in listing(m)["vdisks"]),
               "clones to complete", timeout=60)
    by = {v["name"]: v for v in listing(m)["vdisks"]}
    assert by["BAR"]["shared"] == 40 * MiB and by["BAR"]["unique"] == 0
    assert by["FOO"]["shared"] == 40 * MiB

    # The table: default columns, human sizes; -p exact bytes; -o chooses columns.
    out = vdiskfs("list", "--mount", m.mnt).stdout.splitlines()
    assert out[0].split() == ["NAME", "SIZE", "ALLOC", "UNIQUE", "SHARED", "LBA", "SERIAL",
                              "STATE"]
    assert out[1].split()[:5] == ["BAR", "1G", "40M", "0B", "40M"]
    summary = [line for line in out if line.startswith("pool ")]
    assert len(summary) == 1 and "sharing saves 80M" in summary[0], out
    assert rows(m, "-p", "-o", "name,size,allocated")[1] == ["BAR2", str(GiB), str(40 * MiB)]
    assert_user_error(vdiskfs("list", "-o", "name,bogus", "--mount", m.mnt, check=False),
                      "bogus")

    info = json.loads(vdiskfs("info", "BAR", "--json", "--mount", m.mnt).stdout)
    assert info["name"] == "BAR" and info["chunk_size"] == 4096 and info["state"] == "ok"
    text = vdiskfs("info", "FOO", "--mount", m.mnt).stdout
    assert "size: 1G (1073741824 bytes)" in text and "state: ok" in text, text
    assert_user_error(vdiskfs("info", "NOPE", "--mount", m.mnt, check=False), "no VDisk NOPE")


def test_list_shows_error_state_of_damaged_vdisk(mount):
    data = random.Random(5).randbytes(4 * MiB)
    write_file(mount.path("FOO"), data)
    mount.stop()
    from vdiskfs.cow.pool import Pool
    p = Pool(mount.pool, readonly=True)
    try:
        slot = p.meta.slot_of(p.lookup("FOO"), 0)
        pos = slot * p.chunk_size
    finally:
        p.close()
    flip_byte(os.path.join(mount.pool, "data"), pos + 100)
    mount.start()
    # Found by a scrub first, then by a read.
    assert vdiskfs("scrub", "--mount", mount.mnt, check=False).returncode == 1
    v = listing(mount)["vdisks"][0]
    assert (v["name"], v["state"], v["errors"]) == ("FOO", "Error", 0)
    fd = os.open(mount.path("FOO"), os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as e:
            os.preadv(fd, [memoryview(bytearray(4096))], 0)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    v = listing(mount)["vdisks"][0]
    assert (v["name"], v["state"], v["errors"]) == ("FOO", "Error", 1)


# ---------------------------------------------------------------- errors
def test_every_subcommand_refuses_bad_input_in_one_line(mount, tmp_path):
    mnt = mount.mnt
    write_file(mount.path("FOO"), b"x")
    dead = str(tmp_path / "nomount")
    os.mkdir(dead)
    cases = [
        (["create", "NEW7", "100000000000000000000000", "--mount", mnt], ["too large"]),
        (["create", "NEW5", "2P", "--mount", mnt], ["too large"]),
        (["create", "X", "-5G", "--mount", mnt], ["negative"]),
        (["create", "X", "ten", "--mount", mnt], ["bad size"]),
        (["create", ".hid", "1G", "--mount", mnt], ["invalid VDisk name"]),
        (["create", "a/b", "1G", "--mount", mnt], ["invalid VDisk name"]),
        (["create", "FOO", "1G", "--mount", mnt], ["exists"]),
        (["create", "X", "1G", "--mount", dead], ["not a vdiskfs mount"]),
        (["info", "NOPE", "--mount", mnt], ["no VDisk"]),
        (["list", "--mount", dead], ["not a vdiskfs mount"]),
        (["clone", "-s", "NOPE", "-d", "BAR", "--mount", mnt], ["does not exist"]),
        (["clone", "-s", "FOO", "-d", "FOO", "--mount", mnt], ["exists"]),
        (["clone", "-s", "FOO", "-c", "--mount", mnt], ["no clone in progress"]),
        (["clone", "-s", "FOO", "--mount", mnt], ["-d"]),
        (["clone", "-l", "--mount", dead], ["not a vdiskfs mount"]),
        (["scrub", "--mount", dead], ["not a vdiskfs mount"]),
        (["umount", dead], ["not a vdiskfs mount"]),
        (["umount", str(tmp_path / "missing")], ["not a vdiskfs mount"]),
        (["fsck", str(tmp_path / "missing")], ["not a vdiskfs pool"]),
        (["fsck", mount.pool], ["unmount it first"]),
        (["mount", "/etc/passwd", str(tmp_path)], ["not a directory"]),
        (["mount", str(tmp_path / "a" / "b" / "pool"), dead], ["does not exist"]),
        (["mount", str(tmp_path / "p2"), "/etc/passwd"], ["not a directory"]),
        (["mount", str(tmp_path / "p2"), str(tmp_path / "nothere")], ["does not exist", "mkdir"]),
        (["mount", str(tmp_path / "p2"), dead, "--chunk-size", "3K"], ["power of two"]),
        (["mount", str(tmp_path / "p2"), dead, "--chunk-size", "lots"], ["bad size"]),
        (["mount", os.path.join(dead, "pool"), dead], ["inside the mount point"]),
        (["mount", dead, dead], ["inside the mount point"]),
        (["mount", str(tmp_path / "p2"), dead, "--nbd-readonly"], ["need --nbd"]),
        (["mount", str(tmp_path / "p2"), dead, "--nbd-readonly-export", "FOO"], ["need --nbd"]),
        (["mount", str(tmp_path / "p2"), dead, "--nbd", "tcp:nohost"], ["bad NBD endpoint"]),
        (["lst"], ["unknown command"]),
        (["bogus", "x", "y"], ["unknown command"]),
    ]
    for args, needles in cases:
        assert_user_error(vdiskfs(*args, check=False), *needles)
    # Nothing was left behind by the failed creates; nothing mounted at dead.
    assert sorted(os.listdir(mnt)) == [".ctl", "FOO"]
    assert not is_mounted(dead) and not os.path.exists(tmp_path / "p2" / "vdiskfs-pool")
    # Without --mount and with no or several mounts: named as such.
    env = dict(os.environ, VDISKFS_MOUNT=dead)
    assert_user_error(vdiskfs("list", check=False, env=env), "not a vdiskfs mount")


def test_qclone_names_any_vdisk_and_ctl_keywords_take_exact_arguments(mount):
    mnt = mount.mnt
    vdiskfs("create", "--mount", mnt, "--", "-s", "1M")
    write_file(mount.path("-s"), b"dash source")
    qclone("-s", "-s", "-d", "X", "-w", "--mount", mnt)
    qclone("--source", "-s", "--dest", "-d", "-w", "--mount", mnt)
    with open(mount.path("X"), "rb") as f:
        assert f.read(11) == b"dash source"
    with open(mount.path("-d"), "rb") as f:
        assert f.read(11) == b"dash source"
    for cmd in (b"purge now\n", b"-p -p\n", b"cancel\n", b"cancel A B\n"):
        fd = os.open(os.path.join(mnt, ".ctl", "clone"), os.O_WRONLY)
        try:
            with pytest.raises(OSError) as e:
                os.write(fd, cmd)
            assert e.value.errno == errno.EINVAL, cmd
        finally:
            os.close(fd)


# ---------------------------------------------------------------- mount refusals
def test_mount_refuses_mounts_nonempty_dirs_and_cleans_up_dead_mounts(mount, tmp_path):
    other = str(tmp_path / "p2")
    # Over the existing vdiskfs mount, with another pool: refused, named.
    assert_user_error(vdiskfs("mount", other, mount.mnt, check=False), "already a vdiskfs mount",
                      "vdiskfs umount")
    # Over another kind of mount point (a directory that is one): refused.
    assert_user_error(vdiskfs("mount", other, "/proc", check=False), "already a mount point")
    # A non-empty directory: refused unless --nonempty; its files reappear afterwards.
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert_user_error(vdiskfs("mount", other, str(full), check=False), "not empty",
                      "--nonempty")
    assert not os.path.exists(os.path.join(other, "vdiskfs-pool"))
    m2 = Mount(other, str(full))
    m2.start("--nonempty")
    try:
        assert sorted(os.listdir(full)) == [".ctl"]
    finally:
        m2.stop()
    assert (full / "keep.txt").read_text() == "mine"

    # The daemon killed: the mount is dead. `vdiskfs mount` sees its pool lock free,
    # cleans it up and mounts; `vdiskfs umount` of a dead mount unmounts it.
    write_file(mount.path("FOO"), b"kept")
    os.kill(mount.pid, 9)
    wait_until(lambda: not _locked(mount.pool), "the killed daemon to let go of the pool")
    proc = vdiskfs("mount", mount.pool, mount.mnt)
    assert "cleaned up the dead mount" in proc.stderr, proc.stderr
    with open(os.path.join(mount.pool, "lock")) as f:
        mount.pid = int(f.read())
    with open(mount.path("FOO"), "rb") as f:
        assert f.read() == b"kept"
    os.kill(mount.pid, 9)
    wait_until(lambda: not _locked(mount.pool), "the killed daemon to let go of the pool")
    for args in (["list"], ["info", "FOO"], ["create", "N", "1G"], ["clone", "-l"],
                 ["clone", "-s", "FOO", "-d", "N"], ["scrub"]):
        assert_user_error(vdiskfs(*args, "--mount", mount.mnt, check=False),
                          "dead vdiskfs mount", "vdiskfs umount")
    proc = vdiskfs("umount", mount.mnt)
    assert "dead mount" in proc.stderr and not is_mounted(mount.mnt)
    mount.pid = None
    # A second mount of a pool that is mounted says where.
    mount.start()
    assert_user_error(vdiskfs("mount", mount.pool, str(tmp_path / "p3"), check=False),
                      "already mounted at", mount.mnt)


def _locked(pool: str) -> bool:
    from vdiskfs.ctl.client import lock_holder
    return lock_holder(pool) is not None


# ---------------------------------------------------------------- df -i, ls -a
def test_df_inodes_and_dot_entries(mount):
    for name in ("A", "B", "C"):
        write_file(mount.path(name), b"x")
    out = run(["df", "-i", mount.mnt]).stdout.splitlines()[1].split()
    iused, ifree = int(out[2]), int(out[3])
    assert iused > 0 and ifree > 0, out
    assert iused < 16, out     # 3 VDisks, the root, .ctl and its files
    names = run(["ls", "-a", mount.mnt]).stdout.split()
    assert names == [".", "..", ".ctl", "A", "B", "C"], names
    assert run(["ls", "-a", os.path.join(mount.mnt, ".ctl")]).stdout.split()[:2] == [".", ".."]
    # find walks it without complaint (the entries' inodes are consistent).
    assert run(["find", mount.mnt]).returncode == 0


# ---------------------------------------------------------------- progress
def _on_a_tty(args: list[str], until: float = 60.0, stop=None) -> str:
    """Run ``args`` with stdout on a pseudo-terminal; returns what it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + until
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.1)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            if stop is not None and stop(out):
                stop = None
            if proc.poll() is not None and not r:
                break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return out.decode(errors="replace")


def test_progress_bar_of_a_cancelled_clone_is_not_drawn_full(new_mount):
    m = new_mount.start(*SLOW)
    write_file(m.path("FOO"), random.Random(7).randbytes(40 * MiB))
    seen = []

    def cancel_when_started(out: bytes) -> bool:
        if re.search(rb"\] +\d+%", out):
            vdiskfs("clone", "-s", "FOO", "-c", "--mount", m.mnt)
            seen.append(True)
            return True
        return False

    drawn = _on_a_tty(VDISKFS + ["clone", "-s", "FOO", "-d", "BAR", "-w", "--mount", m.mnt],
                      stop=cancel_when_started)
    assert seen, drawn
    end = re.search(r"\[([# ]{40})\]\s+(\d+)% Cancelled", drawn)
    assert end and end.group(1) != "#" * 40, repr(drawn)
    assert end.group(1).count("#") == int(end.group(2)) * 40 // 100, repr(drawn)
    # A completed one is drawn full.
    drawn = _on_a_tty(VDISKFS + ["clone", "-s", "FOO", "-d", "BAZ", "-w", "--mount", m.mnt])
    assert re.search(r"\[#{40}\]\s+100% Completed", drawn), repr(drawn)


def test_resumed_clone_progress_never_goes_backwards(new_mount):
    m = new_mount.start(*SLOW)
    write_file(m.path("FOO"), random.Random(8).randbytes(40 * MiB))
    vdiskfs("clone", "-s", "FOO", "-d", "BAR", "--mount", m.mnt)
    best = 0
    deadline = time.monotonic() + 60
    while best < 30:
        state = state_of(m.mnt, "FOO", "BAR")
        assert state and state.endswith("%"), f"clone ended ({state}) before 30%"
        best = max(best, int(state[:-1]))
        assert time.monotonic() < deadline
        time.sleep(0.02)
    m.kill9()
    m.start(*SLOW[2:])
    first = state_of(m.mnt, "FOO", "BAR")
    assert first is not None
    assert first == "Completed" or int(first[:-1]) >= best, (best, first)


# ---------------------------------------------------------------- capacity
@pytest.mark.loop
def test_thresholds_overcommit_and_full_pool_warnings(need_loop, tmp_path, kmounts):
    image = str(tmp_path / "backing.img")
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    run(["mkfs.ext4", "-q", "-F", "-m", "0", image])
    backing = kmounts.loop_mount(image, str(tmp_path / "backing"))
    m = Mount(os.path.join(backing, "pool"), str(tmp_path / "mnt"))
    try:
        m.start("--chunk-size", "64K")
        # A VDisk larger than the backing filesystem: create warns, the list says so.
        proc = vdiskfs("create", "BIG", "200M", "--mount", m.mnt)
        assert "overcommitted" in proc.stderr, proc.stderr
        doc = listing(m)
        assert any("overcommitted" in w for w in doc["pool"]["warnings"]), doc["pool"]
        # Growing with plain truncate: the daemon logs it.
        os.truncate(m.path("BIG"), 300 * MiB)
        wait_until(lambda: "is overcommitted" in daemon_log(m.pool), "overcommit log line")

        def fill_to(percent: int) -> None:
            st = os.statvfs(backing)
            room = (st.f_blocks - st.f_bfree + st.f_bavail) * st.f_frsize
            need = room * percent // 100 - (st.f_blocks - st.f_bfree) * st.f_frsize
            if need > 0:
                with open(os.path.join(backing, f"hog{percent}"), "wb") as f:
                    f.write(b"\xaa" * need)
                    os.fsync(f.fileno())

        warned = []
        for level in (80, 90, 95):
            fill_to(level + 2)
            pool = listing(m)["pool"]       # a listing checks at once (the daemon: every 5 s)
            assert any(f"past {level}%" in w for w in pool["warnings"]), pool
            warned.append(level)
            text = daemon_log(m.pool)
            for lv in warned:
                assert text.count(f"(past {lv}%)") == 1, text
        listing(m)
        assert daemon_log(m.pool).count("(past 95%)") == 1
        # A full pool: many failed writes, few log lines.
        fill_to(100)
        failures = 0
        fd = os.open(m.path("BIG"), os.O_WRONLY | os.O_DIRECT)
        buf = memoryview(bytearray(os.urandom(64 * KiB)))
        try:
            for i in range(200):
                try:
                    os.pwritev(fd, [buf], i * 64 * KiB)
                except OSError as e:
                    assert e.errno in (errno.ENOSPC, errno.EIO), e
                    failures += 1
        finally:
            os.close(fd)
        assert failures >= 20, failures
        text = daemon_log(m.pool)
        assert 1 <= text.count("is full:") <= 2, text[-3000:]
        assert "ERROR vdiskfs.fs.operations: write" not in text
    finally:
        m.cleanup()
        for name in os.listdir(backing):
            if name.startswith("hog"):
                os.unlink(os.path.join(backing, name))


def test_stop_hint_is_shell_quoted(need_fuse, tmp_path):
    pool, mnt = str(tmp_path / "my pool"), str(tmp_path / "my mnt")
    os.mkdir(mnt)
    m = Mount(pool, mnt)
    try:
        proc = vdiskfs("mount", pool, mnt)
        with open(os.path.join(pool, "lock")) as f:
            m.pid = int(f.read())
        hint = proc.stdout.split("stop with: ", 1)[1].strip()
        assert hint == f"vdiskfs umount '{mnt}'", proc.stdout
        run(["bash", "-c", hint.replace("vdiskfs", " ".join(VDISKFS), 1)])
        assert not is_mounted(mnt)
        m.pid = None
    finally:
        m.cleanup()
