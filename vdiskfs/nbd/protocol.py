"""The NBD wire protocol (the NBD project's doc/proto.md): constants and framing only.

Fixed newstyle negotiation, then transmission with simple replies. All integers are big
endian. Nothing here does I/O or knows about VDisks (server.py does).
"""

from __future__ import annotations

import struct

# ---------------------------------------------------------------- negotiation
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
REPLY_MAGIC = 0x0003E889045565A9       # option replies

FLAG_FIXED_NEWSTYLE = 1 << 0           # handshake flags (server)
FLAG_NO_ZEROES = 1 << 1
C_FLAG_FIXED_NEWSTYLE = 1 << 0         # client flags
C_FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR + 1
REP_ERR_POLICY = REP_ERR + 2
REP_ERR_INVALID = REP_ERR + 3
REP_ERR_PLATFORM = REP_ERR + 4
REP_ERR_TLS_REQD = REP_ERR + 5
REP_ERR_UNKNOWN = REP_ERR + 6
REP_ERR_SHUTDOWN = REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8
REP_ERR_TOO_BIG = REP_ERR + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags (per export)
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_CAN_MULTI_CONN = 1 << 8

# ---------------------------------------------------------------- transmission
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAGS_KNOWN = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_REQ_ONE

STRUCTURED_REPLY_MAGIC = 0x668E33EF
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# errors in replies (proto.md: these values on the wire whatever the host's errno)
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108

HANDSHAKE = struct.Struct(">QQH")       # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")          # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")   # REPLY_MAGIC, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")      # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")    # magic, error, cookie
STRUCTURED = struct.Struct(">IHHQI")    # magic, flags, type, cookie, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags

MAX_OPTION_DATA = 64 << 10              # an option's data we accept (names are <= 4096)
MAX_OPTIONS = 1024                      # options per negotiation before we give up


def handshake() -> bytes:
    return HANDSHAKE.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REPLY_MAGIC, option, reply, len(data)) + data


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def info_name(name: str) -> bytes:
    return struct.pack(">H", INFO_NAME) + name.encode()


def simple_reply(error: int, cookie: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def structured(cookie: int, rtype: int, payload: bytes, done: bool = True) -> bytes:
    return STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, rtype,
                           cookie, len(payload)) + payload


def structured_error(cookie: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:4096]
    return structured(cookie, REPLY_TYPE_ERROR, struct.pack(">IH", error, len(msg)) + msg)


def parse_meta_query(data: bytes) -> tuple[str, list[str]]:
    """NBD_OPT_LIST/SET_META_CONTEXT data: u32 name length, name, u32 count, queries."""
    if len(data) < 8:
        raise ValueError("short")
    (n,) = struct.unpack_from(">I", data, 0)
    if 4 + n + 4 > len(data):
        raise ValueError("name past the end")
    name = data[4:4 + n].decode("utf-8")
    (count,) = struct.unpack_from(">I", data, 4 + n)
    pos, queries = 8 + n, []
    for _ in range(count):
        if pos + 4 > len(data):
            raise ValueError("query past the end")
        (q,) = struct.unpack_from(">I", data, pos)
        if pos + 4 + q > len(data):
            raise ValueError("query past the end")
        queries.append(data[pos + 4:pos + 4 + q].decode("utf-8"))
        pos += 4 + q
    if pos != len(data):
        raise ValueError("bad length")
    return name, queries


class ProtocolError(Exception):
    """The peer broke the protocol: the connection is closed (proto.md allows it)."""


def parse_go(data: bytes) -> tuple[str, list[int]]:
    """NBD_OPT_INFO/GO data: u32 name length, name, u16 count, u16 info requests."""
    if len(data) < 6:
        raise ValueError("short")
    (n,) = struct.unpack_from(">I", data, 0)
    if 4 + n + 2 > len(data):
        raise ValueError("name past the end")
    name = data[4:4 + n].decode("utf-8")
    (count,) = struct.unpack_from(">H", data, 4 + n)
    if len(data) != 4 + n + 2 + 2 * count:
        raise ValueError("bad length")
    reqs = list(struct.unpack_from(f">{count}H", data, 4 + n + 2))
    return name, reqs
