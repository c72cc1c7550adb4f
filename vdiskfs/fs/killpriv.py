"""Negotiate FUSE_HANDLE_KILLPRIV_V2, which pyfuse3 cannot ask for.

Why: before every write(2) the kernel asks, through file_remove_privs(), whether the file
carries a capability to drop: a GETXATTR("security.capability") round trip to this daemon,
since it serves xattrs. For 4 KiB O_DIRECT writes that doubles the requests; for buffered
writes it is the only request (the data stays in the writeback cache). When the server
takes over killing privileges (HANDLE_KILLPRIV_V2), the kernel sets SB_NOSEC, and after
an inode's first write it marks the inode S_NOSEC and stops asking.

What the server then owes: clearing setuid/setgid and security.capability on write,
truncate and chown. A VDisk has none of them: its mode never carries S_ISUID/S_ISGID
(refused on the way in, masked on the way out) and only user.vdisk.* xattrs exist.

How: pyfuse3 3.5 fills conn.want itself, and libfuse 3.14 has no capability bit for the
flag anyway, so the INIT reply is amended on its way to the kernel. After pyfuse3.init()
mounted and before its loop reads INIT, libfuse's public fuse_session_custom_io() routes
the session's I/O through two ctypes callbacks: the read callback notes whether the kernel
offered the flag, the writev callback adds it to the INIT reply, then puts the session
back on libfuse's own read/writev (se->io = NULL) so no later request pays for ctypes.
The session is pyfuse3's, reached through fs/session.py. Each assumption is checked
before anything is changed; if one fails the mount goes on without the flag (a round trip
more per write, nothing else) and the log says why.
"""

from __future__ import annotations

import ctypes
import logging
import struct

from . import session
from .session import READ, WRITEV, CustomIo, IoVec, Session, Unsupported

log = logging.getLogger(__name__)

FUSE_INIT = 26
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28      # fuse_kernel.h, protocol 7.33 (Linux 5.11)
IN_HEADER = struct.Struct("<IIQ")      # fuse_in_header: len, opcode, unique (+ ids, pid)
IN_HEADER_LEN = 40
OUT_HEADER = struct.Struct("<IiQ")     # fuse_out_header: len, error, unique
INIT_FLAGS_AT = 12                     # fuse_init_in/out: major, minor, max_readahead, flags


class _Negotiator:
    def __init__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        self.sys_read = libc.read
        self.sys_read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        self.sys_read.restype = ctypes.c_ssize_t
        self.sys_writev = libc.writev
        self.sys_writev.argtypes = [ctypes.c_int, ctypes.POINTER(IoVec), ctypes.c_int]
        self.sys_writev.restype = ctypes.c_ssize_t
        session.libfuse()            # the version check comes first
        # Kept referenced for the life of the process: libfuse holds their addresses.
        self.io = CustomIo(WRITEV(self._writev), READ(self._read), None, None)
        self.se: Session | None = None   # while the session's I/O is ours
        self.init_unique = None   # the INIT request's id, once read
        self.offered = False
        self.result: str | None = None

    def install(self) -> None:
        se = Session()
        se.custom_io(self.io)
        if se.custom_writev() != ctypes.cast(self.io.writev, ctypes.c_void_p).value:
            # Cannot happen after the checks above; if it did, the callbacks still pass
            # every request through: correct, only slower.
            log.warning("libfuse's se->io is not where expected: the session's I/O stays "
                        "on ctypes callbacks")
            return
        self.se = se

    def _detach(self) -> None:
        if self.se is not None:
            self.se.clear_io()
            self.se = None

    # The callbacks run inside libfuse: an exception must not escape (ctypes would return
    # 0 for the call), so the inspection is guarded and the system call always made.
    def _read(self, fd, buf, size, _userdata):
        n = self.sys_read(fd, buf, size)
        if self.init_unique is None and n >= IN_HEADER_LEN + INIT_FLAGS_AT + 4:
            try:
                _, opcode, unique = IN_HEADER.unpack(ctypes.string_at(buf, IN_HEADER.size))
                if opcode == FUSE_INIT:
                    self.init_unique = unique
                    flags = ctypes.c_uint32.from_address(buf + IN_HEADER_LEN + INIT_FLAGS_AT)
                    self.offered = bool(flags.value & FUSE_HANDLE_KILLPRIV_V2)
            except Exception:
                log.exception("reading the INIT request")
        return n

    def _writev(self, fd, iov, count, _userdata):
        try:
            self._amend_init_reply(iov, count)
        except Exception:
            log.exception("amending the INIT reply")
            self.result = self.result or "failed (see the log)"
        n = self.sys_writev(fd, iov, count)
        if self.result is not None:
            self._detach()
        return n

    def _amend_init_reply(self, iov, count) -> None:
        if self.result is not None or count < 1 or iov[0].len < OUT_HEADER.size:
            return
        _, error, unique = OUT_HEADER.unpack(ctypes.string_at(iov[0].base, OUT_HEADER.size))
        if unique != self.init_unique:
            return
        if error or count < 2 or iov[1].len < INIT_FLAGS_AT + 4:
            self.result = "INIT failed"
        elif not self.offered:
            self.result = "the kernel does not offer it"
        else:
            flags = ctypes.c_uint32.from_address(iov[1].base + INIT_FLAGS_AT)
            flags.value |= FUSE_HANDLE_KILLPRIV_V2
            self.result = "negotiated"


_negotiator: _Negotiator | None = None


def install() -> bool:
    """Call between pyfuse3.init() and pyfuse3.main(). False: not installed (logged)."""
    global _negotiator
    try:
        n = _Negotiator()
        n.install()
    except (Unsupported, OSError, ValueError, AttributeError) as e:
        log.warning("HANDLE_KILLPRIV_V2 not requested (%s): every write(2) will cost a "
                    "GETXATTR round trip", e)
        return False
    _negotiator = n
    return True


def outcome() -> str | None:
    """After INIT: "negotiated", or why not; None before INIT or when not installed."""
    return _negotiator.result if _negotiator else None
