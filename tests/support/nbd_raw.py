"""A raw NBD client for tests: the fixed newstyle handshake and simple-reply requests over
a Unix socket, byte by byte as proto.md has them, so that tests can send what no real
client would (and a power-loss test can count acknowledgements exactly)."""

from __future__ import annotations

import socket
import struct

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
READ, WRITE, DISC, FLUSH, TRIM = 0, 1, 2, 3, 4
FUA = 1

HANDSHAKE_LEN = 18


def recv_exact(s: socket.socket, n: int) -> bytes:
    """``n`` bytes (a socket with a timeout may return less than MSG_WAITALL asks)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def raw_client(sock_path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock_path)
    assert len(recv_exact(s, HANDSHAKE_LEN)) == HANDSHAKE_LEN
    return s


def go(s: socket.socket, name: bytes) -> int:
    """Client flags, then NBD_OPT_GO for ``name``; returns the export size."""
    s.sendall(struct.pack(">I", 3))
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, len(data)) + data)
    size = None
    while True:
        magic, opt, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
        body = recv_exact(s, n) if n else b""
        if rtype == 3 and struct.unpack(">H", body[:2])[0] == 0:
            size = struct.unpack(">Q", body[2:10])[0]
        if rtype == 1:
            return size
        assert rtype < (1 << 31), (rtype, body)


def go_error(s: socket.socket, name: bytes) -> tuple[int, bytes]:
    """NBD_OPT_GO for ``name`` that the server refuses: (reply type, message)."""
    s.sendall(struct.pack(">I", 3))
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, len(data)) + data)
    magic, opt, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
    return rtype, recv_exact(s, n) if n else b""


def req(ctype: int, off: int, length: int, cookie: int, flags: int = 0,
        payload: bytes = b"") -> bytes:
    """One request's bytes (sent as they are: pipelining is the caller's)."""
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, ctype, cookie, off, length) + payload


def request(s, ctype, off, length, flags=0, payload=b"", cookie=7) -> int:
    s.sendall(req(ctype, off, length, cookie, flags, payload))
    magic, err, got = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == SIMPLE_REPLY_MAGIC and got == cookie
    return err


def closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, socket.timeout):
        return True
