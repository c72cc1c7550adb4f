"""The NBD server (issue 14, first step) with the clients a user would use: libnbd's
nbdinfo and nbdcopy, python3-libnbd (Debian's, run by /usr/bin/python3) for precise
commands, qemu-img; and a raw socket for hostile input.

Each test mounts a pool with ``--nbd unix:SOCK`` (and TCP on a free loopback port where
it says so); the fixtures unmount it and fsck the pool afterwards."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import time

import pytest

from support.clones import SLOW, state_of
from support.nbd_raw import closed, go, go_error, raw_client, recv_exact, request
from support.common import (Mount, assert_user_error, daemon_log, read_file, run, vdiskfs,
                            wait_until, write_file)

pytestmark = pytest.mark.mount

MiB = 1 << 20
PY = "/usr/bin/python3"     # python3-libnbd is Debian's, for Debian's python


def _missing() -> str | None:
    for tool in ("nbdinfo", "nbdcopy", "qemu-img"):
        if shutil.which(tool) is None:
            return tool
    if subprocess.run([PY, "-c", "import nbd"], capture_output=True).returncode:
        return "python3-libnbd"
    return None


@pytest.fixture
def nbd_tools():
    missing = _missing()
    if missing:
        msg = f"{missing} is not installed (bash scripts/setup.sh test installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip("LOUD SKIP: " + msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(nbd_tools, new_mount, tmp_path):
    sock = str(tmp_path / "nbd.sock")
    m = new_mount
    m.sock = sock
    m.uri = lambda name: f"nbd+unix:///{name}?socket={sock}"
    return m


def libnbd(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``script`` under Debian's python with ``import nbd`` and ``h`` unset."""
    return run([PY, "-c", "import nbd, sys, os\n" + script, *args], check=check)


def connect(uri: str) -> str:
    return f"h = nbd.NBD()\nh.connect_uri({uri!r})\n"


# ---------------------------------------------------------------- exports
def test_exports_sizes_block_sizes_and_unfinished_clones(served):
    m = served.start("--nbd", f"unix:{served.sock}", *SLOW)
    assert os.stat(m.sock).st_mode & 0o777 == 0o600
    write_file(m.path("FOO"), random.Random(1).randbytes(40 * MiB))
    with open(m.path("SMALL"), "wb") as f:
        f.truncate(3 * MiB)
    os.setxattr(m.path("SMALL"), "user.vdisk.lba_size", b"4096")
    vdiskfs("clone", "-s", "FOO", "-d", "BAR", "--mount", m.mnt)
    wait_until(lambda: (state_of(m.mnt, "FOO", "BAR") or "").endswith("%"), "clone running")
    out = run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={m.sock}"]).stdout
    exports = {e["export-name"]: e for e in json.loads(out)["exports"]}
    assert sorted(exports) == ["FOO", "SMALL"], "an unfinished clone is not listed"
    assert exports["SMALL"]["export-size"] == 3 * MiB
    assert exports["SMALL"]["block_size_minimum"] == 4096
    assert exports["FOO"]["block_size_minimum"] == 512
    assert exports["FOO"]["block_size_maximum"] == 32 * MiB
    proc = run(["nbdinfo", m.uri("BAR")], check=False)
    assert proc.returncode != 0 and "BAR" in proc.stderr, proc.stderr
    s = raw_client(m.sock)                 # the reply: ERR_POLICY, with the reason
    try:
        rtype, body = go_error(s, b"BAR")
        assert rtype == (1 << 31) + 2 and b"not completed" in body, (rtype, body)
    finally:
        s.close()
    proc = run(["nbdinfo", m.uri("NOPE")], check=False)
    assert proc.returncode != 0 and "No such file" in proc.stderr, proc.stderr
    wait_until(lambda: state_of(m.mnt, "FOO", "BAR") == "Completed", "clone", timeout=60)
    assert json.loads(run(["nbdinfo", "--json", m.uri("BAR")]).stdout)["exports"][0][
        "export-size"] == 40 * MiB


# ---------------------------------------------------------------- data
def test_round_trips_with_nbdcopy_qemu_img_and_the_file(served, tmp_path):
    m = served.start("--nbd", f"unix:{served.sock}")
    # A 1 GiB VDisk: data at both ends and in the middle, holes between.
    data = bytearray(1 << 30)
    rng = random.Random(2)
    for off in (0, 300 * MiB, (1 << 30) - 40 * MiB):
        data[off:off + 40 * MiB] = rng.randbytes(40 * MiB)
    data = bytes(data)
    src = tmp_path / "in.img"
    with open(src, "wb") as f:            # sparse: only the data is written
        f.truncate(len(data))
        for off in (0, 300 * MiB, (1 << 30) - 40 * MiB):
            f.seek(off)
            f.write(data[off:off + 40 * MiB])
    with open(m.path("FOO"), "wb") as f:
        f.truncate(len(data))
    run(["nbdcopy", str(src), m.uri("FOO")])
    assert read_file(m.path("FOO")) == data, "NBD writes read back through the file"
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), m.uri("FOO")])
    out = tmp_path / "out.img"
    run(["nbdcopy", m.uri("FOO"), str(out)])
    assert out.read_bytes() == data
    # ... and through a later clone.
    vdiskfs("clone", "-s", "FOO", "-d", "BAR", "-w", "--mount", m.mnt)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), m.uri("BAR")])
    # The reverse: the file written (and kept open for writing) reads back over NBD,
    # and an NBD write is seen by a reader of the file that had the range cached.
    fd = os.open(m.path("BAR"), os.O_RDWR)
    try:
        os.pwrite(fd, b"F" * 8192, 8192)         # dirty in the kernel's cache
        assert os.pread(fd, 4096, 65536) == data[65536:69632]   # cached now
        got = libnbd(connect(m.uri("BAR")) + """
print(h.pread(8192, 8192).decode())
h.pwrite(b"N" * 4096, 65536, nbd.CMD_FLAG_FUA)
""").stdout.strip()
        assert got == "F" * 8192
        assert os.pread(fd, 4096, 65536) == b"N" * 4096
    finally:
        os.close(fd)
    # A clone taken while a client writes holds the data as of the clone point.
    libnbd(connect(m.uri("FOO")) + """
h.pwrite(b"A" * 65536, 0)
h.flush()
""")
    vdiskfs("clone", "-s", "FOO", "-d", "PIT", "-w", "--mount", m.mnt)
    libnbd(connect(m.uri("FOO")) + 'h.pwrite(b"B" * 65536, 0, nbd.CMD_FLAG_FUA)\n')
    assert read_file(m.path("PIT"))[:65536] == b"A" * 65536
    assert read_file(m.path("FOO"))[:65536] == b"B" * 65536
    # qemu-io writes with FUA:
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a -f 0 64k", m.uri("FOO")])
    assert read_file(m.path("FOO"))[:65536] == b"\x5a" * 65536


def test_trim_zero_flush_fua_and_durability(served):
    m = served.start("--nbd", f"unix:{served.sock}")
    with open(m.path("FOO"), "wb") as f:
        f.truncate(64 * MiB)
    write_file(m.path("FOO"), random.Random(3).randbytes(64 * MiB))
    assert int(os.getxattr(m.path("FOO"), "user.vdisk.allocated")) == 64 * MiB
    libnbd(connect(m.uri("FOO")) + f"""
h.trim({32 * MiB}, 0)
h.zero({16 * MiB}, {32 * MiB}, nbd.CMD_FLAG_NO_HOLE)
h.flush()
h.pwrite(b"D" * 4096, {60 * MiB}, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 0) == bytes(4096)
assert h.pread(4096, {40 * MiB}) == bytes(4096)
""")
    wait_until(lambda: int(os.getxattr(m.path("FOO"), "user.vdisk.allocated")) == 16 * MiB,
               "the trimmed and zeroed chunks to be freed")
    # CAN_MULTI_CONN: a write answered on one connection is made durable by a flush on
    # another (the write goes to a trimmed chunk: a new mapping, lost without a commit).
    libnbd(connect(m.uri("FOO")) + f"""
assert h.can_multi_conn()
h2 = nbd.NBD()
h2.connect_uri({m.uri("FOO")!r})
h2.pwrite(b"M" * 4096, {8 * MiB})
h.flush()
""")
    # FUA and FLUSH are durable: a crash right after keeps them.
    m.kill9()
    m.start("--nbd", f"unix:{m.sock}")
    with open(m.path("FOO"), "rb") as f:
        f.seek(60 * MiB)
        assert f.read(4096) == b"D" * 4096
        f.seek(0)
        assert f.read(4096) == bytes(4096)
        f.seek(8 * MiB)
        assert f.read(4096) == b"M" * 4096


def test_in_use_while_exported_and_readonly(served):
    port = free_port()
    m = served.start("--nbd", f"unix:{served.sock}", "--nbd", f"tcp:127.0.0.1:{port}")
    write_file(m.path("FOO"), b"keep" * 1024)
    # A client holding FOO: no delete, no umount; it names the NBD client.
    holder = subprocess.Popen([PY, "-c", "import nbd, sys\n" +
                               connect(f"nbd://127.0.0.1:{port}/FOO") +
                               "print('ready', flush=True)\nsys.stdin.read()\n"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(OSError) as e:
            os.unlink(m.path("FOO"))
        assert e.value.errno == errno.EBUSY
        assert json.loads(vdiskfs("list", "--json", "--mount", m.mnt).stdout)[
            "vdisks"][0]["nbd"] == 1
        assert_user_error(vdiskfs("umount", m.mnt, check=False), "in use", "NBD client")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    wait_until(lambda: not json.loads(vdiskfs("list", "--json", "--mount", m.mnt).stdout)[
        "vdisks"][0]["nbd"], "the client to go")
    m.stop()
    assert not os.path.exists(m.sock), "the socket goes with the daemon"
    m.start("--nbd", f"unix:{m.sock}", "--nbd-readonly")
    out = libnbd(connect(m.uri("FOO")) + """
print(h.is_read_only(), bytes(h.pread(512, 0)[:4]))
try:
    h.pwrite(b"x" * 512, 0)
except nbd.Error as e:
    print(e.errno)
""").stdout.split("\n")
    assert out[0] == "True b'keep'" and out[1] in ("EPERM", "1"), out
    s = raw_client(m.sock)          # libnbd refuses by itself: the server's answer too
    try:
        go(s, b"FOO")
        assert request(s, 1, 0, 512, payload=b"x" * 512) == 1            # EPERM
        assert request(s, 4, 0, 512) == 1
    finally:
        s.close()
    assert read_file(m.path("FOO"))[:4] == b"keep"
    # Read-only per export: FOO is, BAR is not.
    write_file(m.path("BAR"), b"bar!" * 1024)
    m.stop()
    m.start("--nbd", f"unix:{m.sock}", "--nbd-readonly-export", "FOO")
    out = libnbd(connect(m.uri("FOO")) + "print(h.is_read_only())\n"
                 + connect(m.uri("BAR")) + """
print(h.is_read_only())
h.pwrite(b"w" * 512, 0, nbd.CMD_FLAG_FUA)
""").stdout.split()
    assert out == ["True", "False"], out
    assert read_file(m.path("BAR"))[:1] == b"w" and read_file(m.path("FOO"))[:4] == b"keep"


# ---------------------------------------------------------------- hostile input
def test_fuzzed_handshakes_and_requests_leave_the_daemon_serving(served):
    m = served.start("--nbd", f"unix:{served.sock}")
    with open(m.path("FOO"), "wb") as f:
        f.truncate(1 * MiB)
    with open(m.path("NEXT"), "wb") as f:
        f.truncate(1 * MiB)
        f.write(b"n" * 4096)
    # A well-behaved client stays connected through all of it.
    good = raw_client(m.sock)
    assert go(good, b"FOO") == 1 * MiB
    rng = random.Random(4)
    for i in range(60):                  # random bytes at every stage
        s = raw_client(m.sock)
        try:
            if i % 3:
                s.sendall(struct.pack(">I", 3))
            s.sendall(rng.randbytes(rng.randrange(1, 300)))
            s.shutdown(socket.SHUT_WR)
            s.recv(1 << 16)
        except OSError:
            pass
        finally:
            s.close()
    # Requests: past the end, unknown command and flags, bad magic, an oversized write,
    # a disconnect in the middle of a write.
    s = raw_client(m.sock)
    go(s, b"FOO")
    assert request(s, 1, 1 * MiB - 512, 1024, payload=b"x" * 1024) == 28     # ENOSPC
    assert request(s, 0, 1 * MiB, 512) == 22                                  # EINVAL
    assert request(s, 4, 2 ** 63, 512) == 28
    assert request(s, 42, 0, 512) == 22
    assert request(s, 1, 0, 512, flags=0x80, payload=b"y" * 512) == 22
    assert request(s, 0, 0, 64 * MiB) == 22                                   # too big
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 1 << 30))      # 1 GiB write
    assert closed(s)
    s = raw_client(m.sock)
    go(s, b"FOO")
    s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
    assert closed(s)
    s = raw_client(m.sock)
    go(s, b"FOO")
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 4096, 8192) + b"z" * 100)
    s.close()                           # gone in the middle of the write's payload
    # Nothing was written past the end or by the refused requests; the good client and
    # the daemon go on.
    assert request(good, 1, 0, 512, payload=b"G" * 512, cookie=99) == 0
    assert request(good, 3, 0, 0, cookie=100) == 0                      # FLUSH
    data = read_file(m.path("FOO"))
    assert len(data) == 1 * MiB and data[:512] == b"G" * 512
    assert data[512:] == bytes(1 * MiB - 512), "a refused or cut request wrote something"
    assert read_file(m.path("NEXT"))[:4096] == b"n" * 4096
    good.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 1, 0, 0))     # DISC
    assert closed(good)
    assert "unexpected error" not in daemon_log(m.pool)
    assert json.loads(vdiskfs("list", "--json", "--mount", m.mnt).stdout)["vdisks"][0][
        "nbd"] == 0


def test_block_status_is_the_allocation_map_of_vdisks_and_clones(served, tmp_path):
    m = served.start("--nbd", f"unix:{served.sock}")
    cs = 256 << 10
    with open(m.path("FOO"), "wb") as f:
        f.truncate(64 * MiB)
    fd = os.open(m.path("FOO"), os.O_WRONLY)
    try:
        os.pwrite(fd, random.Random(5).randbytes(MiB), 3 * MiB)
        os.pwrite(fd, random.Random(6).randbytes(cs // 2), 40 * MiB)   # half a chunk
        os.fsync(fd)
    finally:
        os.close(fd)
    vdiskfs("clone", "-s", "FOO", "-d", "BAR", "-w", "--mount", m.mnt)
    fd = os.open(m.path("BAR"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"b" * 4096, 10 * MiB)          # not fsync'd: dirty in the kernel
    finally:
        os.close(fd)

    def nbd_map(name: str) -> list[tuple[int, int, bool]]:
        out = json.loads(run(["nbdinfo", "--map", "--json", m.uri(name)]).stdout)
        return [(e["offset"], e["length"], bool(e["type"] & 1)) for e in out]

    def seek_map(name: str) -> list[tuple[int, int, bool]]:
        """The same map by SEEK_DATA/SEEK_HOLE through the file."""
        fd = os.open(m.path(name), os.O_RDONLY)
        try:
            size, pos, out = os.fstat(fd).st_size, 0, []
            while pos < size:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
                if hole > pos:
                    out.append((pos, hole - pos, False))
                    pos = hole
                    continue
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    data = size
                out.append((pos, data - pos, True))
                pos = data
            return out
        finally:
            os.close(fd)

    foo = nbd_map("FOO")
    assert foo == seek_map("FOO")
    assert foo == [(0, 3 * MiB, True), (3 * MiB, MiB, False), (4 * MiB, 36 * MiB, True),
                   (40 * MiB, cs, False), (40 * MiB + cs, 24 * MiB - cs, True)], foo
    bar = nbd_map("BAR")
    assert bar == seek_map("BAR") and (10 * MiB, cs, False) in bar, bar
    # nbdcopy skips the holes: a sparse copy, byte-identical.
    out = tmp_path / "bar.img"
    run(["nbdcopy", m.uri("BAR"), str(out)])
    assert out.read_bytes() == read_file(m.path("BAR"))
    assert os.stat(out).st_blocks * 512 <= 4 * MiB
    # qemu-img map agrees.
    qmap = json.loads(run(["qemu-img", "map", "--output=json", m.uri("FOO")]).stdout)
    assert [(e["start"], e["length"], e["data"]) for e in qmap] == \
        [(o, n, not hole) for o, n, hole in foo]


def make_certs(d) -> dict[str, str]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    def ossl(*args: str) -> None:
        run(["openssl", *args], cwd=str(d))
    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
         "/CN=vdiskfs test CA", "-keyout", "ca-key.pem", "-out", "ca-cert.pem")
    (d / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who, ext in (("server", ["-extfile", "ext"]), ("client", [])):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout",
             f"{who}-key.pem", "-out", f"{who}.csr")
        ossl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey",
             "ca-key.pem", "-CAcreateserial", "-days", "2", *ext, "-out", f"{who}-cert.pem")
    # libnbd's certificate directories: with a client certificate, and without one.
    for name, files in (("with", ("ca-cert.pem", "client-cert.pem", "client-key.pem")),
                        ("without", ("ca-cert.pem",))):
        (d / name).mkdir()
        for f in files:
            shutil.copy(d / f, d / name / f)
    return {k: str(d / f"{k}.pem") for k in ("ca-cert", "server-cert", "server-key")}


def test_tls_required_with_client_certificates(served, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("LOUD SKIP: openssl is not installed; no certificates for the TLS test")
    certs = make_certs(tmp_path)
    port = free_port()
    m = served.start("--nbd", f"tcp:127.0.0.1:{port}", "--nbd", f"unix:{served.sock}",
                     "--nbd-tls-cert", certs["server-cert"], "--nbd-tls-key",
                     certs["server-key"], "--nbd-tls-ca", certs["ca-cert"])
    with open(m.path("FOO"), "wb") as f:
        f.truncate(4 * MiB)
    data = random.Random(9).randbytes(4 * MiB)
    (tmp_path / "in.img").write_bytes(data)
    uri = f"nbds://127.0.0.1:{port}/FOO?tls-certificates={tmp_path / 'with'}"
    run(["nbdcopy", str(tmp_path / "in.img"), uri])
    assert read_file(m.path("FOO")) == data
    info = run(["nbdinfo", uri]).stdout
    assert "with TLS" in info, info
    # Without TLS: refused (NBD_REP_ERR_TLS_REQD); without a client certificate: the
    # handshake fails. Neither reaches the data.
    assert run(["nbdinfo", f"nbd://127.0.0.1:{port}/FOO"], check=False).returncode != 0
    assert run(["nbdinfo", f"nbds://127.0.0.1:{port}/FOO?tls-certificates="
                f"{tmp_path / 'without'}"], check=False).returncode != 0
    s = raw_client(m.sock)
    try:
        rtype, body = go_error(s, b"FOO")
        assert rtype == (1 << 31) + 5 and b"requires TLS" in body, (rtype, body)
    finally:
        s.close()
    assert read_file(m.path("FOO")) == data
    # Bad TLS settings fail the mount, in one line.
    m.stop()
    assert_user_error(vdiskfs("mount", m.pool, m.mnt, "--nbd", f"unix:{m.sock}",
                              "--nbd-tls-cert", certs["server-cert"], check=False),
                      "--nbd-tls-key")
    assert_user_error(vdiskfs("mount", m.pool, m.mnt, "--nbd", f"unix:{m.sock}",
                              "--nbd-tls-cert", certs["ca-cert"], "--nbd-tls-key",
                              certs["server-key"], check=False), "NBD TLS")
    assert_user_error(vdiskfs("mount", m.pool, m.mnt, "--nbd", "udp:1", check=False),
                      "unix:PATH or tcp:HOST:PORT")


def test_pipelined_requests_are_all_answered(served):
    """Requests sent without waiting (as libnbd and qemu do) are all answered, each once;
    FUA writes and flushes among them are durable when answered."""
    m = served.start("--nbd", f"unix:{served.sock}")
    with open(m.path("FOO"), "wb") as f:
        f.truncate(4 * MiB)
    s = raw_client(m.sock)
    try:
        go(s, b"FOO")
        out = b""
        for i in range(64):
            flags = 1 if i % 2 else 0                       # every other one with FUA
            out += struct.pack(">IHHQQI", 0x25609513, flags, 1, 1000 + i, i * 4096, 4096)
            out += bytes([i]) * 4096
            if i % 8 == 7:
                out += struct.pack(">IHHQQI", 0x25609513, 0, 3, 2000 + i, 0, 0)   # FLUSH
        out += struct.pack(">IHHQQI", 0x25609513, 0, 0, 3000, 0, 64 * 4096)      # READ
        s.sendall(out)
        got, read_data = {}, None
        while len(got) < 64 + 8 + 1:
            magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
            assert magic == 0x67446698 and cookie not in got, cookie
            got[cookie] = err
            if cookie == 3000:
                read_data = recv_exact(s, 64 * 4096)
        assert set(got.values()) == {0}
        assert sorted(got) == sorted([1000 + i for i in range(64)]
                                     + [2000 + i for i in range(7, 64, 8)] + [3000])
        assert read_data is not None and len(read_data) == 64 * 4096
    finally:
        s.close()
    m.kill9()                 # every write was answered after a FLUSH or with FUA...
    m.start("--nbd", f"unix:{m.sock}")
    data = read_file(m.path("FOO"))
    for i in range(64):
        assert data[i * 4096:(i + 1) * 4096] == bytes([i]) * 4096, i
