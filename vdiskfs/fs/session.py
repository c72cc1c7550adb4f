"""The one module that reads or writes libfuse's ``struct fuse_session`` and pyfuse3's
internals; every other module goes through it.

pyfuse3 keeps its session in a module-static C variable and its operation table in
another; neither is exported, so both are found in the extension's ELF symbol table and
located through /proc/self/maps. The struct layouts below were read from libfuse's
sources at the tags named in ``KNOWN_LIBFUSE`` (lib/fuse_i.h, include/fuse_lowlevel.h);
every access first checks what it can (the fd field against fuse_session_fd(), the ops
copy against pyfuse3's own table, the slots to fill being empty) and raises
``Unsupported`` instead of touching memory that does not look as expected.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct

import pyfuse3

SESSION_SYMBOL = b"__pyx_v_7pyfuse3_session"
FUSE_OPS_SYMBOL = b"__pyx_v_7pyfuse3_fuse_ops"
# fuse_version()s whose layout below was read from source: 3.14.0 and 3.14.1 (both 314)
# have the same lib/fuse_i.h and struct fuse_lowlevel_ops.
KNOWN_LIBFUSE = (314,)

# struct fuse_session (libfuse 3.14 lib/fuse_i.h): char *mountpoint; volatile int exited;
# int fd; struct fuse_custom_io *io; struct mount_opts *mo; int debug; int deny_others;
# struct fuse_lowlevel_ops op; ...
FD_OFFSET, IO_OFFSET, OP_OFFSET = 12, 16, 40
# struct fuse_lowlevel_ops (include/fuse_lowlevel.h, 3.14), in order: one pointer each.
OP_NAMES = (
    "init", "destroy", "lookup", "forget", "getattr", "setattr", "readlink", "mknod",
    "mkdir", "unlink", "rmdir", "symlink", "rename", "link", "open", "read", "write",
    "flush", "release", "fsync", "opendir", "readdir", "releasedir", "fsyncdir", "statfs",
    "setxattr", "getxattr", "listxattr", "removexattr", "access", "create", "getlk",
    "setlk", "bmap", "ioctl", "poll", "write_buf", "retrieve_reply", "forget_multi",
    "flock", "fallocate", "readdirplus", "copy_file_range", "lseek")
OPS_SIZE = len(OP_NAMES) * 8
OP_SLOTS = {name: i * 8 for i, name in enumerate(OP_NAMES)}
# The ops pyfuse3 fills (init_fuse_ops() in its internal.pxi): the table's non-NULL slots
# must be exactly these, which pins the layout pyfuse3 was compiled with to OP_NAMES.
PYFUSE3_OPS = {"3.5.0": frozenset(OP_NAMES) - {
    "destroy", "readdir", "getlk", "setlk", "bmap", "ioctl", "retrieve_reply", "flock",
    "fallocate", "copy_file_range", "lseek"}}


class Unsupported(Exception):
    """An assumption about libfuse or pyfuse3 does not hold here: change nothing."""


# ------------------------------------------------------------ libfuse's public ABI
class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


WRITEV = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_int, ctypes.POINTER(IoVec),
                          ctypes.c_int, ctypes.c_void_p, use_errno=True)
READ = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t,
                        ctypes.c_void_p, use_errno=True)


class CustomIo(ctypes.Structure):   # struct fuse_custom_io (libfuse >= 3.14)
    _fields_ = [("writev", WRITEV), ("read", READ),
                ("splice_receive", ctypes.c_void_p), ("splice_send", ctypes.c_void_p)]


@functools.cache
def libfuse() -> ctypes.CDLL:
    """libfuse3, if it is a version whose layout was checked (else Unsupported)."""
    fuse = ctypes.CDLL("libfuse3.so.3")
    version = fuse.fuse_version()
    if version not in KNOWN_LIBFUSE:
        raise Unsupported(f"libfuse {version // 100}.{version % 100} is not one this "
                          "was checked against")
    fuse.fuse_session_fd.argtypes = [ctypes.c_void_p]
    fuse.fuse_session_custom_io.argtypes = [ctypes.c_void_p, ctypes.POINTER(CustomIo),
                                            ctypes.c_int]
    fuse.fuse_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
    fuse.fuse_reply_err.restype = ctypes.c_int
    fuse.fuse_reply_lseek.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    fuse.fuse_reply_lseek.restype = ctypes.c_int
    fuse.fuse_lowlevel_notify_inval_inode.argtypes = [ctypes.c_void_p, ctypes.c_uint64,
                                                      ctypes.c_int64, ctypes.c_int64]
    fuse.fuse_lowlevel_notify_inval_inode.restype = ctypes.c_int
    return fuse


# ------------------------------------------------------------ pyfuse3's statics
@functools.cache
def _symbol(path: str, name: bytes) -> tuple[int, int]:
    """(st_value, st_size) of a (local) symbol in an ELF64 little-endian shared object's
    .symtab."""
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
            st_name, _, _, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", elf,
                                                                            pos)
            end = elf.index(b"\0", stroff + st_name)
            if elf[stroff + st_name:end] == name and st_shndx:
                return st_value, st_size
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


def _pyfuse3_static(name: bytes) -> tuple[int, int]:
    """(address, size) of one of pyfuse3's module-static C variables in this process."""
    so = pyfuse3.__file__
    value, size = _symbol(so, name)
    return _load_base(so) + value, size


# ------------------------------------------------------------ the op table
def check_ops(ops_addr: int, static_addr: int, filled: frozenset[str],
              slots: list[int]) -> None:
    """Unsupported unless the OPS_SIZE bytes at ``ops_addr`` (libfuse's copy, se->op) are
    pyfuse3's table at ``static_addr`` byte for byte, the ops set in that table are
    exactly ``filled``, and every slot offset in ``slots`` is NULL: then se->op is where
    we think, laid out as OP_NAMES, and nobody else uses those slots."""
    copy = ctypes.string_at(ops_addr, OPS_SIZE)
    static = ctypes.string_at(static_addr, OPS_SIZE)
    if copy != static:
        raise Unsupported("libfuse's se->op is not a copy of pyfuse3's operation table")
    set_ops = {name for name, at in OP_SLOTS.items() if static[at:at + 8] != bytes(8)}
    if set_ops != filled:
        raise Unsupported("pyfuse3's operation table does not set the expected ops "
                          f"(unexpected: {sorted(set_ops ^ filled)})")
    for at in slots:
        if at not in OP_SLOTS.values():
            raise Unsupported(f"slot offset {at} is not a pointer in the table")
        if copy[at:at + 8] != bytes(8):
            raise Unsupported(f"the op at +{at} is already set")


def fill_ops(ops_addr: int, static_addr: int, filled: frozenset[str],
             ops: dict[int, int]) -> None:
    """Check (``check_ops``), then write each function pointer at its slot offset."""
    check_ops(ops_addr, static_addr, filled, list(ops))
    for at, fn in ops.items():
        ctypes.c_void_p.from_address(ops_addr + at).value = fn


# ------------------------------------------------------------ the live session
class Session:
    """pyfuse3's live ``struct fuse_session``; constructing it checks what it can."""

    def __init__(self):
        self.fuse = libfuse()
        addr, _ = _pyfuse3_static(SESSION_SYMBOL)
        se = ctypes.c_void_p.from_address(addr).value
        if not se:
            raise Unsupported("pyfuse3 has no session (not mounted?)")
        fd = self.fuse.fuse_session_fd(se)
        if fd < 0 or os.readlink(f"/proc/self/fd/{fd}") != "/dev/fuse":
            raise Unsupported(f"session fd {fd} is not /dev/fuse")
        if ctypes.c_int.from_address(se + FD_OFFSET).value != fd:
            raise Unsupported("struct fuse_session is not laid out as expected")
        self.se, self.fd = se, fd

    # se->io, for fs/killpriv.py
    def io(self) -> int | None:
        return ctypes.c_void_p.from_address(self.se + IO_OFFSET).value

    def custom_io(self, io: CustomIo) -> None:
        """Route the session's I/O through ``io`` (libfuse copies it); only from
        libfuse's own I/O (se->io NULL)."""
        if self.io():
            raise Unsupported("the session already has custom I/O")
        rc = self.fuse.fuse_session_custom_io(self.se, ctypes.byref(io), self.fd)
        if rc != 0:
            raise Unsupported(f"fuse_session_custom_io: {os.strerror(-rc)}")

    def custom_writev(self) -> int | None:
        """The writev callback of libfuse's copy of the custom I/O, None without one."""
        io = self.io()
        if not io:
            return None
        return ctypes.cast(CustomIo.from_address(io).writev, ctypes.c_void_p).value

    def clear_io(self) -> None:
        """Back to libfuse's own read/writev (se->io = NULL)."""
        ctypes.c_void_p.from_address(self.se + IO_OFFSET).value = None

    def invalidate_range(self, ino: int, off: int, length: int) -> None:
        """Make the kernel write back its dirty pages of ``ino`` in [off, off + length)
        (length 0: to the end) and drop its cached ones there: pyfuse3.invalidate_inode
        with a range, which pyfuse3 does not offer. Blocks until done, on requests this
        session must serve: call it from a worker thread (ctypes releases the GIL)."""
        rc = self.fuse.fuse_lowlevel_notify_inval_inode(self.se, ino, off, length)
        if rc not in (0, -errno.ENOENT):       # ENOENT: the kernel has no such inode
            raise OSError(-rc, f"notify_inval_inode({ino}, {off}, {length}): "
                               f"{os.strerror(-rc)}")

    # se->op, for fs/extra_ops.py
    def add_ops(self, ops: dict[str, int]) -> None:
        """Install function pointers (name in OP_SLOTS -> address) into se->op, once
        pyfuse3's version and its table's size were checked too."""
        filled = PYFUSE3_OPS.get(pyfuse3.__version__)
        if filled is None:
            raise Unsupported(f"pyfuse3 {pyfuse3.__version__} is not one this was checked "
                              "against")
        static, size = _pyfuse3_static(FUSE_OPS_SYMBOL)
        if size != OPS_SIZE:
            raise Unsupported(f"pyfuse3's operation table is {size} bytes, not {OPS_SIZE}")
        fill_ops(self.se + OP_OFFSET, static, filled,
                 {OP_SLOTS[name]: fn for name, fn in ops.items()})
