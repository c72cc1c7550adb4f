"""An NBD server in the daemon: every completed VDisk is an export named after it.

Runs on the daemon's trio loop beside the FUSE handlers and calls the same engine, so an
NBD request is ordered with every other change exactly as a FUSE request is. Per
connection: the fixed newstyle handshake (NO_ZEROES; options EXPORT_NAME, ABORT, LIST,
INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT for base:allocation;
STARTTLS and the others are refused with NBD_REP_ERR_UNSUP), then transmission, one
request at a time in the order sent; with structured replies, BLOCK_STATUS reports the
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
  or written. At most ``MAX_CLIENTS`` connections and ``MAX_REQUEST`` bytes per request.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket as pysocket
import ssl
import stat
from dataclasses import dataclass
from typing import Any

import trio

from ..cow.errors import VDiskError
from . import protocol as p

log = logging.getLogger(__name__)

MAX_CLIENTS = 64
MAX_REQUEST = 32 << 20                 # bytes per READ/WRITE (NBD_INFO_BLOCK_SIZE maximum)
PREFERRED_BLOCK = 4096
MAX_EXTENTS = 1 << 16                  # descriptors per BLOCK_STATUS reply
HANDSHAKE_TIMEOUT = 30.0               # seconds a client may take to negotiate
PUNCH = 0x02 | 0x01                    # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ERRNO_ON_WIRE = {errno.EPERM: p.EPERM, errno.EIO: p.EIO, errno.ENOMEM: p.ENOMEM,
                 errno.EINVAL: p.EINVAL, errno.ENOSPC: p.ENOSPC, errno.EDQUOT: p.ENOSPC,
                 errno.EFBIG: p.ENOSPC, errno.EOVERFLOW: p.EOVERFLOW,
                 errno.EOPNOTSUPP: p.ENOTSUP, errno.ESHUTDOWN: p.ESHUTDOWN}


@dataclass(frozen=True)
class Endpoint:
    kind: str             # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (``tcp:[::1]:PORT`` for IPv6)."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return Endpoint("unix", path=os.path.abspath(rest))
    if kind == "tcp" and rest:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return Endpoint("tcp", host=host, port=int(port))
    raise ValueError(f"bad NBD endpoint {text!r}: use unix:PATH or tcp:HOST:PORT")


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


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class Conn:
    """What one connection negotiated."""
    structured: bool = False       # NBD_OPT_STRUCTURED_REPLY
    allocation: bool = False       # base:allocation selected (BLOCK_STATUS allowed)
    meta_export: str | None = None  # the export SET_META_CONTEXT was for


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


class NbdServer:
    def __init__(self, ops: Any, endpoints: list[Endpoint], readonly: bool = False,
                 tls: "ssl.SSLContext | None" = None):
        self.ops = ops                 # fs/operations.py's Operations: pool, syncer, caches
        self.pool = ops.pool
        self.endpoints = endpoints
        self.readonly = readonly
        self.tls = tls                 # set: every export needs STARTTLS first
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

    def _flags(self) -> int:
        f = (p.TF_HAS_FLAGS | p.TF_SEND_FLUSH | p.TF_SEND_FUA | p.TF_CAN_MULTI_CONN)
        if self.readonly:
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
                await stream.send_all(p.EXPORT_NAME_REPLY.pack(vd.size, self._flags())
                                      + (b"" if no_zeroes else bytes(124)))
                return vd, self._selected(conn, vd)
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
                out = p.option_reply(opt, p.REP_INFO, p.info_export(vd.size, self._flags()))
                if p.INFO_BLOCK_SIZE in reqs:
                    out += p.option_reply(opt, p.REP_INFO, p.info_block_size(
                        vd.props["lba_size"], PREFERRED_BLOCK, MAX_REQUEST))
                if p.INFO_NAME in reqs:
                    out += p.option_reply(opt, p.REP_INFO, p.info_name(vd.name))
                await stream.send_all(out + p.option_reply(opt, p.REP_ACK))
                if opt == p.OPT_GO:
                    return vd, self._selected(conn, vd)
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

    def _selected(self, conn: Conn, vd) -> Conn:
        if conn.meta_export is not None and conn.meta_export != vd.name:
            conn.allocation = False     # chosen for another export: void (proto.md)
        return conn

    # ------------------------------------------------------------ transmission
    async def _transmission(self, stream, vd, conn: Conn) -> None:
        pool = self.pool
        pool.opened(vd)           # in use: no delete, no replacing rename, no lba_size
        self.exports[vd.vid] = self.exports.get(vd.vid, 0) + 1
        log.info("NBD: serving %s to a client", vd.name)
        try:
            while True:
                magic, cflags, ctype, cookie, off, length = p.REQUEST.unpack(
                    await recv_exactly(stream, p.REQUEST.size))
                if magic != p.REQUEST_MAGIC:
                    raise p.ProtocolError("bad request magic")
                payload = b""
                if ctype == p.CMD_WRITE:
                    if length > MAX_REQUEST:
                        raise p.ProtocolError(f"write of {length} bytes")
                    payload = await recv_exactly(stream, length)
                if ctype == p.CMD_DISC:
                    return
                if ctype == p.CMD_BLOCK_STATUS and conn.allocation:
                    await stream.send_all(await self._block_status(vd, cookie, cflags, off,
                                                                   length))
                    continue
                error, data = await self._command(vd, cflags, ctype, off, length, payload)
                if not conn.structured:
                    await stream.send_all(p.simple_reply(error, cookie) + data)
                elif error:
                    await stream.send_all(p.structured_error(cookie, error))
                elif ctype == p.CMD_READ:
                    await stream.send_all(p.structured(cookie, p.REPLY_TYPE_OFFSET_DATA,
                                                       off.to_bytes(8, "big") + data))
                else:
                    await stream.send_all(p.structured(cookie, p.REPLY_TYPE_NONE, b""))
        finally:
            self.exports[vd.vid] -= 1
            if not self.exports[vd.vid]:
                del self.exports[vd.vid]
            pool.released(vd)
            if vd.vid not in self.ops.lookups:
                pool.forget(vd)

    async def _command(self, vd, cflags, ctype, off, length, payload) -> tuple[int, bytes]:
        if cflags & ~p.CMD_FLAGS_KNOWN:
            return p.EINVAL, b""
        end = off + length
        try:
            if ctype == p.CMD_READ:
                if length > MAX_REQUEST or end > vd.size:
                    return p.EINVAL, b""
                await self._coherent_read(vd, off, length)
                return 0, bytes(self.pool.read(vd, off, length))
            if ctype == p.CMD_FLUSH:
                await self.ops.syncer.sync()
                return 0, b""
            if ctype not in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
                return p.EINVAL, b""
            if self.readonly:
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
                    call(*args)
                except OSError as e:     # ENOSPC with frees pending: commit them, retry once
                    await self.ops._retry_enospc(e, call, *args)    # noqa: SLF001
            await self._dropped(vd, off, length)
            if cflags & p.CMD_FLAG_FUA:
                await self.ops.syncer.sync()
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
