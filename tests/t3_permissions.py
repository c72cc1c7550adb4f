"""Permissions (SPEC §1-§2, §4; docs: --allow-other): who may reach the mount and what file
modes allow.

- Without ``--allow-other`` (the default) only the mounting user (root) reaches the mount:
  another user gets EACCES/EPERM for everything, even a stat of the mount point.
- With ``--allow-other`` file modes apply (``default_permissions``): another user lists the
  mount and reads ``.ctl/status`` (0444) and a 0644 VDisk, but cannot write ``.ctl/clone``
  (0200, root's), cannot read a 0600 VDisk, cannot write a 0644 one, cannot create, delete or
  rename VDisks (the root directory is 0755 root's) — and refusals change nothing.
- Creating uses the mode of the creating call (umask applied by the kernel); chmod and
  chown work and persist across a remount.

The other user is ``nobody`` (65534), reached with ``setpriv``. Its mount point lives in a
0755 directory under /tmp (pytest's tmp_path is not traversable by other users).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import time

import pytest

from support.common import Mount, is_mounted, read_file, run

pytestmark = pytest.mark.mount

KiB = 1 << 10
MiB = 1 << 20
NOBODY = 65534
DENIED = {"EACCES", "EPERM"}

# Runs as nobody: each op → {"ok": result} or {"err": "ENAME"}.
_AGENT = r"""
import errno, hashlib, json, os, sys
def op(kind, *a):
    if kind == "stat":
        st = os.stat(a[0]); return [oct(st.st_mode), st.st_uid, st.st_gid, st.st_size]
    if kind == "listdir":
        return sorted(os.listdir(a[0]))
    if kind == "read":
        with open(a[0], "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    if kind == "write":
        fd = os.open(a[0], os.O_WRONLY)
        try:
            n = os.pwrite(fd, a[1].encode(), 0); os.fsync(fd); return n
        finally:
            os.close(fd)
    if kind == "ctl":
        fd = os.open(a[0], os.O_WRONLY | os.O_TRUNC)
        try:
            return os.write(fd, a[1].encode())
        finally:
            os.close(fd)
    if kind == "create":
        os.close(os.open(a[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)); return 0
    if kind == "unlink":
        return os.unlink(a[0])
    if kind == "rename":
        return os.rename(a[0], a[1])
    if kind == "truncate":
        return os.truncate(a[0], a[1])
    if kind == "mkdir":
        return os.mkdir(a[0])
    if kind == "chmod":
        return os.chmod(a[0], a[1])
    if kind == "setxattr":
        return os.setxattr(a[0], a[1], a[2].encode())
    if kind == "getxattr":
        return os.getxattr(a[0], a[1]).decode()
    raise ValueError(kind)
out = []
for item in json.loads(sys.argv[1]):
    try:
        out.append({"ok": op(*item)})
    except OSError as e:
        out.append({"err": errno.errorcode.get(e.errno, str(e.errno))})
print(json.dumps(out))
"""


def as_nobody(*ops: tuple) -> list[dict]:
    """Run file operations as uid/gid 65534 with no supplementary groups."""
    proc = run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                sys.executable, "-I", "-c", _AGENT, json.dumps(ops)], cwd="/")
    return json.loads(proc.stdout)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def status_text(m: Mount) -> str:
    with open(os.path.join(m.mnt, ".ctl", "status")) as f:
        return f.read()


@pytest.fixture
def public_mount(need_fuse, pool_dir):
    """A Mount (not started) whose mount point other users can reach: /tmp/X (0755)/mnt."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is not installed")
    base = tempfile.mkdtemp(prefix="vdiskfs-perm-", dir="/tmp")
    os.chmod(base, 0o755)
    mnt = os.path.join(base, "mnt")
    os.mkdir(mnt, 0o755)
    m = Mount(pool_dir, mnt)
    yield m
    m.cleanup()
    if not is_mounted(mnt):
        shutil.rmtree(base)


def make_vdisk(path: str, mode: int, data: bytes) -> None:
    old = os.umask(0)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    finally:
        os.umask(old)
    try:
        os.ftruncate(fd, 1 * MiB)
        os.pwrite(fd, data, 4096)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- without allow_other
def test_default_mount_shuts_out_other_users(public_mount):
    m = public_mount.start()
    make_vdisk(m.path("PUB"), 0o644, b"public data")
    ctl = os.path.join(m.mnt, ".ctl")
    res = as_nobody(("stat", m.mnt), ("listdir", m.mnt), ("stat", m.path("PUB")),
                    ("read", m.path("PUB")), ("read", os.path.join(ctl, "status")),
                    ("ctl", os.path.join(ctl, "clone"), "PUB COPY\n"),
                    ("create", m.path("NEW")), ("write", m.path("PUB"), "x"))
    for what, r in zip(["stat mnt", "listdir", "stat PUB", "read PUB", "read status",
                        "write .ctl/clone", "create", "write PUB"], res):
        assert r.get("err") in DENIED, f"nobody, default mount: {what} gave {r}"
    # ...while root is served as usual, and nothing changed.
    assert sorted(os.listdir(m.mnt)) == [".ctl", "PUB"]
    assert read_file(m.path("PUB"))[4096:4096 + 11] == b"public data"
    assert status_text(m).splitlines()[1:] == []


# ---------------------------------------------------------------- with allow_other
def test_allow_other_file_modes_apply(public_mount):
    m = public_mount.start("--allow-other")
    secret, public = b"secret bytes " * 100, b"public bytes " * 100
    make_vdisk(m.path("SECRET"), 0o600, secret)
    make_vdisk(m.path("PUB"), 0o644, public)
    before = {n: read_file(m.path(n)) for n in ("SECRET", "PUB")}
    ctl = os.path.join(m.mnt, ".ctl")

    res = as_nobody(
        ("listdir", m.mnt),                                        # 0
        ("stat", m.path("SECRET")),                                # 1
        ("read", m.path("SECRET")),                                # 2
        ("read", m.path("PUB")),                                   # 3
        ("read", os.path.join(ctl, "status")),                     # 4
        ("ctl", os.path.join(ctl, "clone"), "PUB COPY\n"),         # 5
        ("ctl", os.path.join(ctl, "clone"), "purge\n"),            # 6
        ("write", m.path("PUB"), "overwritten"),                   # 7
        ("create", m.path("MINE")),                                # 8
        ("unlink", m.path("PUB")),                                 # 9
        ("rename", m.path("PUB"), m.path("PUB2")),                 # 10
        ("truncate", m.path("PUB"), 0),                            # 11
        ("chmod", m.path("PUB"), 0o666),                           # 12
        ("setxattr", m.path("PUB"), "user.vdisk.lba_size", "4096"),  # 13
        ("mkdir", m.path("DIR")),                                  # 14
        ("getxattr", m.path("PUB"), "user.vdisk.lba_size"),        # 15
        ("read", os.path.join(ctl, "clone")),                      # 16
    )
    assert res[0] == {"ok": [".ctl", "PUB", "SECRET"]}, res[0]
    assert res[1]["ok"][:3] == [oct(stat.S_IFREG | 0o600), 0, 0], res[1]
    assert res[2].get("err") == "EACCES", f"nobody read a 0600 VDisk: {res[2]}"
    assert res[3] == {"ok": sha(before["PUB"])}, res[3]
    assert res[4].get("ok"), f"nobody cannot read .ctl/status (0444): {res[4]}"
    assert res[5].get("err") == "EACCES", f"nobody wrote .ctl/clone (0200): {res[5]}"
    assert res[6].get("err") == "EACCES", f"nobody wrote .ctl/clone (0200): {res[6]}"
    for i, what in [(7, "write a 0644 VDisk"), (8, "create in the 0755 root"),
                    (9, "unlink"), (10, "rename"), (11, "truncate"), (12, "chmod"),
                    (14, "mkdir"), (16, "read .ctl/clone")]:
        assert res[i].get("err") in DENIED, f"nobody could {what}: {res[i]}"
    assert res[13].get("err") in DENIED | {"ENOTSUP"}, f"nobody set lba_size: {res[13]}"
    assert res[15] == {"ok": "512"}, res[15]

    # Refusals changed nothing.
    assert sorted(os.listdir(m.mnt)) == [".ctl", "PUB", "SECRET"]
    assert {n: read_file(m.path(n)) for n in before} == before
    assert status_text(m).splitlines()[1:] == []
    assert os.getxattr(m.path("PUB"), "user.vdisk.lba_size") == b"512"

    # Root opens them up: chmod and chown take effect at once.
    os.chmod(m.path("PUB"), 0o666)
    os.chown(m.path("SECRET"), NOBODY, NOBODY)
    res = as_nobody(("write", m.path("PUB"), "nobody was here"),
                    ("read", m.path("SECRET")),
                    ("write", m.path("SECRET"), "mine now"))
    assert res[0] == {"ok": 15}, res[0]
    assert res[1] == {"ok": sha(before["SECRET"])}, res[1]
    assert res[2] == {"ok": 8}, res[2]
    assert read_file(m.path("PUB"))[:15] == b"nobody was here"
    assert read_file(m.path("SECRET"))[:8] == b"mine now"


def test_modes_of_created_vdisks_and_persistence(public_mount):
    m = public_mount.start("--allow-other")
    # `truncate -s` creates with 0666 & ~umask: 0644 under umask 022.
    run(["sh", "-c", f"umask 022; truncate -s 1M '{m.path('T')}'"])
    old = os.umask(0o022)
    try:
        os.close(os.open(m.path("P600"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.close(os.open(m.path("P640"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        os.mknod(m.path("NOD"), stat.S_IFREG | 0o604)
    finally:
        os.umask(old)
    old = os.umask(0o077)
    try:
        os.close(os.open(m.path("U077"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    finally:
        os.umask(old)
    want = {"T": 0o644, "P600": 0o600, "P640": 0o640, "NOD": 0o604, "U077": 0o600}
    got = {n: stat.S_IMODE(os.stat(m.path(n)).st_mode) for n in want}
    assert got == want, {n: oct(v) for n, v in got.items()}
    assert os.stat(m.path("T")).st_size == 1 * MiB
    for n in want:
        st = os.stat(m.path(n))
        assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_gid) == (0, 0), (n, st)

    # chmod / chown, then a remount: they persist.
    os.chmod(m.path("T"), 0o600)
    os.chmod(m.path("P600"), 0o664)
    os.chown(m.path("P640"), 1234, 5678)
    os.chown(m.path("NOD"), -1, 4321)
    want.update({"T": 0o600, "P600": 0o664})
    owners = {"T": (0, 0), "P600": (0, 0), "P640": (1234, 5678), "NOD": (0, 4321),
              "U077": (0, 0)}

    def check(when: str) -> None:
        for n in want:
            st = os.stat(m.path(n))
            assert stat.S_IMODE(st.st_mode) == want[n], f"{when}: {n} mode {oct(st.st_mode)}"
            assert (st.st_uid, st.st_gid) == owners[n], f"{when}: {n} owner {st.st_uid}:{st.st_gid}"

    check("after chmod/chown")
    m.stop()
    m.start("--allow-other")
    check("after a remount")
    # The persisted modes are enforced for another user, too.
    res = as_nobody(("read", m.path("T")), ("read", m.path("NOD")),
                    ("write", m.path("P600"), "x"))
    assert res[0].get("err") == "EACCES", res[0]     # 0600 root
    assert "ok" in res[1], res[1]                    # 0604: other may read
    assert res[2].get("err") == "EACCES", res[2]     # 0664 root:root, nobody is other
    # A clone inherits mode and owner (SPEC §3: the clone inherits the source's properties).
    fd = os.open(os.path.join(m.mnt, ".ctl", "clone"), os.O_WRONLY)
    try:
        os.write(fd, b"P640 P640COPY\n")
    finally:
        os.close(fd)
    deadline = time.monotonic() + 30
    while "P640 P640COPY Completed" not in status_text(m):
        assert time.monotonic() < deadline, status_text(m)
        time.sleep(0.01)
    st = os.stat(m.path("P640COPY"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 5678), st
