"""The NBD server under hostile and demanding clients (a reviewer's tests of the
out-of-order replies, the buffer budget, per-export read-only and the limits).

Real clients: python3-libnbd (Debian's, under /usr/bin/python3) with many requests in
flight on several connections, and a raw socket (support/nbd_raw.py) for what libnbd
will not send: clients that never read their replies, that stall in the middle of a
negotiation, that half-close or reset with flushes in flight.

Each test mounts a pool with ``--nbd unix:SOCK``; the fixtures unmount it and fsck the
pool afterwards. The tests marked "a bug" fail with the server as it is.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import random
import socket
import struct
import subprocess
import termios
import threading
import time

import pytest

from support.nbd_raw import closed, go, raw_client, recv_exact, req, request
from t4_nbd import nbd_tools, served  # noqa: F401  (the fixtures: a mount serving NBD)
from support.common import (assert_user_error, daemon_log, flip_byte, read_file, run,
                            vdiskfs, wait_until, write_file)

pytestmark = pytest.mark.mount

MiB = 1 << 20
PY = "/usr/bin/python3"     # python3-libnbd is Debian's, for Debian's python
SIMPLE = 0x67446698
IHAVEOPT = 0x49484156454F5054
READ, WRITE, DISC, FLUSH, TRIM = 0, 1, 2, 3, 4


def libnbd(tmp_path, script: str, *args: str, check: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess:
    path = tmp_path / f"script{random.randrange(1 << 30)}.py"
    path.write_text("import nbd, sys, os, random, time\n" + script)
    return run([PY, str(path), *args], check=check, timeout=timeout)


def make(m, name: str, size: int) -> None:
    with open(m.path(name), "wb") as f:
        f.truncate(size)


def no_tracebacks(m) -> None:
    log = daemon_log(m.pool)
    assert "unexpected error" not in log and "Traceback" not in log, log[-4000:]


def nbd_clients(m, name: str) -> int:
    for v in json.loads(vdiskfs("list", "--json", "--mount", m.mnt).stdout)["vdisks"]:
        if v["name"] == name:
            return v["nbd"]
    raise KeyError(name)


# ---------------------------------------------------------------- a stalled negotiation
def _queued(s: socket.socket) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(s.fileno(), termios.FIONREAD, buf)
    return buf[0]


def _settled(s: socket.socket) -> int:
    last = -1
    while True:
        time.sleep(0.2)
        n = _queued(s)
        if n == last:
            return n
        last = n


def _opt(o: int, data: bytes) -> bytes:
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


def _go_data(name: bytes) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)


def go_reply_held(sock: str, name: bytes) -> tuple[socket.socket, int]:
    """A client whose NBD_OPT_GO for ``name`` the server has looked up and answered, but
    whose answer cannot leave yet: the client reads none of its option replies, and sends
    exactly as many NBD_OPT_INFO before the GO as fill the server's socket (measured with
    a first connection). Returns (socket, bytes of INFO replies to read before the GO's)."""
    info = _opt(6, _go_data(name))
    s = raw_client(sock)
    s.settimeout(None)
    s.sendall(struct.pack(">I", 3) + info * 2000)
    full = _settled(s)
    _, _, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
    assert rtype == 3, rtype
    one = 20 + n + 20                      # NBD_REP_INFO (export) + NBD_REP_ACK
    s.close()
    assert full % one == 0 and full // one < 2000, (full, one)
    count = full // one
    s = raw_client(sock)
    s.settimeout(None)
    s.sendall(struct.pack(">I", 3) + info * count + _opt(7, _go_data(name)))
    assert _settled(s) == count * one, "the GO's reply went out: the socket did not fill"
    return s, count * one


def read_go_reply(s: socket.socket, skip: int) -> tuple[int, int | None]:
    """(final reply type, transmission flags) of the held GO."""
    s.settimeout(20)
    recv_exact(s, skip)
    flags = None
    while True:
        _, _, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
        body = recv_exact(s, n) if n else b""
        if rtype == 3 and body[:2] == b"\0\0":
            flags = struct.unpack(">H", body[10:12])[0]
        if rtype != 3:
            return rtype, flags


def test_readonly_export_renamed_while_its_go_is_answered_stays_readonly(served):
    """A bug: the GO's reply tells the client READ_ONLY (the export is named by
    --nbd-readonly-export), but the server decides the connection's read-only flag again
    after sending that reply, by the VDisk's name then. Renamed in between, the client
    that was told read-only writes to it. docs/NBD.md: a VDisk renamed keeps what its
    connections negotiated."""
    m = served.start("--nbd", f"unix:{served.sock}", "--nbd-readonly-export", "RO")
    write_file(m.path("RO"), b"keep" * 1024)
    s, skip = go_reply_held(m.sock, b"RO")
    try:
        os.rename(m.path("RO"), m.path("RENAMED"))
        rtype, flags = read_go_reply(s, skip)
        assert rtype == 1 and flags is not None and flags & 2, (rtype, flags)  # READ_ONLY
        err = request(s, WRITE, 0, 4096, payload=b"Z" * 4096)
        assert err == 1, f"a write on a connection told READ_ONLY got {err}, not EPERM"
    finally:
        s.close()
    assert read_file(m.path("RENAMED"))[:4] == b"keep"


def test_vdisk_deleted_while_its_go_is_answered_is_not_served_deleted(served):
    """A bug: an exported VDisk is open only once its GO's reply has gone out, so it can
    be deleted after the server found it and before the client starts: the client is
    then given an export of a deleted VDisk ("NBD: serving None to a client" in the log);
    once the kernel has forgotten the file the VDisk is gone from the metadata and the
    client's first write is an "unexpected error" traceback (FormatError: no VDisk with
    id N, raised inside an engine transaction) that cuts the connection. docs/NBD.md: an
    exported VDisk cannot be deleted. Either the delete is refused (EBUSY) or the GO is."""
    m = served.start("--nbd", f"unix:{served.sock}")
    write_file(m.path("DEL"), b"d" * 65536)
    make(m, "OTHER", MiB)
    s, skip = go_reply_held(m.sock, b"DEL")
    try:
        try:
            os.unlink(m.path("DEL"))
            deleted = True
        except OSError as e:
            assert e.errno == errno.EBUSY, e
            deleted = False
        time.sleep(1)                   # the kernel's FORGET of the unlinked file
        rtype, flags = read_go_reply(s, skip)
        if rtype == 1:
            s.sendall(req(WRITE, 0, 4096, 5, payload=b"W" * 4096))
            try:
                magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
                answer = f"the write got error {err}"
            except (ConnectionError, socket.timeout) as e:
                answer = f"the write cut the connection ({e})"
            assert not deleted, (f"the VDisk was deleted, then its export was given to "
                                 f"the client; {answer}")
            assert (magic, err, cookie) == (SIMPLE, 0, 5)
        else:
            assert deleted, "refused although the VDisk was still there"
    finally:
        s.close()
    no_tracebacks(m)
    assert read_file(m.path("OTHER")) == bytes(MiB)


# ---------------------------------------------------------------- the shared budget
# Clients that never read their replies: t2_nbd_inprocess.py
# (test_clients_that_never_read_their_replies_are_cut_off), with a 1 s stall timeout
# instead of the daemon's 60 s.


def test_budget_comes_back_after_hogs_leave_and_trickled_payloads(served):
    """Clients that fill their sockets and then go away give their budget back; a write
    whose payload trickles in (well within the watchdog's 60 s) is applied, and other
    connections are served while it trickles."""
    m = served.start("--nbd", f"unix:{served.sock}")
    make(m, "FOO", 64 * MiB)
    for round_ in range(3):
        hogs = []
        for i in range(8):
            h = raw_client(m.sock)
            go(h, b"FOO")
            h.sendall(req(READ, 0, 32 * MiB, i))
            hogs.append(h)
        time.sleep(0.3)
        for h in hogs:
            h.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close()
        s = raw_client(m.sock)
        go(s, b"FOO")
        s.settimeout(20)
        assert request(s, READ, 0, 0, cookie=9) == 0, "the budget was not given back"
        s.close()
    slow = raw_client(m.sock)
    go(slow, b"FOO")
    slow.sendall(req(WRITE, MiB, 65536, 42, flags=1))
    other = raw_client(m.sock)
    go(other, b"FOO")
    payload = random.Random(7).randbytes(65536)
    for i in range(32):
        slow.sendall(payload[i * 2048:(i + 1) * 2048])
        assert request(other, WRITE, 8 * MiB + i * 4096, 4096, payload=bytes([i]) * 4096,
                       cookie=100 + i) == 0
        time.sleep(0.05)
    magic, err, cookie = struct.unpack(">IIQ", recv_exact(slow, 16))
    assert (magic, err, cookie) == (SIMPLE, 0, 42)
    slow.close()
    other.close()
    data = read_file(m.path("FOO"))
    assert data[MiB:MiB + 65536] == payload
    for i in range(32):
        assert data[8 * MiB + i * 4096:8 * MiB + (i + 1) * 4096] == bytes([i]) * 4096
    no_tracebacks(m)


# ---------------------------------------------------------------- races with the file
def test_read_racing_a_shrink_never_sends_a_short_reply(served):
    """A bug: a READ is checked against the VDisk's size, then waits for the kernel's
    dirty pages (the file is open), and reads after: a truncate of the file in between
    makes pool.read return fewer bytes (none), which go out after a success reply. The
    client waits for data that never comes (the stream is out of step). The same gap
    lets a WRITE checked at the old size grow the VDisk back past its new end."""
    m = served.start("--nbd", f"unix:{served.sock}")
    p = m.path("SH")
    make(m, "SH", 64 * MiB)
    stop = threading.Event()

    def writer():
        fd = os.open(p, os.O_RDWR)
        try:
            i = 0
            while not stop.is_set():
                os.pwrite(fd, bytes([i % 256]) * MiB, (i % 32) * MiB)
                i += 1
        finally:
            os.close(fd)

    def shrinker():
        while not stop.is_set():
            os.truncate(p, 32 * MiB)
            time.sleep(0.001)
            os.truncate(p, 64 * MiB)
            time.sleep(0.003)

    threads = [threading.Thread(target=writer), threading.Thread(target=shrinker)]
    for t in threads:
        t.start()
    s = raw_client(m.sock)
    go(s, b"SH")
    problem, counts = None, {"ok": 0, "error": 0}
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and problem is None:
            s.settimeout(10)
            s.sendall(req(READ, 60 * MiB, 4 * MiB, 9))
            magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
            if (magic, cookie) != (SIMPLE, 9):
                problem = f"out of step: magic {magic:#x} cookie {cookie}"
                break
            if err:
                assert err == 22, err                # past the (new) end: EINVAL
                counts["error"] += 1
                continue
            got = bytearray()
            s.settimeout(5)
            try:
                while len(got) < 4 * MiB:
                    chunk = s.recv(4 * MiB - len(got))
                    if not chunk:
                        break
                    got += chunk
            except socket.timeout:
                pass
            if len(got) != 4 * MiB:
                problem = f"a successful 4 MiB read sent {len(got)} bytes of data"
            counts["ok"] += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
        s.close()
    assert problem is None, f"{problem} ({counts})"


def test_block_status_racing_a_shrink_is_answered(served, tmp_path):
    """A bug: BLOCK_STATUS is checked against the size, waits for the kernel's dirty
    pages, then seeks: a truncate in between makes seek raise ENXIO, an "unexpected
    error" traceback in the log that cuts the connection (ENOTCONN in libnbd)."""
    m = served.start("--nbd", f"unix:{served.sock}")
    make(m, "SB", 64 * MiB)
    out = libnbd(tmp_path, """
import threading
p, uri = sys.argv[1], sys.argv[2]
MiB = 1 << 20
stop = threading.Event()
def writer():
    fd = os.open(p, os.O_RDWR); i = 0
    while not stop.is_set():
        os.pwrite(fd, bytes([i % 256]) * MiB, (i % 32) * MiB); i += 1
    os.close(fd)
def shrinker():
    while not stop.is_set():
        os.truncate(p, 32 * MiB); time.sleep(0.001); os.truncate(p, 64 * MiB); time.sleep(0.003)
h = nbd.NBD(); h.add_meta_context("base:allocation"); h.connect_uri(uri)
assert h.get_size() == 64 * MiB
ts = [threading.Thread(target=writer), threading.Thread(target=shrinker)]
for t in ts: t.start()
ok = einval = 0; failure = None
t0 = time.time()
try:
    while time.time() - t0 < 8:
        try:
            h.block_status(4 * MiB, 60 * MiB, lambda *a: 0); ok += 1
        except nbd.Error as e:
            if e.errno in (22, 'EINVAL'): einval += 1
            else: failure = str(e); break
finally:
    stop.set()
    for t in ts: t.join()
print(failure, ok, einval)
""", m.path("SB"), m.uri("SB")).stdout
    assert out.startswith("None "), out
    no_tracebacks(m)


# ---------------------------------------------------------------- many in flight
AIO_MIX = r"""
uri, nconn, nops, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
SIZE, BS = 64 << 20, 64 << 10
rng = random.Random(seed)
hs = []
for i in range(nconn):
    h = nbd.NBD(); h.add_meta_context("base:allocation"); h.connect_uri(uri); hs.append(h)
assert all(h.can_multi_conn() for h in hs)
nblocks = SIZE // BS
model, done, errors, inflight, reads, extents = {}, {}, [], {}, [], []
def completion(key):
    def cb(err):
        if err.value:
            errors.append((key, err.value))
        done[key] = done.get(key, 0) + 1
        return 1
    return cb
for step in range(nops):
    i = rng.randrange(nconn); h = hs[i]
    b = rng.randrange(i, nblocks, nconn)          # connection i owns blocks b % nconn == i
    op = rng.choice(["w", "wf", "r", "t", "tf", "z", "zf", "f", "bs"])
    key = (step, op)
    if b in inflight and op != "f":               # one request per block in flight
        while inflight[b] not in done:
            hs[b % nconn].poll(-1)
        del inflight[b]
    if op in ("w", "wf"):
        data = rng.randbytes(BS)
        model[b] = data
        h.aio_pwrite(data, b * BS, completion=completion(key),
                     flags=nbd.CMD_FLAG_FUA if op == "wf" else 0)
    elif op == "r":
        buf = nbd.Buffer(BS)
        h.aio_pread(buf, b * BS, completion=completion(key))
        reads.append((b, buf, model.get(b, bytes(BS))))
    elif op in ("t", "tf"):
        model[b] = bytes(BS)
        h.aio_trim(BS, b * BS, completion=completion(key),
                   flags=nbd.CMD_FLAG_FUA if op == "tf" else 0)
    elif op in ("z", "zf"):
        model[b] = bytes(BS)
        h.aio_zero(BS, b * BS, completion=completion(key),
                   flags=rng.choice([0, nbd.CMD_FLAG_NO_HOLE]) | (nbd.CMD_FLAG_FUA if op == "zf" else 0))
    elif op == "f":
        h.aio_flush(completion=completion(key))
    else:
        def ext(ctx, offset, entries, err, b=b):
            assert ctx == "base:allocation" and offset == b * BS, (ctx, offset)
            assert entries and all(n > 0 for n in entries[0::2]), entries
            extents.append(sum(entries[0::2]))
            return 0
        h.aio_block_status(BS, b * BS, ext, completion=completion(key))
    if op != "f":
        inflight[b] = key
    for hh in hs:
        while hh.aio_in_flight() > 60:
            hh.poll(-1)
for hh in hs:
    while hh.aio_in_flight():
        hh.poll(-1)
assert not errors, errors[:10]
assert len(done) == nops and set(done.values()) == {1}, "a reply missing or twice"
bad = [b for b, buf, exp in reads if buf.to_bytearray() != exp]
assert not bad, f"{len(bad)} of {len(reads)} reads differ"
for hh in hs:
    hh.flush()
for b, d in model.items():
    assert hs[(b + 1) % nconn].pread(BS, b * BS) == d, b
for hh in hs:
    hh.shutdown()
print("OK", nops, len(reads), len(extents))
"""


def test_pipelined_mix_on_several_connections_is_answered_once_and_reads_right(served,
                                                                               tmp_path):
    """Four libnbd connections (multi-conn) with up to 60 requests in flight each: READ,
    WRITE with and without FUA, TRIM, WRITE_ZEROES (FUA, NO_HOLE), FLUSH, BLOCK_STATUS
    at random; every request completes once without error, every read returns what the
    last write of its block wrote, and the image is right at the end."""
    m = served.start("--nbd", f"unix:{served.sock}")
    make(m, "AIO", 64 * MiB)
    out = libnbd(tmp_path, AIO_MIX, m.uri("AIO"), "4", "12000", "1").stdout
    assert out.startswith("OK 12000"), out
    no_tracebacks(m)


def test_more_than_64_connections(served):
    """64 connections are served; the 65th is closed at once; a slot freed is usable."""
    m = served.start("--nbd", f"unix:{served.sock}")
    make(m, "FOO", MiB)
    conns = []
    try:
        for _ in range(64):
            s = raw_client(m.sock)
            go(s, b"FOO")
            conns.append(s)
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(10)
        extra.connect(m.sock)
        assert closed(extra), "the 65th connection was served"
        extra.close()
        assert all(request(c, FLUSH, 0, 0, cookie=i) == 0 for i, c in enumerate(conns))
        conns.pop().close()
        wait_until(lambda: nbd_clients(m, "FOO") == 63, "a client to go")
        s = raw_client(m.sock)
        assert go(s, b"FOO") == MiB
        conns.append(s)
    finally:
        for c in conns:
            c.close()
    wait_until(lambda: nbd_clients(m, "FOO") == 0, "the clients to go")
    again = [raw_client(m.sock) for _ in range(64)]
    try:
        for s in again:
            go(s, b"FOO")
    finally:
        for s in again:
            s.close()
    no_tracebacks(m)


# ---------------------------------------------------------------- disconnects
def _burst(n: int) -> bytes:
    out = b""
    for i in range(n):
        if i % 3 == 0:
            out += req(FLUSH, 0, 0, i)
        else:
            out += req(WRITE, i * 4096, 4096, i, flags=1, payload=bytes([i % 256]) * 4096)
    return out


def test_disconnects_with_flushes_in_flight(served):
    """Half-close: every request sent before it is answered. DISC: every request before
    it is answered, then the close. Close and reset with flushes and FUA writes in
    flight: the others are served, the daemon logs no error, fsck is clean after."""
    m = served.start("--nbd", f"unix:{served.sock}")
    make(m, "FOO", 4 * MiB)
    make(m, "OTHER", MiB)
    watcher = raw_client(m.sock)
    go(watcher, b"OTHER")
    for how in ("half-close", "disc"):
        s = raw_client(m.sock)
        go(s, b"FOO")
        s.sendall(_burst(300) + (req(DISC, 0, 0, 999) if how == "disc" else b""))
        if how == "half-close":
            s.shutdown(socket.SHUT_WR)
        s.settimeout(30)
        got = set()
        while True:
            head = s.recv(16, socket.MSG_WAITALL)
            if not head:
                break
            magic, err, cookie = struct.unpack(">IIQ", head)
            assert magic == SIMPLE and err == 0 and cookie not in got, (magic, err, cookie)
            got.add(cookie)
        assert got == set(range(300)), (how, len(got))
        s.close()
    for k in range(30):
        s = raw_client(m.sock)
        go(s, b"FOO")
        s.sendall(_burst(150))
        if k % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        assert request(watcher, FLUSH, 0, 0, cookie=k) == 0
    wait_until(lambda: nbd_clients(m, "FOO") == 0, "the cut connections to end", timeout=30)
    assert request(watcher, WRITE, 0, 512, payload=b"w" * 512, cookie=5000) == 0
    watcher.close()
    data = read_file(m.path("FOO"))
    for i in range(300):
        if i % 3:
            assert data[i * 4096:(i + 1) * 4096] == bytes([i % 256]) * 4096, i
    no_tracebacks(m)


CRASH = r"""
uri, nconn, seed, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
BS = 64 << 10
rng = random.Random(seed)
hs = []
for i in range(nconn):
    h = nbd.NBD(); h.connect_uri(uri); hs.append(h)
order = list(range(1024)); rng.shuffle(order)
acked, durable = [], set()
out = open(log, "w", buffering=1)
def content(b): return bytes([(b * 7 + seed) % 251 + 1]) * BS
def wcb(b, fua):
    def cb(err):
        if err.value == 0:
            acked.append(b)
            if fua and b not in durable:
                durable.add(b); out.write(f"{b}\n")
        return 1
    return cb
def fcb(covered):
    def cb(err):
        if err.value == 0:
            for b in covered:
                if b not in durable:
                    durable.add(b); out.write(f"{b}\n")
        return 1
    return cb
print("ready", flush=True)
try:
    for n, b in enumerate(order):
        fua = rng.random() < 0.3
        hs[n % nconn].aio_pwrite(content(b), b * BS, completion=wcb(b, fua),
                                 flags=nbd.CMD_FLAG_FUA if fua else 0)
        if rng.random() < 0.1:      # a flush on any connection covers what was answered
            hs[rng.randrange(nconn)].aio_flush(completion=fcb(list(acked)))
        for hh in hs:
            while hh.aio_in_flight() > 32:
                hh.poll(-1)
            if hh.aio_in_flight():
                hh.poll(0)
        time.sleep(0.002)
    for hh in hs:
        while hh.aio_in_flight():
            hh.poll(-1)
except nbd.Error:
    pass
"""


def test_kill9_keeps_every_acknowledged_fua_and_flushed_write(served, tmp_path):
    """Four connections write with FUA and flush (on any connection) with many requests
    in flight; the daemon is killed -9 in the middle. After a remount every write
    answered with FUA, or answered before a flush that was answered, is there."""
    m = served.start("--nbd", f"unix:{served.sock}")
    make(m, "CR", 64 * MiB)
    log = tmp_path / "durable.txt"
    script = tmp_path / "crash.py"
    script.write_text("import nbd, sys, os, random, time\n" + CRASH)
    proc = subprocess.Popen([PY, str(script), m.uri("CR"), "4", "5", str(log)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        wait_until(lambda: log.exists() and len(log.read_text().splitlines()) > 200,
                   "durable writes", timeout=60)
        m.kill9()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    durable = [int(x) for x in log.read_text().split()]
    assert len(durable) > 200
    m.start("--nbd", f"unix:{m.sock}")
    data = read_file(m.path("CR"))
    lost = [b for b in durable
            if data[b * 65536:(b + 1) * 65536] != bytes([(b * 7 + 5) % 251 + 1]) * 65536]
    assert not lost, f"{len(lost)} of {len(durable)} acknowledged-durable writes lost"


# ---------------------------------------------------------------- errors, read-only, umount
def test_structured_error_in_the_middle_of_pipelined_reads(served):
    """A damaged block reads EIO as a structured error chunk; the reads around it in
    the same pipeline succeed and the connection goes on."""
    m = served.start("--nbd", f"unix:{served.sock}")
    make(m, "E", 4 * MiB)
    write_file(m.path("E"), b"x" * (256 << 10), 256 << 10)     # one chunk: slot 1
    m.stop()
    flip_byte(os.path.join(m.pool, "data"), (256 << 10) + 100)
    m.start("--nbd", f"unix:{m.sock}")
    out = run([PY, "-c", f"""
import nbd
h = nbd.NBD(); h.connect_uri({m.uri("E")!r})
assert h.get_structured_replies_negotiated()
res, bufs = {{}}, {{}}
for i in range(16):
    bufs[i] = nbd.Buffer(65536)
    def cb(err, i=i):
        res[i] = err.value
        return 1
    h.aio_pread(bufs[i], i * 65536, completion=cb)
while h.aio_in_flight():
    h.poll(-1)
print(sorted(i for i, e in res.items() if e), sorted(set(res.values())))
print(bytes(bufs[3].to_bytearray()[:2]), bytes(bufs[8].to_bytearray()[:2]))
print(bytes(h.pread(512, 0)[:2]))
"""]).stdout.splitlines()
    assert out[0] == "[4] [0, 5]", out          # only the damaged 64 KiB: EIO
    assert out[1] == "b'\\x00\\x00' b'\\x00\\x00'" and out[2] == "b'\\x00\\x00'", out
    m.stop()
    flip_byte(os.path.join(m.pool, "data"), (256 << 10) + 100)     # restored for fsck
    m.start("--nbd", f"unix:{m.sock}")
    no_tracebacks(m)


def test_readonly_export_created_later_and_renamed_while_connected(served, tmp_path):
    """An export named by --nbd-readonly-export that is created after the mount is
    read-only; renaming a VDisk keeps what its connections negotiated, both ways; a new
    connection goes by the new name."""
    m = served.start("--nbd", f"unix:{served.sock}", "--nbd-readonly-export", "LATER")
    write_file(m.path("LATER"), b"late" * 1024)
    write_file(m.path("RW"), b"rwrw" * 1024)
    ro = raw_client(m.sock)
    go(ro, b"LATER")
    rw = raw_client(m.sock)
    go(rw, b"RW")
    try:
        assert request(ro, WRITE, 0, 512, payload=b"x" * 512) == 1          # EPERM
        os.rename(m.path("LATER"), m.path("FREE"))
        os.rename(m.path("RW"), m.path("LATER"))     # RW takes the read-only name
        assert request(ro, WRITE, 0, 512, payload=b"x" * 512) == 1, "renamed: still RO"
        assert request(ro, TRIM, 0, 512) == 1
        assert request(rw, WRITE, 0, 512, payload=b"y" * 512, flags=1) == 0
        out = libnbd(tmp_path, f"""
a = nbd.NBD(); a.connect_uri({m.uri("FREE")!r})
b = nbd.NBD(); b.connect_uri({m.uri("LATER")!r})
print(a.is_read_only(), b.is_read_only())
a.pwrite(b"f" * 512, 0, nbd.CMD_FLAG_FUA)
""").stdout.split()
        assert out == ["False", "True"], out
        with pytest.raises(OSError) as e:
            os.unlink(m.path("FREE"))
        assert e.value.errno == errno.EBUSY
    finally:
        ro.close()
        rw.close()
    assert read_file(m.path("FREE"))[:4] == b"ffff"
    assert read_file(m.path("LATER"))[:4] == b"yyyy"
    no_tracebacks(m)


def test_umount_with_clients_and_force_with_flushes_in_flight(served):
    """umount refuses while a client is connected (and names it); --force cuts the
    clients off even with flushes and FUA writes in flight; the pool is clean after (the
    fixture's fsck), and every answered FUA write is there."""
    m = served.start("--nbd", f"unix:{served.sock}")
    make(m, "FOO", 4 * MiB)
    make(m, "BUSY", 4 * MiB)
    s = raw_client(m.sock)
    go(s, b"FOO")
    assert_user_error(vdiskfs("umount", m.mnt, check=False), "in use", "NBD client")
    # a client busy with durable requests when --force comes
    s.sendall(_burst(300))
    busy = raw_client(m.sock)
    go(busy, b"BUSY")
    answered = set()
    s.settimeout(10)
    while len(answered) < 100:
        magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
        assert err == 0
        answered.add(cookie)
    stop = threading.Event()

    def churn():
        i = 0
        try:
            while not stop.is_set():
                busy.sendall(req(WRITE, (i % 64) * 65536, 65536, i, flags=i % 2,
                                 payload=bytes([i % 250 + 1]) * 65536))
                busy.sendall(req(FLUSH, 0, 0, 10 ** 6 + i))
                i += 1
        except OSError:
            pass

    t = threading.Thread(target=churn)
    t.start()
    time.sleep(0.5)
    proc = vdiskfs("umount", "--force", m.mnt, check=False, timeout=120)
    stop.set()
    t.join()
    s.close()
    busy.close()
    assert proc.returncode == 0, proc.stderr
    m.pid = None
    assert "unexpected error" not in daemon_log(m.pool)
    m.start("--nbd", f"unix:{m.sock}")
    data = read_file(m.path("FOO"))
    for i in answered:
        if i % 3:
            assert data[i * 4096:(i + 1) * 4096] == bytes([i % 256]) * 4096, i
    no_tracebacks(m)
