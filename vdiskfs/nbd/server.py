"""An NBD server in the daemon: every completed VDisk is an export named after it.

Runs on the daemon's trio loop beside the FUSE handlers and calls the same engine, so an
NBD request is ordered with every other change exactly as a FUSE request is. Per
connection: the fixed newstyle handshake (NO_ZEROES; options EXPORT_NAME, ABORT, LIST,
INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT for base:allocation;
STARTTLS and the others are refused with NBD_REP_ERR_UNSUP), then transmission: requests
applied in the order sent, FLUSH and FUA answered once durable while the requests after
them are served (replies out of order); with structured replies, BLOCK_STATUS reports the
allocation map so that clients (nbdcopy, qemu-img convert) skip holes.

Semantics (docs/NBD.md):
- A VDisk whose clone has not completed is not exported (NBD_REP_ERR_POLICY, as open()
  gives EBUSY); an exported VDisk is open, so it cannot be deleted, replaced or have its
  lba_size changed, and ``vdiskfs umount`` refuses while a client is connected.
- FLUSH and FUA mean durable as fsync does (the Syncer's group commit). A flush covers the
  writes every connection had replied to before it arrived (CAN_MULTI_CONN): each write
  is applied to the engine before its reply.
- Coherence with the FUSE file: before a read, the kernel's dirty pages of the range are
  written back; after a write, TRIM or WRITE_ZEROES the kernel's cached pages of the range
  are dropped (only for a VDisk the kernel knows).
- TRIM and WRITE_ZEROES free the chunks of the range as punch-hole does; a thin VDisk
  never stores zeros, so NO_HOLE is honoured as far as the protocol requires (reads of the
  range return zeros).
- TLS (``--nbd-tls-*``): STARTTLS is required before anything else when configured.
- Bad input closes the connection (a bad magic, an oversized option or write) or gets an
  error reply (EINVAL for unknown commands or flags, out-of-range reads; ENOSPC for
  writes past the end; EPERM on read-only exports). Nothing past an export's end is read
  or written. At most ``MAX_CLIENTS`` connections, ``MAX_REQUEST`` bytes per request,
  ``MAX_PENDING`` durability waits per connection and ``MAX_BUFFERED`` bytes of payloads
  and replies held over all connections; a write's payload or a reply that stalls for
  ``STALL_TIMEOUT`` costs the connection.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as pysocket
import ssl
import stat
import time
from dataclasses import dataclass
from typing import Any

import trio

from ..cow.errors import VDiskError
from . import protocol as p
from .config import NbdConfig, is_loopback

log = logging.getLogger(__name__)

MAX_CLIENTS = 64
MAX_PENDING = 64                       # requests waiting for durability, per connection
MAX_BUFFERED = 256 << 20               # payloads and read replies held, all connections
STALL_TIMEOUT = 60.0                   # seconds a payload or a reply may stall
CLOSE_GRACE = 5.0                      # seconds to answer what is in flight at a close
WRITES = (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
MAX_REQUEST = 32 << 20                 # bytes per READ/WRITE (NBD_INFO_BLOCK_SIZE maximum)
PREFERRED_BLOCK = 4096
MAX_EXTENTS = 1 << 16                  # descriptors per BLOCK_STATUS reply
HANDSHAKE_TIMEOUT = 30.0               # seconds a client may take to negotiate
PUNCH = 0x02 | 0x01                    # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ERRNO_ON_WIRE = {errno.EPERM: p.EPERM, errno.EIO: p.EIO, errno.ENOMEM: p.ENOMEM,
                 errno.EINVAL: p.EINVAL, errno.ENOSPC: p.ENOSPC, errno.EDQUOT: p.ENOSPC,
                 errno.EFBIG: p.ENOSPC, errno.EOVERFLOW: p.EOVERFLOW,
                 errno.EOPNOTSUPP: p.ENOTSUP, errno.ESHUTDOWN: p.ESHUTDOWN}


def tls_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """The server's TLS: its certificate and key; with ``ca``, clients must present a
    certificate that CA signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass
class Conn:
    """What one connection negotiated."""
    structured: bool = False       # NBD_OPT_STRUCTURED_REPLY
    allocation: bool = False       # base:allocation selected (BLOCK_STATUS allowed)
    meta_export: str | None = None  # the export SET_META_CONTEXT was for
    readonly: bool = False         # the export was offered read-only


ALLOCATION_ID = 1                  # the context id of base:allocation


class Closed(Exception):
    """The peer went away (or must be cut off)."""


async def recv_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(min(n - len(buf), 1 << 20))
        if not chunk:
            raise Closed("end of stream")
        buf += chunk
    return bytes(buf)


def _within(vd, end: int, call, args) -> None:
    """``call(*args)`` if the request still ends within the VDisk: checked after every
    wait (the file may have shrunk meanwhile), so an NBD write never grows a VDisk."""
    if end > vd.size:
        raise VDiskError(errno.ENOSPC, "past the end of the VDisk")
    call(*args)


class Replies:
    """One connection's replies: whole, one at a time (tasks answer out of order)."""

    def __init__(self, stream: trio.abc.Stream, conn: Conn, stall: Stall):
        self.stream = stream
        self.conn = conn
        self.stall = stall
        self._busy = False         # a plain flag and a lot: cheaper than trio.Lock per reply
        self.cut = False           # a reply was cut short: nothing more may follow it
        self._lot = trio.lowlevel.ParkingLot()

    def reply(self, cookie: int, ctype: int, off: int, error: int, data: bytes) -> bytes:
        if not self.conn.structured:
            return p.simple_reply(error, cookie) + data
        if error:
            return p.structured_error(cookie, error)
        if ctype == p.CMD_READ:
            return p.structured(cookie, p.REPLY_TYPE_OFFSET_DATA,
                                off.to_bytes(8, "big") + data)
        return p.structured(cookie, p.REPLY_TYPE_NONE, b"")

    async def send(self, data: bytes) -> None:
        while self._busy:          # another task's reply is half sent
            await self._lot.park()
        if self.cut:
            raise trio.ClosedResourceError("a reply was cut short on this connection")
        self._busy = True
        self.stall.sending = time.monotonic()
        sent = False
        try:
            await self.stream.send_all(data)
            sent = True
        finally:
            if not sent:
                # Cancelled or failed midway: the stream ends inside a reply, and any
                # bytes after it would be taken for the rest of that reply's data.
                self.cut = True
            self.stall.sending = 0.0
            self._busy = False
            if self._lot:
                self._lot.unpark()


@dataclass
class Stall:
    """When (time.monotonic()) what a connection waits for on its peer began: a write's
    payload arriving, a reply leaving. 0: not waiting."""
    receiving: float = 0.0
    sending: float = 0.0

    def since(self) -> float:
        return min(t for t in (self.receiving, self.sending, float("inf")) if t)


class ByteBudget:
    """Bytes of request payloads and read replies the server holds at once, over all
    connections: a client beyond it waits before its payload is read."""

    def __init__(self, total: int):
        self.total = self.free = total
        self._lot = trio.lowlevel.ParkingLot()

    def try_take(self, n: int) -> int:
        """``n`` at once if there is room (the usual case: no coroutine), else 0."""
        if n and self.free >= n:
            self.free -= n
            return n
        return 0

    async def take(self, n: int) -> int:
        n = min(n, self.total)
        while self.free < n:
            await self._lot.park()
        self.free -= n
        return n

    def give(self, n: int) -> None:
        if n:
            self.free += n
            if self._lot:
                self._lot.unpark_all()


class NbdServer:
    max_pending = MAX_PENDING          # per connection (instance attributes in tests)
    stall_timeout = STALL_TIMEOUT

    def __init__(self, ops: Any, config: NbdConfig):
        self.ops = ops                 # fs/operations.py's Operations: pool, syncer, caches
        self.pool = ops.pool
        self.config = config
        self.endpoints = config.endpoints
        # set: every export needs STARTTLS first (bad files fail here, before the mount)
        self.tls = tls_context(*config.tls) if config.tls else None
        self.budget = ByteBudget(MAX_BUFFERED)
        self.clients = 0
        self.exports: dict[int, int] = {}   # vid -> connections serving it

    # ------------------------------------------------------------ listening
    def bind(self) -> None:
        """Bind every endpoint now (before the mount reports ready), so that a taken
        address or a bad path fails the mount instead of a running daemon."""
        self.socks = []
        for ep in self.endpoints:
            if ep.kind == "tcp":
                if not is_loopback(ep.host) and self.tls is None:
                    log.warning("NBD on %s: not a loopback address, reachable from the "
                                "network without authentication", ep)
                fam = pysocket.AF_INET6 if ":" in ep.host else pysocket.AF_INET
                sock = pysocket.create_server((ep.host, ep.port), family=fam, backlog=16)
            else:
                try:   # a socket left by a crashed daemon; never anything else
                    if stat.S_ISSOCK(os.lstat(ep.path).st_mode):
                        os.unlink(ep.path)
                except FileNotFoundError:
                    pass
                sock = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
                old = os.umask(0o177)           # 0600: the mounting user only
                try:
                    sock.bind(ep.path)
                finally:
                    os.umask(old)
                sock.listen(16)
            self.socks.append(sock)
            log.info("NBD serving on %s", ep)

    async def run(self) -> None:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in self.socks]
        await trio.serve_listeners(self._serve, listeners)

    def unlink_sockets(self) -> None:
        for ep in self.endpoints:
            if ep.kind == "unix":
                try:
                    os.unlink(ep.path)
                except OSError:
                    pass

    # ------------------------------------------------------------ a connection
    async def _serve(self, stream: trio.abc.Stream) -> None:
        if self.clients >= MAX_CLIENTS:
            log.warning("NBD: refusing a connection, %d clients already", self.clients)
            await stream.aclose()
            return
        self.clients += 1
        try:
            box = [stream]         # STARTTLS replaces the stream
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
                export = await self._negotiate(box)
            stream = box[0]
            if scope.cancelled_caught:
                log.info("NBD: a client took too long to negotiate; closed")
                return
            if export is not None:
                await self._transmission(stream, *export)
        except (Closed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except ssl.SSLError as e:
            log.info("NBD: TLS failed with a client: %s", e)
        except p.ProtocolError as e:
            log.info("NBD: protocol error from a client, closed: %s", e)
        except Exception:      # a bug must cost this connection, never the mount
            log.exception("NBD: unexpected error; the connection is closed")
        finally:
            self.clients -= 1
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, ssl.SSLError, OSError):
                pass

    def _find(self, name: str):
        """(VDisk, None) for an export name, or (None, (reply, message))."""
        vd = self.pool.lookup(name)
        if vd is None:
            return None, (p.REP_ERR_UNKNOWN, f"no VDisk {name}")
        if self.pool.clones.unfinished(vd) or self.ops.jobs.settling(vd.vid):
            return None, (p.REP_ERR_POLICY, f"VDisk {name} is a clone that has not completed")
        return vd, None

    def _flags(self, conn: Conn) -> int:
        f = (p.TF_HAS_FLAGS | p.TF_SEND_FLUSH | p.TF_SEND_FUA | p.TF_CAN_MULTI_CONN)
        if conn.readonly:
            return f | p.TF_READ_ONLY
        return f | p.TF_SEND_TRIM | p.TF_SEND_WRITE_ZEROES

    async def _negotiate(self, box: list):
        stream = box[0]
        await stream.send_all(p.handshake())
        (cflags,) = p.CLIENT_FLAGS.unpack(await recv_exactly(stream, 4))
        if cflags & ~(p.C_FLAG_FIXED_NEWSTYLE | p.C_FLAG_NO_ZEROES):
            raise p.ProtocolError(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & p.C_FLAG_NO_ZEROES)
        conn = Conn()
        for _ in range(p.MAX_OPTIONS):
            magic, opt, length = p.OPTION.unpack(await recv_exactly(stream, p.OPTION.size))
            if magic != p.IHAVEOPT:
                raise p.ProtocolError("bad option magic")
            if length > p.MAX_OPTION_DATA:
                raise p.ProtocolError(f"option {opt} of {length} bytes")
            data = await recv_exactly(stream, length)
            if opt == p.OPT_STARTTLS:
                if self.tls is None or isinstance(stream, trio.SSLStream) or data:
                    reply = (p.REP_ERR_UNSUP if self.tls is None else p.REP_ERR_INVALID)
                    await stream.send_all(p.option_reply(opt, reply))
                    continue
                await stream.send_all(p.option_reply(opt, p.REP_ACK))
                stream = trio.SSLStream(stream, self.tls, server_side=True)
                await stream.do_handshake()
                box[0] = stream
                continue
            if self.tls is not None and not isinstance(stream, trio.SSLStream):
                if opt == p.OPT_EXPORT_NAME:
                    raise Closed("EXPORT_NAME without TLS")
                if opt == p.OPT_ABORT:
                    await stream.send_all(p.option_reply(opt, p.REP_ACK))
                    raise Closed("aborted")
                await stream.send_all(p.option_reply(opt, p.REP_ERR_TLS_REQD,
                                                     b"this server requires TLS"))
                continue
            if opt == p.OPT_EXPORT_NAME:
                vd, err = self._find(data.decode("utf-8", "replace"))
                if vd is None:
                    raise Closed(err[1])     # proto.md: no error reply to EXPORT_NAME
                self._select(conn, vd)
                await self._sent_holding(vd, stream, p.EXPORT_NAME_REPLY.pack(
                    vd.size, self._flags(conn)) + (b"" if no_zeroes else bytes(124)))
                return vd, conn
            if opt == p.OPT_ABORT:
                await stream.send_all(p.option_reply(opt, p.REP_ACK))
                raise Closed("aborted")
            if opt == p.OPT_LIST:
                if data:
                    await stream.send_all(p.option_reply(opt, p.REP_ERR_INVALID))
                    continue
                out = b""
                for vd in sorted(self.pool.vdisks(), key=lambda v: v.name):
                    if not self.pool.clones.unfinished(vd):
                        name = vd.name.encode()
                        out += p.option_reply(opt, p.REP_SERVER,
                                              len(name).to_bytes(4, "big") + name)
                await stream.send_all(out + p.option_reply(opt, p.REP_ACK))
                continue
            if opt in (p.OPT_INFO, p.OPT_GO):
                try:
                    name, reqs = p.parse_go(data)
                except (ValueError, UnicodeDecodeError):
                    await stream.send_all(p.option_reply(opt, p.REP_ERR_INVALID))
                    continue
                vd, err = self._find(name)
                if vd is None:
                    await stream.send_all(p.option_reply(opt, err[0], err[1].encode()))
                    continue
                # What the reply says is what is served: decided here, before any await
                # (a rename or delete may come while the reply is sent).
                chosen = self._select(Conn(**vars(conn)), vd)
                out = p.option_reply(opt, p.REP_INFO, p.info_export(vd.size,
                                                                    self._flags(chosen)))
                if p.INFO_BLOCK_SIZE in reqs:
                    out += p.option_reply(opt, p.REP_INFO, p.info_block_size(
                        vd.props["lba_size"], PREFERRED_BLOCK, MAX_REQUEST))
                if p.INFO_NAME in reqs:
                    out += p.option_reply(opt, p.REP_INFO, p.info_name(vd.name))
                out += p.option_reply(opt, p.REP_ACK)
                if opt == p.OPT_GO:
                    await self._sent_holding(vd, stream, out)
                    return vd, chosen
                await stream.send_all(out)
                continue
            if opt == p.OPT_STRUCTURED_REPLY:
                if data:
                    await stream.send_all(p.option_reply(opt, p.REP_ERR_INVALID))
                    continue
                conn.structured = True
                await stream.send_all(p.option_reply(opt, p.REP_ACK))
                continue
            if opt in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
                await stream.send_all(self._meta_context(opt, data, conn))
                continue
            await stream.send_all(p.option_reply(opt, p.REP_ERR_UNSUP))
        raise p.ProtocolError("too many options")

    def _meta_context(self, opt: int, data: bytes, conn: Conn) -> bytes:
        """base:allocation is the one context: holes (unmapped chunks) read as zeros."""
        setting = opt == p.OPT_SET_META_CONTEXT
        if setting and not conn.structured:
            return p.option_reply(opt, p.REP_ERR_INVALID, b"structured replies first")
        try:
            name, queries = p.parse_meta_query(data)
        except (ValueError, UnicodeDecodeError):
            return p.option_reply(opt, p.REP_ERR_INVALID)
        vd, err = self._find(name)
        if vd is None:
            return p.option_reply(opt, err[0], err[1].encode())
        if setting:
            wanted = p.BASE_ALLOCATION in queries
            conn.allocation, conn.meta_export = wanted, name
        else:
            wanted = not queries or any(q in ("base:", p.BASE_ALLOCATION) for q in queries)
        out = b""
        if wanted:
            out = p.option_reply(opt, p.REP_META_CONTEXT, ALLOCATION_ID.to_bytes(4, "big")
                                 + p.BASE_ALLOCATION.encode())
        return out + p.option_reply(opt, p.REP_ACK)

    def _select(self, conn: Conn, vd) -> Conn:
        """``conn`` as it will serve ``vd``: read-only or not by its name now (a rename
        later changes nothing for this connection)."""
        if conn.meta_export is not None and conn.meta_export != vd.name:
            conn.allocation = False     # chosen for another export: void (proto.md)
        conn.readonly = self.config.readonly_for(vd.name)
        return conn

    async def _sent_holding(self, vd, stream, reply: bytes) -> None:
        """Send the reply that starts transmission with ``vd`` already in use, so that no
        delete or replacing rename slips in while it is sent; released by _transmission
        (or here, if the reply cannot be sent)."""
        self.pool.opened(vd)
        self.exports[vd.vid] = self.exports.get(vd.vid, 0) + 1
        try:
            await stream.send_all(reply)
        except BaseException:
            self._release(vd)
            raise

    def _release(self, vd) -> None:
        self.exports[vd.vid] -= 1
        if not self.exports[vd.vid]:
            del self.exports[vd.vid]
        self.pool.released(vd)
        if vd.vid not in self.ops.lookups:
            self.pool.forget(vd)

    # ------------------------------------------------------------ transmission
    async def _transmission(self, stream, vd, conn: Conn) -> None:
        """Requests are applied to the engine in the order they arrive (it runs on this
        loop, ordered with the FUSE requests). A FLUSH, or a write with FUA, then waits
        for the group commit in a task of its own, so the requests after it are served
        and answered meanwhile: replies go out of order. Bounded: at most
        ``max_pending`` such waits per connection (then the next request waits to be
        read), one request's payload and one reply buffered per connection, and
        ``MAX_BUFFERED`` bytes of those over all connections."""
        # vd is in use since its GO (_sent_holding): no delete, replacing rename, lba_size
        log.info("NBD: serving %s to a client", vd.name)
        stall = Stall()
        out = Replies(stream, conn, stall)
        pending = trio.Semaphore(self.max_pending)
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as waits:
                reading = trio.CancelScope()
                watch = await waits.start(self._watch_stalls, reading, stall)
                try:
                    with reading:
                        await self._requests(stream, out, vd, conn, waits, pending, stall)
                    if reading.cancelled_caught:
                        log.warning("NBD: a client of %s left a payload or a reply stalled "
                                    "for over %g s: cut off", vd.name, self.stall_timeout)
                        raise Closed(f"the client left a payload or a reply stalled for "
                                     f"over {self.stall_timeout:g} s")
                except (Closed, p.ProtocolError, trio.BrokenResourceError,
                        trio.ClosedResourceError, ssl.SSLError) as e:
                    # Replies still waiting may yet reach a client that only shut
                    # its sending side; a client that reads nothing holds no slot.
                    failure = e
                    waits.cancel_scope.deadline = trio.current_time() + CLOSE_GRACE
                finally:
                    watch.cancel()
            # DISC: every request in flight has been answered (proto.md)
        finally:
            self._release(vd)
        if failure is not None:
            raise failure

    async def _requests(self, stream, out: "Replies", vd, conn: Conn, waits: trio.Nursery,
                        pending: trio.Semaphore, stall: "Stall") -> None:
        budget = self.budget
        while True:
            magic, cflags, ctype, cookie, off, length = p.REQUEST.unpack(
                await recv_exactly(stream, p.REQUEST.size))
            if magic != p.REQUEST_MAGIC:
                raise p.ProtocolError("bad request magic")
            if ctype == p.CMD_DISC:
                return
            buffered = 0
            if ctype in (p.CMD_WRITE, p.CMD_READ) and length <= MAX_REQUEST:
                buffered = budget.try_take(length) or await budget.take(length)
            try:
                payload = b""
                if ctype == p.CMD_WRITE:
                    if length > MAX_REQUEST:
                        raise p.ProtocolError(f"write of {length} bytes")
                    stall.receiving = time.monotonic()
                    payload = await recv_exactly(stream, length)
                    stall.receiving = 0.0
                if ctype == p.CMD_BLOCK_STATUS and conn.allocation:
                    await out.send(await self._block_status(vd, cookie, cflags, off, length))
                    continue
                error, data = await self._command(vd, conn, cflags, ctype, off, length,
                                                  payload)
                del payload
                durable = ctype == p.CMD_FLUSH or (
                    cflags & p.CMD_FLAG_FUA and ctype in WRITES)
                if error or not durable:
                    await out.send(out.reply(cookie, ctype, off, error, data))
                    continue
            finally:
                budget.give(buffered)
            await pending.acquire()
            waits.start_soon(self._reply_when_durable, out, pending, vd, cookie, ctype)

    async def _watch_stalls(self, reading: trio.CancelScope, stall: Stall,
                            task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Cut off a connection whose write payload stops arriving or whose replies stop
        being read (either holds buffer budget that other clients wait for). A watchdog
        per connection, not a deadline per request: that would cost every request."""
        with trio.CancelScope() as scope:
            task_status.started(scope)
            while True:
                await trio.sleep(self.stall_timeout / 4)
                if time.monotonic() - stall.since() > self.stall_timeout:
                    reading.cancel()
                    return

    async def _reply_when_durable(self, out: "Replies", pending: trio.Semaphore, vd,
                                  cookie: int, ctype: int) -> None:
        try:
            try:
                await self.ops.syncer.sync()
                error = 0
            except (VDiskError, OSError) as e:   # a fail-stop: nothing is acknowledged
                log.error("NBD flush on %s: %s", vd.name, e)
                error = ERRNO_ON_WIRE.get(e.errno, p.EIO)
            await out.send(out.reply(cookie, ctype, 0, error, b""))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass                  # the client went away; the reader sees it too
        finally:
            pending.release()

    async def _command(self, vd, conn: Conn, cflags, ctype, off, length,
                       payload) -> tuple[int, bytes]:
        """Apply one request; FLUSH and FUA leave the wait for durability to the caller."""
        if cflags & ~p.CMD_FLAGS_KNOWN:
            return p.EINVAL, b""
        end = off + length
        try:
            if ctype == p.CMD_READ:
                if length > MAX_REQUEST or end > vd.size:
                    return p.EINVAL, b""
                await self._coherent_read(vd, off, length)
                if end > vd.size:        # shrunk meanwhile (a truncate through the file)
                    return p.EINVAL, b""
                data = bytes(self.pool.read(vd, off, length))
                assert len(data) == length, "a read within the VDisk is whole"
                return 0, data
            if ctype == p.CMD_FLUSH:
                return 0, b""
            if ctype not in WRITES:
                return p.EINVAL, b""
            if conn.readonly:
                return p.EPERM, b""
            if end > vd.size:
                return p.ENOSPC, b""
            await self._coherent_read(vd, off, length)   # older dirty pages go first
            if ctype == p.CMD_WRITE:
                call, args = self.pool.write, (vd, off, payload)
            else:
                call, args = self.pool.fallocate, (vd, PUNCH, off, length)
            if length:
                try:
                    _within(vd, end, call, args)
                except OSError as e:     # ENOSPC with frees pending: commit them, retry once
                    await self.ops._retry_enospc(e, _within, vd, end, call, args)  # noqa: SLF001
            await self._dropped(vd, off, length)
            return 0, b""
        except VDiskError as e:
            return ERRNO_ON_WIRE.get(e.errno, p.EIO), b""
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.error("NBD request on %s (type %d, %d+%d): %s", vd.name, ctype, off,
                          length, e)
            return ERRNO_ON_WIRE.get(e.errno, p.EIO), b""

    async def _block_status(self, vd, cookie: int, cflags: int, off: int, length: int) -> bytes:
        """base:allocation extents of [off, off + length): mapped chunks are data, the
        rest holes that read as zeros (chunk granularity, as SEEK_DATA/SEEK_HOLE)."""
        end = off + length
        if cflags & ~p.CMD_FLAGS_KNOWN or not length or end > vd.size:
            return p.structured_error(cookie, p.EINVAL)
        await self._coherent_read(vd, off, length)   # dirty pages are data
        if end > vd.size:            # shrunk meanwhile
            return p.structured_error(cookie, p.EINVAL)
        extents, pos = [], off
        one = bool(cflags & p.CMD_FLAG_REQ_ONE)
        while pos < end and len(extents) < MAX_EXTENTS:
            hole = self.pool.seek(vd, pos, os.SEEK_HOLE)
            if hole > pos:
                nxt, flags = min(hole, end), 0
            else:
                try:
                    nxt = min(self.pool.seek(vd, pos, os.SEEK_DATA), end)
                except VDiskError:       # no data after pos
                    nxt = end
                flags = p.STATE_HOLE | p.STATE_ZERO
            extents.append((nxt - pos, flags))
            pos = nxt
            if one:
                break
        payload = ALLOCATION_ID.to_bytes(4, "big") + b"".join(
            n.to_bytes(4, "big") + f.to_bytes(4, "big") for n, f in extents)
        return p.structured(cookie, p.REPLY_TYPE_BLOCK_STATUS, payload)

    async def _coherent_read(self, vd, off: int, length: int) -> None:
        """Dirty pages the kernel holds for the FUSE file are newer than the engine's."""
        if length and self.pool.open_count.get(vd.vid, 0) > self.exports.get(vd.vid, 0):
            await self.ops._writeback(vd, off, length)    # noqa: SLF001

    async def _dropped(self, vd, off: int, length: int) -> None:
        """The kernel's cached pages of the range are stale now."""
        if length and vd.vid in self.ops.lookups:
            await self.ops._writeback(vd, off, length)    # noqa: SLF001
