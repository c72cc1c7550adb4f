"""The newcomer's path (issue 13): the README's setup leaves ``vdiskfs`` and ``qclone`` on
PATH with man pages; ``setup.sh mount`` twice says where the pool is; mount(8) and fstab
mount a pool through mount.fuse3; the systemd unit parses; and the README's "First steps"
run exactly as printed, in a copy of this tree.

Setup runs with VDISKFS_VENV set to the venv these tests run in, so nothing is reinstalled
(the copy keeps the files' times, so setup's stamp stays newer than pyproject.toml)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from support.common import (assert_user_error, is_mounted, loop_devices_of, run,
                            sha256_file, vdiskfs, wait_until)

pytestmark = pytest.mark.mount

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = sys.prefix
BIN = "/usr/local/bin"


def setup_env() -> dict:
    return dict(os.environ, VDISKFS_VENV=VENV)


@pytest.fixture(scope="module")
def on_path():
    """What the README's setup leaves behind, made by setup itself (`deps`)."""
    run(["bash", os.path.join(ROOT, "scripts", "setup.sh"), "deps"], env=setup_env(),
        timeout=600)


def tree_copy(dest: str) -> str:
    """This tree's files (tracked and new, not ignored ones) with their times kept."""
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                cwd=ROOT).stdout.split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue          # deleted in the working tree
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))
    return dest


def setup_in_copy(tree: str, env: dict, cmd: str = "bash scripts/setup.sh mount"):
    """Run setup in a copy of this tree with this venv: it must not reinstall (an editable
    install from the copy would point this venv at a directory about to be deleted)."""
    stamp = os.path.join(VENV, ".vdiskfs-installed")
    assert os.path.exists(stamp) and \
        os.path.getmtime(stamp) >= os.path.getmtime(os.path.join(tree, "pyproject.toml")), \
        "setup's stamp is older than pyproject.toml: the copy's setup would reinstall"
    proc = run(["bash", "-c", cmd], cwd=tree, env=env, timeout=600)
    assert "installing" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    import vdiskfs as package
    assert os.path.dirname(os.path.dirname(os.path.abspath(package.__file__))) == ROOT
    return proc


def _lock_free(pool: str) -> bool:
    from vdiskfs.ctl.client import lock_holder
    return lock_holder(pool) is None


def unmount_all(*mnts: str) -> None:
    for mnt in mnts:
        if is_mounted(mnt):
            if run(["umount", mnt], check=False).returncode:
                run(["umount", "-l", mnt], check=False)


# ---------------------------------------------------------------- PATH, man pages
def test_setup_leaves_commands_on_path_with_man_pages(on_path):
    for prog in ("vdiskfs", "qclone"):
        link = os.path.join(BIN, prog)
        assert os.path.islink(link) and os.readlink(link) == os.path.join(VENV, "bin", prog)
    path_env = dict(os.environ, PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    assert run(["vdiskfs", "--version"], env=path_env).stdout.startswith("vdiskfs ")
    assert "-s SRC" in run(["qclone", "--help"], env=path_env).stdout
    for page in ("vdiskfs.1", "qclone.1"):
        path = os.path.join("/usr/local/share/man/man1", page)
        assert os.path.getsize(path) > 500, path
    if shutil.which("man"):
        assert run(["man", "-w", "vdiskfs"]).stdout.strip().endswith("vdiskfs.1")
    # Idempotent: a second run changes nothing and says nothing about the links.
    proc = run(["bash", os.path.join(ROOT, "scripts", "setup.sh"), "deps"], env=setup_env())
    assert "warning" not in proc.stderr, proc.stderr


def test_setup_links_repointed_files_left_alone(on_path, tmp_path):
    """A link elsewhere is re-pointed; a file that is not a link is kept, with a warning
    (VDISKFS_BIN/VDISKFS_MAN: this test's directories instead of /usr/local)."""
    bin_dir, man = tmp_path / "bin", tmp_path / "man"
    bin_dir.mkdir()
    os.symlink("/nonexistent/vdiskfs", bin_dir / "vdiskfs")
    (bin_dir / "qclone").write_text("#!/bin/sh\necho mine\n")
    env = dict(setup_env(), VDISKFS_BIN=str(bin_dir), VDISKFS_MAN=str(man))
    proc = run(["bash", os.path.join(ROOT, "scripts", "setup.sh"), "deps"], env=env)
    assert os.readlink(bin_dir / "vdiskfs") == os.path.join(VENV, "bin", "vdiskfs")
    assert (bin_dir / "qclone").read_text() == "#!/bin/sh\necho mine\n"
    assert f"{bin_dir}/qclone exists and is not a link" in proc.stderr, proc.stderr
    assert (man / "vdiskfs.1").exists() and (man / "qclone.1").exists()


# ---------------------------------------------------------------- mount(8), fstab
def test_mount_t_fuse_vdiskfs_and_fstab(on_path, tmp_path):
    pool, mnt = str(tmp_path / "pool"), str(tmp_path / "mnt")
    pool2, mnt2, mnt3 = str(tmp_path / "pool2"), str(tmp_path / "mnt2"), str(tmp_path / "mnt3")
    for d in (mnt, mnt2, mnt3):
        os.mkdir(d)
    try:
        run(["mount", "-t", "fuse.vdiskfs", pool, mnt, "-o", "chunk_size=64K"])
        with open(os.path.join(mnt, "A"), "wb") as f:
            f.write(b"through mount(8)")
            f.flush()
            os.fsync(f.fileno())
        assert os.stat(os.path.join(mnt, "A")).st_blksize == 64 << 10   # = the chunk size
        run(["umount", mnt])
        wait_until(lambda: _lock_free(pool), "the daemon to let go of the pool")

        fstab = tmp_path / "fstab"
        fstab.write_text(f"# a temporary fstab\n"
                         f"{pool}  {mnt2}  fuse.vdiskfs  defaults,nofail,_netdev,"
                         f"x-systemd.requires=local-fs.target,clone_speed=64M  0 0\n"
                         f"{pool2}  {mnt3}  fuse.vdiskfs  noauto,chunk_size=128K  0 0\n")
        run(["mount", "-T", str(fstab), "-a"])
        assert is_mounted(mnt2) and not is_mounted(mnt3)
        with open(os.path.join(mnt2, "A"), "rb") as f:
            assert f.read() == b"through mount(8)"
        run(["mount", "-T", str(fstab), "-a"])          # again: already mounted, a no-op
        assert sum(1 for line in open("/proc/mounts") if f" {mnt2} " in line) == 1
        run(["mount", "-T", str(fstab), mnt3])          # the noauto line, by name
        assert is_mounted(mnt3) and os.listdir(mnt3) == [".ctl"]
        with open(os.path.join(mnt3, "B"), "wb") as f:  # a new pool: fstab's chunk size
            assert os.fstat(f.fileno()).st_blksize == 128 << 10
        for m in (mnt2, mnt3):
            run(["umount", m])
        wait_until(lambda: _lock_free(pool) and _lock_free(pool2), "daemons to exit")

        # nonempty: a mount point with files takes the option.
        with open(os.path.join(mnt2, "left-here"), "w"):
            pass
        proc = run(["mount", "-t", "fuse.vdiskfs", pool, mnt2], check=False)
        assert proc.returncode and "not empty" in proc.stderr and not is_mounted(mnt2)
        run(["mount", "-t", "fuse.vdiskfs", pool, mnt2, "-o", "nonempty,allow_other"])
        assert "allow_other" in next(line for line in open("/proc/mounts")
                                     if f" {mnt2} " in line)
        run(["umount", mnt2])
        wait_until(lambda: _lock_free(pool), "the daemon to exit")

        # Bad options: one line, nothing mounted.
        for opts, needle in (("bogus", "unknown mount option"), ("ro", "read-only"),
                             ("sync", "sync is not supported"),
                             ("clone_speed=fast", "bad size"),
                             ("chunk_size=3K", "power of two")):
            proc = run(["mount", "-t", "fuse.vdiskfs", str(tmp_path / "p3"), mnt, "-o", opts],
                       check=False)
            assert proc.returncode != 0 and needle in proc.stderr, (opts, proc.stderr)
            assert not is_mounted(mnt)
        # The program mount.fuse3 runs, called as it calls it.
        assert_user_error(vdiskfs(pool, mnt, "-o", check=False), "-o needs a value")
        assert_user_error(vdiskfs(pool, "-o", "rw", check=False), "usage")
        # Without -o it is not mount.fuse3's call but a mistyped command: never a mount.
        assert_user_error(vdiskfs("lst", mnt, check=False), "unknown command 'lst'")
        assert not is_mounted(mnt) and not os.path.exists("lst")
    finally:
        unmount_all(mnt, mnt2, mnt3)


def test_systemd_unit_parses(tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("LOUD SKIP: systemd-analyze is not installed; the unit is not checked")
    unit = tmp_path / "vdiskfs@demo.service"
    shutil.copy(os.path.join(ROOT, "contrib", "vdiskfs@.service"), unit)
    proc = run([exe, "verify", str(unit)], check=False)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines()
                  if "vdiskfs@demo.service" in line]
    assert not complaints, complaints


def unit_commands(unit: str, env: dict) -> dict[str, list[str]]:
    """The unit's Exec lines as systemd runs them here: ${VAR} from the environment
    file, $$ a literal $ (only what this unit uses of systemd's syntax)."""
    out = {}
    for line in open(unit):
        key, eq, value = line.strip().partition("=")
        if eq and key.startswith("Exec"):
            value = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], value)
            out[key] = [w.replace("$$", "$") for w in shlex.split(value)]
    return out


def test_systemd_unit_commands_mount_and_stop(on_path, tmp_path):
    """What systemd would run, run by hand (systemd is not PID 1 here): ExecStart serves in
    the foreground, ExecStartPost returns once the mount is there, ExecStop ends it."""
    pool, mnt = str(tmp_path / "pool"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    cmds = unit_commands(os.path.join(ROOT, "contrib", "vdiskfs@.service"),
                         {"POOL": pool, "MNT": mnt})
    assert set(cmds) == {"ExecStart", "ExecStartPost", "ExecStop"}, cmds
    env = dict(os.environ, POOL=pool, MNT=mnt)
    main = subprocess.Popen(cmds["ExecStart"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        run(cmds["ExecStartPost"], env=dict(env, MAINPID=str(main.pid)), timeout=60)
        assert is_mounted(mnt) and os.listdir(mnt) == [".ctl"]
        run(cmds["ExecStop"], env=dict(env, MAINPID=str(main.pid)), timeout=300)
        assert main.wait(timeout=60) == 0 and not is_mounted(mnt)
        assert _lock_free(pool)
        # A daemon that cannot start (the mount point is gone): ExecStartPost fails.
        os.rmdir(mnt)
        bad = subprocess.Popen(cmds["ExecStart"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        assert bad.wait(timeout=60) != 0            # reaped, as systemd reaps it
        proc = run(cmds["ExecStartPost"], env=dict(env, MAINPID=str(bad.pid)), check=False,
                   timeout=60)
        assert proc.returncode != 0
    finally:
        unmount_all(mnt)
        if main.poll() is None:
            main.terminate()                  # the daemon this test started
            main.wait(timeout=60)


# ---------------------------------------------------------------- the README, verbatim
def readme_commands() -> tuple[str, list[str]]:
    """The README's setup command for the mount, and its "First steps" lines."""
    text = open(os.path.join(ROOT, "README.md")).read()
    setup = re.search(r"^ {4}(bash scripts/setup\.sh mount)\b", text, re.M)
    assert setup, "README has no `bash scripts/setup.sh mount` line"
    block = re.search(r"First steps.*?```sh\n(.*?)```", text, re.S)
    assert block, "README has no First steps block"
    lines = [re.sub(r"\s+#.*$", "", line).rstrip() for line in block.group(1).splitlines()]
    return setup.group(1), [line for line in lines if line]


@pytest.mark.loop
def test_readme_first_steps_verbatim(need_loop, on_path, tmp_path):
    setup, steps = readme_commands()
    assert any(s.startswith("qclone ") for s in steps), steps
    tree = tree_copy(str(tmp_path / "vdiskfs"))
    mnt = os.path.join(tree, "mnt")
    env = setup_env()
    # Another vdiskfs mount on this machine would make `qclone` ask which one.
    env["VDISKFS_MOUNT"] = mnt
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    made_mnt_foo = not os.path.exists("/mnt/foo")
    if is_mounted("/mnt/foo"):
        pytest.skip("LOUD SKIP: /mnt/foo, the README's loop mount point, is in use here")
    try:
        proc = setup_in_copy(tree, env, setup)
        assert "mounted at" in proc.stdout and is_mounted(mnt), proc.stdout + proc.stderr
        # The same command again: says where and how to stop it, exits 0, mounts nothing.
        again = setup_in_copy(tree, env, setup)
        assert f"already mounted at {mnt}" in again.stdout, again.stdout + again.stderr
        assert f"vdiskfs umount {mnt}" in again.stdout, again.stdout
        assert sum(1 for line in open("/proc/mounts") if f" {mnt} " in line) == 1
        out = []
        for step in steps:
            p = subprocess.run(["bash", "-e", "-c", step], cwd=tree, env=env,
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, f"README step failed: {step}\n{p.stdout}{p.stderr}"
            out.append(p.stdout)
            if step.startswith("qclone "):     # the clone holds FOO's bytes, all of them
                assert sha256_file(os.path.join(mnt, "BAR")) == \
                    sha256_file(os.path.join(mnt, "FOO"))
        text = "".join(out)
        assert "hello" in text and "Clone of FOO to BAR successfully started" in text, text
        assert re.search(r"^BAR\s+1G\s", text, re.M) and re.search(r"^FOO\s+1G\s", text, re.M)
        assert not is_mounted(mnt), "the README's last step unmounts"
    finally:
        unmount_all("/mnt/foo")
        for name in ("FOO", "BAR"):     # a lazily unmounted loop mount keeps its device
            for dev in loop_devices_of(os.path.join(mnt, name)):
                run(["losetup", "-d", dev], check=False)
        unmount_all(mnt)
        if made_mnt_foo and os.path.isdir("/mnt/foo"):
            os.rmdir("/mnt/foo")
        pool = os.path.join(tree, "pool")
        if os.path.exists(os.path.join(pool, "lock")):
            wait_until(lambda: _lock_free(pool), "the README's daemon to exit")


# ---------------------------------------------------------------- setup after a crash
def test_setup_mount_over_a_dead_mount(on_path, tmp_path):
    """The daemon was killed: ./mnt is dead ("Transport endpoint is not connected");
    setup's mount cleans it up (vdiskfs mount does) and mounts again."""
    tree = tree_copy(str(tmp_path / "vdiskfs"))
    pool, mnt = os.path.join(tree, "pool"), os.path.join(tree, "mnt")
    env = setup_env()
    try:
        setup_in_copy(tree, env)
        with open(os.path.join(mnt, "FOO"), "wb") as f:
            f.write(b"kept")
            f.flush()                                    # out of Python's buffer, then
            os.fsync(f.fileno())                         # durable: it survives kill -9
        from vdiskfs.ctl.client import lock_holder
        pid = lock_holder(pool)
        assert pid and pid > 0
        os.kill(pid, signal.SIGKILL)                     # the daemon this test started
        wait_until(lambda: _lock_free(pool), "the killed daemon to let go of the pool")
        assert is_mounted(mnt)                           # dead, but still there
        proc = setup_in_copy(tree, env)
        assert "dead mount" in proc.stderr and "mounted at" in proc.stdout, \
            proc.stdout + proc.stderr
        with open(os.path.join(mnt, "FOO"), "rb") as f:
            assert f.read() == b"kept"
        vdiskfs("umount", mnt)
        assert not is_mounted(mnt) and _lock_free(pool)
    finally:
        unmount_all(mnt)
        if os.path.exists(os.path.join(pool, "lock")):
            wait_until(lambda: _lock_free(pool), "the daemon to exit")


# ---------------------------------------------------------------- the option mapping
def test_mount_helper_options():
    from vdiskfs.mounthelper import BadOption, translate
    assert translate(["/p", "/m", "-o", "rw,noatime,chunk_size=64K,clone_speed=64M,"
                      "allow_other,nonempty,debug,dev,suid,x-systemd.automount,comment=x"]) == [
        "mount", "/p", "/m", "--chunk-size", "64K", "--clone-speed", "64M",
        "--allow-other", "--nonempty", "--debug"]
    assert translate(["/p", "/m", "-n", "-v", "-s", "-t", "fuse.vdiskfs", "-o",
                      "defaults,nosuid,nodev,noexec,_netdev,nofail,noauto"]) == \
        ["mount", "/p", "/m"]
    for argv, needle in ((["/p", "/m", "-o", "ro"], "read-only"),
                         (["/p", "/m", "-o", "bogus=1"], "unknown mount option"),
                         (["/p", "/m", "-o", "chunk_size"], "unknown mount option"),
                         (["/p", "/m", "-o", "dirsync"], "not supported"),
                         (["/p", "/dev/fd/5", "-o", "rw"], "drop_privileges"),
                         (["/p", "/m", "-t", "ext4", "-o", "rw"], "fuse.vdiskfs only"),
                         (["/p", "-o", "rw"], "usage")):
        with pytest.raises(BadOption, match=needle):
            translate(argv)
