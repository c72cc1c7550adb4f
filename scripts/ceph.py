#!/usr/bin/env python3
"""A throwaway single-node Ceph for trying out and testing the RADOS store (docs/CEPH.md).

    python3 scripts/ceph.py start  [DIR] [--port PORT] [--pool NAME] [--bytes N]
    python3 scripts/ceph.py status [DIR]
    python3 scripts/ceph.py stop   [DIR]

One mon and one OSD on memstore (objects in the OSD's memory, capped at ``memstore device
bytes``: lost at stop), auth none, on 127.0.0.1 only, no mgr, no systemd. Everything the
daemons write (mon store, OSD data, run dir with admin sockets and pid files, logs, crash
dir) is under one scratch directory: DIR, else $VDISKFS_CEPH_DIR, else /var/tmp/vdiskfs-ceph.
The mon listens on v2:127.0.0.1:PORT (default $VDISKFS_CEPH_PORT or 3300); the memstore cap
is --bytes, else $CEPH_MEMSTORE_BYTES, else 1 GiB.

``start`` returns when a write through ``rados`` succeeds and the pool (default ``vdiskfs``,
pg_num 8) exists; its last line on stdout is ``CEPH_CONF=DIR/ceph.conf``. If the cluster in
DIR already runs it only prints that line again. The daemons run detached (a session of
their own) and their PIDs are kept in DIR/pids/; ``stop`` signals exactly those PIDs (after
checking that each still is that daemon), SIGTERM then SIGKILL, and removes DIR.

Stdlib only (runs with /usr/bin/python3 or the project's venv). tests/support/ceph.py
imports this file for the test clusters (``Cluster``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

DEFAULT_DIR = "/var/tmp/vdiskfs-ceph"
DEFAULT_PORT = 3300
DEFAULT_POOL = "vdiskfs"
DEFAULT_BYTES = 1 << 30
PG_NUM = 8
MON, OSD = "mon.a", "osd.0"
DAEMONS = (MON, OSD)
STATE = "cluster.json"       # marks a directory as ours: start and stop touch no other
BINARIES = ("ceph-mon", "ceph-osd", "ceph-authtool", "monmaptool", "ceph", "rados")

# Daemons this process started: reaped by wait() so that a killed one is gone at once
# (tests start their cluster in-process; from the command line the daemons outlive us).
_children: dict[int, subprocess.Popen] = {}


class CephError(Exception):
    """Bring-up or teardown failed; the message says why (with the logs' tails)."""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the kernel's choice)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def conf_text(d: str, fsid: str, port: int, memstore_bytes: int) -> str:
    return f"""\
# Throwaway single-node cluster made by scripts/ceph.py: memstore, auth none, loopback.
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{port}
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
keyring = {d}/keyring
run dir = {d}/run
crash dir = {d}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = {PG_NUM}
osd pool default pgp num = {PG_NUM}
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false

[mon]
mon data = {d}/mon/$id
paxos propose interval = 0.05
paxos min wait = 0.01
mon cluster log file = {d}/log/$cluster.log
log file = {d}/log/$name.log
admin socket = {d}/run/$cluster-$name.asok
pid file = {d}/run/$name.pid

[osd]
osd data = {d}/osd/$id
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
# osd fast shutdown (the default): SIGTERM exits at once, saving nothing (stop is instant).
# Cluster.stop_osd() turns it off first (through the admin socket): the OSD then saves its
# objects to osd data and loads them when started again. After SIGKILL an OSD comes back
# with what it saved at its last clean stop (none after mkfs: its PGs never come back).
log file = {d}/log/$name.log
admin socket = {d}/run/$cluster-$name.asok
pid file = {d}/run/$name.pid
"""


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Cluster:
    """The cluster whose scratch directory is ``dir`` (made by ``start``)."""

    def __init__(self, d: str):
        self.dir = os.path.abspath(d)
        self.conf = os.path.join(self.dir, "ceph.conf")
        st = self._state()
        self.port: int = st.get("port", 0)
        self.pool: str = st.get("pool", DEFAULT_POOL)
        self.fsid: str = st.get("fsid", "")
        self.osd_uuid: str = st.get("osd_uuid", "")

    @property
    def mon_addr(self) -> str:
        return f"v2:127.0.0.1:{self.port}"

    def env(self) -> dict:
        return dict(os.environ, CEPH_CONF=self.conf)

    # ------------------------------------------------------------------ state, pids
    def _state(self) -> dict:
        try:
            with open(os.path.join(self.dir, STATE)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def ours(self) -> bool:
        return os.path.exists(os.path.join(self.dir, STATE))

    def _pidfile(self, name: str) -> str:
        return os.path.join(self.dir, "pids", name)

    def pid(self, name: str) -> int | None:
        """The PID recorded for daemon ``name`` if that process still is that daemon."""
        try:
            with open(self._pidfile(name)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        return pid if self._is_our_daemon(pid, name) else None

    def _is_our_daemon(self, pid: int, name: str) -> bool:
        child = _children.get(pid)
        if child is not None:
            return child.poll() is None
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return False           # exited, not yet reaped by its parent
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except (OSError, IndexError):
            return False
        binary = "ceph-mon" if name.startswith("mon.") else "ceph-osd"
        # A recycled PID is some other program or a daemon of another conf.
        return bool(argv) and os.path.basename(argv[0]) == binary and self.conf in argv

    def running(self) -> dict[str, int | None]:
        return {name: self.pid(name) for name in DAEMONS}

    def is_running(self) -> bool:
        return all(self.running().values())

    # ------------------------------------------------------------------ commands
    def _run(self, cmd: list[str], timeout: float = 30, input: str | None = None) -> str:
        """``cmd``'s stdout; CephError if it fails (or, for commands given to ``ceph`` on
        stdin, which exits 0 whatever they do, if one of them says Error)."""
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               input=input, stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise CephError(f"{' '.join(cmd)} did not finish in {timeout:.0f} s\n"
                            + self.logs()) from None
        failed = p.returncode or (input is not None and "\nError " in "\n" + p.stderr)
        if failed:
            raise CephError(f"{' '.join(cmd)} failed ({p.returncode}):\n{input or ''}"
                            f"{p.stdout}{p.stderr}\n" + self.logs())
        return p.stdout

    def ceph(self, *args: str, timeout: float = 30) -> str:
        return self._run(["ceph", "-c", self.conf, "--connect-timeout", str(int(timeout))]
                         + list(args), timeout=timeout + 5)

    def logs(self, lines: int = 25) -> str:
        out = []
        for name in DAEMONS:
            for path in (os.path.join(self.dir, "log", f"{name}.out"),
                         os.path.join(self.dir, "log", f"{name}.log")):
                t = _tail(path, lines)
                if t.strip():
                    out.append(f"--- tail of {path}\n{t}")
        return "\n".join(out)

    # ------------------------------------------------------------------ daemons
    def asok(self, name: str, prefix: str, timeout: float = 5.0, **args) -> dict:
        """A command through daemon ``name``'s admin socket (the protocol the ``ceph
        daemon`` command speaks: JSON and a NUL, answered by a 4-byte length and JSON)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(os.path.join(self.dir, "run", f"ceph-{name}.asok"))
            s.sendall(json.dumps(dict(args, prefix=prefix)).encode() + b"\0")
            buf = b""
            while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError(errno.ECONNRESET, "admin socket closed mid-answer")
                buf += chunk
        finally:
            s.close()
        text = buf[4:].decode(errors="replace")
        if text.startswith("ERROR:"):
            raise CephError(f"{name} admin socket, {prefix} {args}: {text.strip()}")
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            return {"output": text}

    def wait_mon_up(self, timeout: float) -> None:
        """Return when the mon leads its quorum of one, or raise with the logs."""
        deadline = time.monotonic() + timeout
        while True:
            if self.pid(MON) is None:
                log = self.logs()
                why = (f"127.0.0.1:{self.port} is in use" if "Address already in use" in log
                       else "it exited")
                raise CephError(f"{MON} did not come up: {why}\n" + log)
            try:
                if self.asok(MON, "mon_status", timeout=1.0).get("state") == "leader":
                    return
            except (OSError, CephError):
                pass
            if time.monotonic() > deadline:
                raise CephError(f"{MON} not up after {timeout:.0f} s\n" + self.logs())
            time.sleep(0.01)

    def wait_osd_active(self, timeout: float) -> None:
        """Return when the OSD says it is up (state ``active``), or raise with the logs.
        (A client that asks before that waits for its next tick, 5 s, to see the OSD.)"""
        deadline = time.monotonic() + timeout
        while True:
            if self.pid(OSD) is None:
                raise CephError(f"{OSD} is not running\n" + self.logs())
            try:
                if self.asok(OSD, "status", timeout=1.0).get("state") == "active":
                    return
            except (OSError, CephError):
                pass                       # socket (or its "status" command) not there yet
            if time.monotonic() > deadline:
                raise CephError(f"{OSD} not active after {timeout:.0f} s\n" + self.logs())
            time.sleep(0.01)

    def stop_osd(self, keep: bool = True, wait: float = 10.0) -> None:
        """Stop the OSD. ``keep``: SIGTERM with osd fast shutdown off, so memstore writes
        its objects to osd data and the next start loads them (clients see its connections
        drop and the mon mark it down, as after a crash). Else SIGKILL: the next start
        loads what the last clean stop saved (stale objects, or no PGs at all)."""
        if keep:
            self.asok(OSD, "config set", var="osd_fast_shutdown", val=["false"])
            self.stop_daemon(OSD, signal.SIGTERM, wait)
        else:
            self.stop_daemon(OSD, signal.SIGKILL)

    def start_osd(self, timeout: float = 30.0) -> None:
        """Start the OSD (stopped by stop_osd) and return when it is up."""
        if self.pid(OSD) is None:
            self.start_daemon(OSD)
        self.wait_osd_active(timeout)

    def start_daemon(self, name: str) -> int:
        kind, ident = name.split(".")
        os.makedirs(os.path.join(self.dir, "log"), exist_ok=True)
        out = open(os.path.join(self.dir, "log", f"{name}.out"), "ab")
        try:
            p = subprocess.Popen([f"ceph-{kind}", "-f", "-c", self.conf, "-i", ident],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True, close_fds=True, cwd=self.dir)
        finally:
            out.close()
        _children[p.pid] = p
        tmp = self._pidfile(name) + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{p.pid}\n")
        os.replace(tmp, self._pidfile(name))
        return p.pid

    def stop_daemon(self, name: str, sig: int = signal.SIGTERM, wait: float = 3.0) -> bool:
        """Send ``sig`` to daemon ``name``; SIGKILL if it is still there after ``wait``
        seconds. True if it ran."""
        pid = self.pid(name)
        if pid is None:
            return False
        self._signal(pid, sig)
        if not self._wait_gone(pid, name, wait) and sig != signal.SIGKILL:
            self._signal(pid, signal.SIGKILL)
            self._wait_gone(pid, name, 5)
        return True

    def _signal(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _wait_gone(self, pid: int, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            child = _children.get(pid)
            if child is not None:
                try:
                    child.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    return False
                del _children[pid]
                return True
            if not self._is_our_daemon(pid, name):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    # ------------------------------------------------------------------ bring-up
    def create(self, port: int, pool: str, memstore_bytes: int, timeout: float) -> None:
        """Make the cluster in an empty (or our own dead) directory and start it."""
        t0 = time.monotonic()
        missing = missing_binaries()
        if missing:
            raise CephError(f"not installed: {', '.join(missing)} (bash scripts/setup.sh ceph "
                            f"installs ceph-mon, ceph-osd and python3-rados)")
        sock = os.path.join(self.dir, "run", "ceph-osd.0.asok")
        if len(sock.encode()) > 107:
            raise CephError(f"{self.dir} is too long a path: the admin socket {sock} would "
                            f"pass the 107 bytes a unix socket's path may have")
        if not port_free(port):
            raise CephError(f"127.0.0.1:{port} is in use (another Ceph mon?): choose another "
                            f"port with --port")
        if os.path.isdir(self.dir):
            if self.ours():
                shutil.rmtree(self.dir)            # a dead cluster of ours: start afresh
            elif os.listdir(self.dir):
                raise CephError(f"{self.dir} is not empty and not a cluster made by this "
                                f"script: not touching it")
        for sub in ("mon", "osd/0", "run", "log", "crash", "pids"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self.port, self.pool = port, pool
        self.fsid, self.osd_uuid = str(uuid.uuid4()), str(uuid.uuid4())
        with open(os.path.join(self.dir, STATE), "w") as f:
            json.dump({"port": port, "pool": pool, "fsid": self.fsid,
                       "osd_uuid": self.osd_uuid, "memstore_bytes": memstore_bytes}, f)
        with open(self.conf, "w") as f:
            f.write(conf_text(self.dir, self.fsid, port, memstore_bytes))

        keyring = os.path.join(self.dir, "keyring")
        monmap = os.path.join(self.dir, "monmap")
        self._run(["ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.",
                   "--cap", "mon", "allow *"])
        self._run(["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                   f"[v2:127.0.0.1:{port}]", monmap])
        self._run(["ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap", monmap,
                   "--keyring", keyring])
        self.start_daemon(MON)
        self.wait_mon_up(timeout - (time.monotonic() - t0))
        # Both commands through one `ceph` (it reads commands from stdin): the OSD's id is
        # given, so nothing needs the first one's answer.
        self._run(["ceph", "-c", self.conf, "--connect-timeout", str(int(timeout))],
                  timeout=timeout,
                  input=f"osd new {self.osd_uuid} 0\n"
                        f"osd pool create {pool} {PG_NUM} {PG_NUM}\n")
        self._run(["ceph-osd", "-c", self.conf, "-i", "0", "--mkfs",
                   "--osd-uuid", self.osd_uuid])
        self.start_daemon(OSD)
        self.wait_osd_active(timeout - (time.monotonic() - t0))
        self.wait_writable(timeout - (time.monotonic() - t0))

    def wait_writable(self, timeout: float) -> None:
        """Return when a write (and a remove) through ``rados`` succeeded in the pool."""
        deadline = time.monotonic() + max(timeout, 1.0)
        cmd = ["rados", "-c", self.conf, "-p", self.pool]
        probe = subprocess.Popen(cmd + ["put", "vdiskfs-ceph-probe", "/dev/null"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        try:
            while probe.poll() is None:
                dead = [n for n, pid in self.running().items() if pid is None]
                if dead:
                    raise CephError(f"{', '.join(dead)} exited during start-up\n" + self.logs())
                if time.monotonic() > deadline:
                    raise CephError(f"no write through rados succeeded (waited {timeout:.1f} s)\n"
                                    + self.logs())
                time.sleep(0.02)
        finally:
            if probe.poll() is None:
                probe.kill()
            out = probe.communicate()[0]
        if probe.returncode:
            raise CephError(f"rados put failed ({probe.returncode}): {out}\n" + self.logs())
        self._run(cmd + ["rm", "vdiskfs-ceph-probe"], timeout=max(5.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ teardown
    def stop(self, wait: float = 2.0) -> None:
        """SIGTERM the OSD, then the mon (an OSD whose mon is gone waits 5 s for it before
        exiting), SIGKILL whatever is left after ``wait`` s; remove the directory."""
        still = []
        for name in (OSD, MON):
            pid = self.pid(name)
            if pid is None:
                continue
            self._signal(pid, signal.SIGTERM)
            if not self._wait_gone(pid, name, wait):
                self._signal(pid, signal.SIGKILL)
                if not self._wait_gone(pid, name, 5):
                    still.append(name)
        if still:
            raise CephError(f"{', '.join(still)} did not exit after SIGKILL; {self.dir} kept")
        if os.path.isdir(self.dir):
            if not self.ours():
                raise CephError(f"{self.dir} is not a cluster made by this script: not "
                                f"removing it")
            shutil.rmtree(self.dir)


def start(d: str = DEFAULT_DIR, port: int = DEFAULT_PORT, pool: str = DEFAULT_POOL,
          memstore_bytes: int = DEFAULT_BYTES, timeout: float = 60.0) -> Cluster:
    """The cluster in ``d``, started (and tested writable) unless it already runs."""
    c = Cluster(d)
    if c.ours():
        state = c.running()
        if all(state.values()):
            return c
        if any(state.values()):
            up = [n for n, p in state.items() if p]
            raise CephError(f"the cluster in {c.dir} is half up ({', '.join(up)} running "
                            f"alone): stop it first")
    try:
        c.create(port, pool, memstore_bytes, timeout)
    except BaseException:
        try:
            c.stop(wait=0.5)
        except CephError:
            pass
        raise
    return c


def _default_dir(arg: str | None) -> str:
    return os.path.abspath(arg or os.environ.get("VDISKFS_CEPH_DIR") or DEFAULT_DIR)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ceph.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("start", "status", "stop"):
        sp = sub.add_parser(name)
        sp.add_argument("dir", nargs="?", help=f"scratch directory (default $VDISKFS_CEPH_DIR "
                                               f"or {DEFAULT_DIR})")
        if name == "start":
            sp.add_argument("--port", type=int,
                            default=int(os.environ.get("VDISKFS_CEPH_PORT") or DEFAULT_PORT),
                            help="mon's v2 port on 127.0.0.1 (default $VDISKFS_CEPH_PORT or "
                                 f"{DEFAULT_PORT})")
            sp.add_argument("--pool", default=DEFAULT_POOL, help="pool to create (default "
                                                                 f"{DEFAULT_POOL})")
            sp.add_argument("--bytes", type=int,
                            default=int(os.environ.get("CEPH_MEMSTORE_BYTES") or DEFAULT_BYTES),
                            help="memstore device bytes (default $CEPH_MEMSTORE_BYTES or 1 GiB)")
            sp.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args(argv)
    d = _default_dir(a.dir)
    try:
        if a.cmd == "start":
            t0 = time.monotonic()
            was_up = Cluster(d).ours() and Cluster(d).is_running()
            c = start(d, a.port, a.pool, a.bytes, a.timeout)
            if was_up:
                print(f"ceph: already running in {c.dir} (mon {c.mon_addr}, pool {c.pool})")
            else:
                print(f"ceph: started in {c.dir} in {time.monotonic() - t0:.1f} s (mon "
                      f"{c.mon_addr}, pool {c.pool}); stop with: bash scripts/setup.sh ceph stop"
                      + ("" if d == DEFAULT_DIR else f" {d}"))
            print(f"CEPH_CONF={c.conf}")
            return 0
        c = Cluster(d)
        if a.cmd == "status":
            state = c.running() if c.ours() else {}
            if state and all(state.values()):
                print(f"ceph: running in {c.dir}: "
                      + ", ".join(f"{n} pid {p}" for n, p in state.items())
                      + f"; mon {c.mon_addr}, pool {c.pool}")
                print(f"CEPH_CONF={c.conf}")
                return 0
            if any(state.values()):
                print(f"ceph: half up in {c.dir}: "
                      + ", ".join(f"{n} {'pid %d' % p if p else 'not running'}"
                                  for n, p in state.items()))
                return 1
            print(f"ceph: not running ({c.dir})")
            return 1
        # stop
        if not os.path.isdir(c.dir):
            print(f"ceph: not running ({c.dir} does not exist)")
            return 0
        t0 = time.monotonic()
        was = [n for n, p in c.running().items() if p]
        c.stop()
        print(f"ceph: stopped {', '.join(was) or 'nothing'} and removed {c.dir} in "
              f"{time.monotonic() - t0:.1f} s")
        return 0
    except CephError as e:
        print(f"ceph: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
