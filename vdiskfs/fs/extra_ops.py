"""fallocate and lseek (SEEK_DATA/SEEK_HOLE), which pyfuse3 has no handlers for.

Why: without them libfuse answers ENOSYS, and after one ENOSYS the kernel stops sending
FALLOCATE for the whole mount (fallocate(2), punch hole, a loop device's discard and
write-zeroes then all fail EOPNOTSUPP) and answers SEEK_DATA/SEEK_HOLE itself (all data,
up to EOF).

How: libfuse dispatches requests from its copy of the op table in the session (se->op),
which nothing rewrites after fuse_session_new(); under pyfuse3 its fallocate and lseek
slots are NULL. Two ctypes callbacks go there (fs/session.py checks the layout first).
pyfuse3 runs fuse_session_process_buf() on the trio thread with the GIL held, so a
callback can start a trio task in the daemon's nursery; the task awaits the Operations
method and replies with fuse_reply_err() / fuse_reply_lseek(), which libfuse allows after
the op has returned (pyfuse3's own handlers do the same).

Rules: every request is answered exactly once: an exception escaping a ctypes callback is
printed and swallowed, and the request would never be answered. ENOSYS is never sent (it
would switch fallocate off for the mount): EOPNOTSUPP instead.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import threading
from typing import Any, Callable

import trio
from pyfuse3 import FUSEError

from . import session
from .session import Session, Unsupported

log = logging.getLogger(__name__)

# void (*fallocate)(fuse_req_t, fuse_ino_t, int mode, off_t offset, off_t length,
#                   struct fuse_file_info *);
# void (*lseek)(fuse_req_t, fuse_ino_t, off_t off, int whence, struct fuse_file_info *);
FALLOCATE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                             ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
LSEEK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64,
                         ctypes.c_int, ctypes.c_void_p)
OPS = ("fallocate", "lseek")        # the Operations methods called, by these names
MAX_ERRNO = 511                     # the kernel refuses a reply with error <= -512
MAX_OFFSET = (1 << 63) - 1


def wire_errno(err: Any) -> int:
    """The errno to send for a refusal: one the kernel accepts, never ENOSYS."""
    if not isinstance(err, int) or not 0 < err <= MAX_ERRNO:
        return errno.EIO
    return errno.EOPNOTSUPP if err == errno.ENOSYS else err


class ExtraOps:
    """The two callbacks and their tasks. ``reply_err(req, errno)`` and
    ``reply_lseek(req, off)`` are libfuse's (stand-ins in the unit tests)."""

    def __init__(self, ops: Any, reply_err: Callable, reply_lseek: Callable):
        self.ops = ops
        self.reply_err = reply_err
        self.reply_lseek = reply_lseek
        self.nursery: trio.Nursery | None = None
        self.thread: int | None = None
        # libfuse calls these addresses: kept referenced as long as this object (for the
        # life of the process once installed, see install()).
        self.c_fallocate = FALLOCATE(self._fallocate)
        self.c_lseek = LSEEK(self._lseek)

    def pointers(self) -> dict[str, int]:
        return {name: ctypes.cast(fn, ctypes.c_void_p).value
                for name, fn in (("fallocate", self.c_fallocate), ("lseek", self.c_lseek))}

    def bind(self, nursery: trio.Nursery) -> None:
        """Where request tasks run; call on the trio thread before the session loop."""
        self.nursery = nursery
        self.thread = threading.get_ident()

    # ---- ctypes callbacks: inside fuse_session_process_buf(), on the trio thread
    def _fallocate(self, req, ino, mode, off, length, _fi) -> None:
        self._start(req, "fallocate", self._done, ino, mode, off, length)

    def _lseek(self, req, ino, off, whence, _fi) -> None:
        self._start(req, "lseek", self._offset, ino, off, whence)

    def _start(self, req: int, name: str, reply_ok: Callable, *args: int) -> None:
        """Start the request's task, or answer EIO at once. Never raises."""
        try:
            log.debug("lowlevel %s%r", name, args)
            if self.nursery is None or threading.get_ident() != self.thread:
                raise RuntimeError("no nursery bound on this thread")
            self.nursery.start_soon(self._serve, req, name, reply_ok, args)
        except BaseException:   # escaping, it would be swallowed and req never answered
            log.exception("cannot start %s%r: EIO", name, args)
            self._answer(req, name, errno.EIO, None, reply_ok)

    # ---- the request's task
    async def _serve(self, req: int, name: str, reply_ok: Callable, args: tuple) -> None:
        """Await the handler, then answer exactly once (EINTR if cancelled: the mount is
        ending, and the session still exists until the loop is over)."""
        err, value = errno.EINTR, None
        try:
            err, value = await self._outcome(name, args)
        finally:
            self._answer(req, name, err, value, reply_ok)

    async def _outcome(self, name: str, args: tuple) -> tuple[int, Any]:
        try:
            return 0, await getattr(self.ops, name)(*args)
        except FUSEError as e:
            return wire_errno(e.errno), None
        except Exception:
            log.exception("unexpected error in %s%r", name, args)
            return errno.EIO, None

    def _answer(self, req: int, name: str, err: int, value: Any, reply_ok: Callable) -> None:
        try:
            if err:
                self.reply_err(req, err)
            else:
                reply_ok(req, value)
        except Exception:   # a reply with these checked arguments cannot raise; logged
            log.exception("replying to %s", name)

    def _done(self, req: int, _value: Any) -> None:
        self.reply_err(req, 0)        # fallocate's success is an error reply of 0

    def _offset(self, req: int, value: Any) -> None:
        if isinstance(value, int) and 0 <= value <= MAX_OFFSET:
            self.reply_lseek(req, value)
        else:
            log.error("lseek handler returned %r, not an offset: EIO", value)
            self.reply_err(req, errno.EIO)


_installed: list[ExtraOps] = []     # never dropped: libfuse may hold their addresses


def install(ops: Any) -> ExtraOps | None:
    """Between pyfuse3.init() and pyfuse3.main(): put fallocate and lseek into the
    session; then ``bind()`` the result to a nursery. None if not installed (logged)."""
    try:
        missing = [name for name in OPS if not callable(getattr(ops, name, None))]
        if missing:
            raise Unsupported(f"Operations has no {', '.join(missing)}()")
        fuse = session.libfuse()
        extra = ExtraOps(ops, fuse.fuse_reply_err, fuse.fuse_reply_lseek)
        live = Session()
        live.add_ops(extra.pointers())
        ops.invalidate_range = live.invalidate_range     # lseek's ranged write-back
    except Exception as e:
        if not isinstance(e, Unsupported):
            log.exception("installing fallocate/lseek")
        log.warning("fallocate and lseek not installed (%s): fallocate(2) (punch hole, "
                    "discard, zero range) is unavailable and SEEK_HOLE finds no holes on "
                    "this mount", e)
        return None
    _installed.append(extra)
    log.info("fallocate and lseek (SEEK_DATA/SEEK_HOLE) installed")
    return extra
