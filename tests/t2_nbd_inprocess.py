"""The NBD server's concurrency and limits, in process: NbdServer on the test's trio loop
over the real engine (no mount), driven by the raw client in a thread. In process so
that a test can hold the group commit (the Syncer's lock) and so see, without timing
luck, which replies may go ahead of a FLUSH or a FUA write and which may not."""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from support.engine import new_pool
from support.nbd_raw import FLUSH, FUA, READ, WRITE, go, raw_client, recv_exact, req

from vdiskfs.cow.pool import Pool
from vdiskfs.fs.operations import Operations
from vdiskfs.nbd.config import Endpoint, NbdConfig
from vdiskfs.nbd.server import NbdServer

def reply(s: socket.socket, read_len: dict | None = None) -> tuple[int, int, bytes]:
    """(cookie, error, data) of the next simple reply; ``read_len`` maps read cookies to
    their lengths."""
    magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == 0x67446698
    n = (read_len or {}).get(cookie, 0)
    return cookie, err, recv_exact(s, n) if n and not err else b""


@pytest.fixture
def served(tmp_path):
    """(server, operations, socket path) with a 1 MiB VDisk FOO; runs inside trio tests."""
    pool = Pool(new_pool(tmp_path, 4096, 4))
    ops = Operations(pool)
    pool.create("FOO", 1 << 20)
    sock = str(tmp_path / "nbd.sock")
    srv = NbdServer(ops, NbdConfig((Endpoint("unix", path=sock),)))
    srv.bind()
    yield srv, ops, sock
    pool.close(commit=False)


async def client(sock: str, name: bytes = b"FOO") -> socket.socket:
    s = await trio.to_thread.run_sync(raw_client, sock)
    await trio.to_thread.run_sync(go, s, name)
    return s


async def test_replies_go_ahead_of_a_flush_that_waits(served):
    srv, ops, sock = served
    async with trio.open_nursery() as n:
        n.start_soon(srv.run)
        s = await client(sock)
        try:
            async with ops.syncer._lock:        # the group commit is busy
                s.sendall(req(WRITE, 0, 4096, 1, FUA, b"a" * 4096) + req(FLUSH, 0, 0, 2)
                          + req(WRITE, 4096, 4096, 3, 0, b"b" * 4096) + req(READ, 0, 8192, 4))
                first = [await trio.to_thread.run_sync(reply, s, {4: 8192}) for _ in (3, 4)]
                # The plain write and the read are answered while the FUA write and the
                # flush wait; the read sees both writes.
                assert [(c, e) for c, e, _ in first] == [(3, 0), (4, 0)]
                assert first[1][2] == b"a" * 4096 + b"b" * 4096
                s.settimeout(0.3)
                with pytest.raises(socket.timeout):   # not durable yet: no reply
                    s.recv(1)
                s.settimeout(10)
            rest = {(await trio.to_thread.run_sync(reply, s))[:2] for _ in range(2)}
            assert rest == {(1, 0), (2, 0)}
            assert ops.syncer._done >= 1, "answered only after a commit"
        finally:
            s.close()
        n.cancel_scope.cancel()


async def test_durability_waits_are_bounded_per_connection(served):
    srv, ops, sock = served
    srv.max_pending = 2
    async with trio.open_nursery() as n:
        n.start_soon(srv.run)
        s = await client(sock)
        try:
            async with ops.syncer._lock:
                s.sendall(req(FLUSH, 0, 0, 1) + req(FLUSH, 0, 0, 2) + req(FLUSH, 0, 0, 3)
                          + req(READ, 0, 512, 4))
                # Two flushes wait; the third is read and waits for a slot, so the read
                # behind it is not served yet.
                s.settimeout(0.3)
                with pytest.raises(socket.timeout):
                    s.recv(1)
                s.settimeout(10)
            got = {(await trio.to_thread.run_sync(reply, s, {4: 512}))[0] for _ in range(4)}
            assert got == {1, 2, 3, 4}
        finally:
            s.close()
        n.cancel_scope.cancel()


async def test_buffered_bytes_are_bounded_and_a_stalled_payload_is_cut_off(served):
    srv, ops, sock = served
    srv.budget.total = srv.budget.free = 64 << 10
    srv.stall_timeout = 1.0
    async with trio.open_nursery() as n:
        n.start_soon(srv.run)
        a, b = await client(sock), await client(sock)
        try:
            # A's 64 KiB write holds the whole budget while its payload trickles in...
            a.sendall(req(WRITE, 0, 64 << 10, 1) + b"x" * 100)
            await trio.sleep(0.1)
            b.sendall(req(READ, 0, 4096, 2))
            b.settimeout(0.3)
            with pytest.raises(socket.timeout):    # ...so B's read waits for room
                b.recv(1)
            b.settimeout(10)
            # Past the payload timeout A is cut off, its bytes given back, B answered.
            assert (await trio.to_thread.run_sync(reply, b, {2: 4096}))[:2] == (2, 0)
            a.settimeout(10)
            assert await trio.to_thread.run_sync(a.recv, 1) == b""
            assert srv.budget.free == srv.budget.total
            assert bytes(ops.pool.read(ops.pool.lookup("FOO"), 0, 100)) == bytes(100)
        finally:
            a.close()
            b.close()
        n.cancel_scope.cancel()


async def test_a_disconnect_answers_what_is_in_flight_first(served):
    """NBD_CMD_DISC: the server answers the requests before it, then closes (proto.md)."""
    srv, ops, sock = served
    async with trio.open_nursery() as n:
        n.start_soon(srv.run)
        s = await client(sock)
        try:
            async with ops.syncer._lock:
                s.sendall(req(WRITE, 0, 512, 1, FUA, b"z" * 512) + req(2, 0, 0, 9))
                await trio.sleep(0.1)
            assert (await trio.to_thread.run_sync(reply, s))[:2] == (1, 0)
            assert await trio.to_thread.run_sync(s.recv, 1) == b""
        finally:
            s.close()
        n.cancel_scope.cancel()
    assert not srv.exports and srv.clients == 0


async def test_clients_that_never_read_their_replies_are_cut_off(served):
    """Two clients ask for 1 MiB each and never read: their replies hold the whole
    budget, so a third client's read waits, until the stall watchdog cuts them off."""
    srv, ops, sock = served
    srv.budget.total = srv.budget.free = 2 << 20
    srv.stall_timeout = 1.0
    async with trio.open_nursery() as n:
        n.start_soon(srv.run)
        hogs = [await client(sock) for _ in range(2)]
        other = await client(sock)
        try:
            async with ops.syncer._lock:   # hog 0's FUA write waits for durability
                hogs[0].sendall(req(WRITE, 0, 512, 100, FUA, b"f" * 512))
                for i, h in enumerate(hogs):
                    h.sendall(req(READ, 0, 1 << 20, i))
                await trio.sleep(0.2)
                other.sendall(req(READ, 0, 4096, 7))
                got = await trio.to_thread.run_sync(reply, other, {7: 4096})
                assert got[:2] == (7, 0) and got[2][:512] == b"f" * 512
                with trio.fail_after(30):        # both readers cut off, their bytes back
                    while srv.budget.free < srv.budget.total:
                        await trio.sleep(0.05)
            # Hog 0's FUA write is durable now, within the grace its connection gives
            # what is in flight, and hog 0 reads again: the FUA reply must not follow
            # the read reply cut short (it would be taken for that reply's data).
            for h in hogs:                       # cut off: what they had is dropped
                h.settimeout(10)
                data = b""
                while chunk := await trio.to_thread.run_sync(h.recv, 1 << 20):
                    data += chunk
                assert len(data) < 16 + (1 << 20), "a hog got its whole reply"
                assert b"\x67\x44\x66\x98" not in data[16:], "a reply after a cut one"
            assert srv.budget.free == srv.budget.total
        finally:
            for s in hogs + [other]:
                s.close()
        n.cancel_scope.cancel()
