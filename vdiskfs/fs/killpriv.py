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
The session pointer is pyfuse3's module-static ``session``, found in the extension's
symbol table. Each assumption is checked before anything is changed; if one fails the
mount goes on without the flag (a round trip more per write, nothing else) and the log
says why.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct

import pyfuse3

log = logging.getLogger(__name__)

FUSE_INIT = 26
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28      # fuse_kernel.h, protocol 7.33 (Linux 5.11)
IN_HEADER = struct.Struct("<IIQ")      # fuse_in_header: len, opcode, unique (+ ids, pid)
IN_HEADER_LEN = 40
OUT_HEADER = struct.Struct("<IiQ")     # fuse_out_header: len, error, unique
INIT_FLAGS_AT = 12                     # fuse_init_in/out: major, minor, max_readahead, flags
SESSION_SYMBOL = b"__pyx_v_7pyfuse3_session"
KNOWN_LIBFUSE = (314,)                 # fuse_version()s whose struct fuse_session was checked
FD_OFFSET, IO_OFFSET = 12, 16          # struct fuse_session: int fd; struct fuse_custom_io *io


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_WRITEV = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_int, ctypes.POINTER(_IoVec),
                           ctypes.c_int, ctypes.c_void_p, use_errno=True)
_READ = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t,
                         ctypes.c_void_p, use_errno=True)


class _CustomIo(ctypes.Structure):   # struct fuse_custom_io (libfuse >= 3.14)
    _fields_ = [("writev", _WRITEV), ("read", _READ),
                ("splice_receive", ctypes.c_void_p), ("splice_send", ctypes.c_void_p)]


class Unsupported(Exception):
    """An assumption does not hold here: mount without the flag."""


def _symbol_value(path: str, name: bytes) -> int:
    """st_value of a (local) symbol in an ELF64 little-endian shared object's .symtab."""
    with open(path, "rb") as f:
        elf = f.read()
    if elf[:6] != b"\x7fELF\x02\x01":
        raise Unsupported(f"{path}: not an ELF64 little-endian object")
    phoff, shoff = struct.unpack_from("<QQ", elf, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", elf, 0x36)
    loads = [struct.unpack_from("<IIQQ", elf, phoff + i * phentsize) for i in range(phnum)]
    first = next((ph for ph in loads if ph[0] == 1), None)      # PT_LOAD
    if first is None or first[2] != 0 or first[3] != 0:          # p_offset, p_vaddr
        raise Unsupported(f"{path}: first segment not at address 0")
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize)
                for i in range(shnum)]
    for sh in sections:
        if sh[1] != 2:                  # SHT_SYMTAB
            continue
        _, _, _, _, off, size, link, _, _, entsize = sh
        stroff = sections[link][4]
        for pos in range(off, off + size, entsize):
            st_name, _, _, st_shndx, st_value, _ = struct.unpack_from("<IBBHQQ", elf, pos)
            end = elf.index(b"\0", stroff + st_name)
            if elf[stroff + st_name:end] == name and st_shndx:
                return st_value
    raise Unsupported(f"{path}: no symbol {name.decode()} (stripped build?)")


def _load_base(path: str) -> int:
    """Where the object is mapped: the start of its mapping at file offset 0."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real and int(fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16)
    raise Unsupported(f"{path} is not mapped")


class _Negotiator:
    def __init__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        self.sys_read = libc.read
        self.sys_read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        self.sys_read.restype = ctypes.c_ssize_t
        self.sys_writev = libc.writev
        self.sys_writev.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_int]
        self.sys_writev.restype = ctypes.c_ssize_t
        self.fuse = ctypes.CDLL("libfuse3.so.3")
        version = self.fuse.fuse_version()
        if version not in KNOWN_LIBFUSE:
            raise Unsupported(f"libfuse {version // 100}.{version % 100} is not one this "
                              "was checked against")
        self.fuse.fuse_session_custom_io.argtypes = [ctypes.c_void_p, ctypes.POINTER(_CustomIo),
                                                     ctypes.c_int]
        self.fuse.fuse_session_fd.argtypes = [ctypes.c_void_p]
        # Kept referenced for the life of the process: libfuse holds their addresses.
        self.io = _CustomIo(_WRITEV(self._writev), _READ(self._read), None, None)
        self.io_slot = 0          # address of se->io
        self.init_unique = None   # the INIT request's id, once read
        self.offered = False
        self.result: str | None = None

    def install(self) -> None:
        so = pyfuse3.__file__
        addr = _load_base(so) + _symbol_value(so, SESSION_SYMBOL)
        se = ctypes.c_void_p.from_address(addr).value
        if not se:
            raise Unsupported("pyfuse3 has no session (not mounted?)")
        fd = self.fuse.fuse_session_fd(se)
        if fd < 0 or os.readlink(f"/proc/self/fd/{fd}") != "/dev/fuse":
            raise Unsupported(f"session fd {fd} is not /dev/fuse")
        # struct fuse_session (libfuse 3.14, lib/fuse_i.h) begins: char *mountpoint;
        # volatile int exited; int fd; struct fuse_custom_io *io. Check before touching.
        io_slot = ctypes.c_void_p.from_address(se + IO_OFFSET)
        if ctypes.c_int.from_address(se + FD_OFFSET).value != fd or io_slot.value:
            raise Unsupported("struct fuse_session is not laid out as expected")
        rc = self.fuse.fuse_session_custom_io(se, ctypes.byref(self.io), fd)
        if rc != 0:
            raise Unsupported(f"fuse_session_custom_io: {os.strerror(-rc)}")
        copy = _CustomIo.from_address(io_slot.value) if io_slot.value else None
        if copy is None or (ctypes.cast(copy.writev, ctypes.c_void_p).value
                            != ctypes.cast(self.io.writev, ctypes.c_void_p).value):
            # Cannot happen after the check above; if it did, the callbacks still pass
            # every request through: correct, only slower.
            log.warning("libfuse's se->io is not where expected: the session's I/O stays "
                        "on ctypes callbacks")
            return
        self.io_slot = se + IO_OFFSET

    def _detach(self) -> None:
        if self.io_slot:
            ctypes.c_void_p.from_address(self.io_slot).value = None
            self.io_slot = 0

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
