"""Property-based fuzzing of a real mount (hypothesis): the `.ctl/clone` command channel,
VDisk names, extended attributes and sizes.

Each test function starts ONE vdiskfs mount (the conftest ``mount`` fixture) and runs a few
hundred hypothesis examples against it. Every example gets an answer: success exactly when
SPEC §2/§4 says so, otherwise an errno from the set the spec (or the kernel, for what it
checks before the daemon sees the request) allows. Refused requests must leave no trace
(no new VDisk, no status row, properties unchanged). After each test the daemon must still
serve, ``daemon.log`` must hold no "unexpected error", and the pool_dir fixture fscks the
pool after the unmount.

The oracle for `.ctl/clone` is written from the SPEC, not from vdiskfs/ctl/commands.py:
words are separated by spaces and tabs (what a person or ``echo`` types); one trailing
newline is allowed; anything else, control characters included, makes the command EINVAL.
``\\v`` and ``\\f`` (C ``isspace``) may be taken as separators too.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import time

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from support.common import Mount, daemon_log, read_file

pytestmark = pytest.mark.mount

KiB = 1 << 10
MiB = 1 << 20
MAX_VDISK_SIZE = 1 << 50   # SPEC: not stated; the documented limit of the engine (EFBIG)

FUZZ = settings(max_examples=500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])

NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
VALID_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

UMASK = os.umask(0o022)
os.umask(UMASK)

# Fuzz cases run per test, reported at the end of the session (see _report_counts).
CASES: dict[str, int] = {}


def valid_name(name: str | bytes) -> bool:
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            return False
    return bool(VALID_NAME.fullmatch(name)) and not name.startswith(".")


def err_of(fn, *args) -> int:
    """0 if ``fn(*args)`` succeeds, else its errno (anything else is a test failure)."""
    try:
        fn(*args)
        return 0
    except OSError as e:
        assert e.errno, f"{fn.__name__}{args!r}: OSError without errno: {e!r}"
        return e.errno


def ename(n: int) -> str:
    return "success" if n == 0 else errno.errorcode.get(n, str(n))


def ctl(m: Mount, name: str) -> str:
    return os.path.join(m.mnt, ".ctl", name)


def status(m: Mount) -> str:
    return read_file(ctl(m, "status")).decode()


def ctl_write(m: Mount, data: bytes, flags: int = 0) -> int:
    """One command, as ``echo CMD > .ctl/clone`` does it; returns the errno (0: accepted)."""
    fd = os.open(ctl(m, "clone"), os.O_WRONLY | flags)
    try:
        n = os.write(fd, data)
        assert n == len(data), f"short write {n}/{len(data)} of a command"
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def listing(m: Mount) -> set[str]:
    return set(os.listdir(m.mnt))


def assert_still_serving(m: Mount) -> None:
    """The daemon answers stat, create, write, fsync, read and unlink; no unexpected error."""
    os.stat(m.mnt)
    p = os.path.join(m.mnt, "ALIVE-CHECK")
    data = os.urandom(100 * KiB)
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.pwrite(fd, data, 12345)
        os.fsync(fd)
        assert os.pread(fd, len(data), 12345) == data
    finally:
        os.close(fd)
    assert read_file(p)[12345:] == data
    os.unlink(p)
    log = daemon_log(m.pool)
    assert "unexpected error" not in log and "Traceback" not in log, log[-4000:]


def count(test: str) -> None:
    CASES[test] = CASES.get(test, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    if CASES:
        total = sum(CASES.values())
        lines = "".join(f"    {k}: {v}\n" for k, v in sorted(CASES.items()))
        capman = request.config.pluginmanager.get_plugin("capturemanager")
        with capman.global_and_fixture_disabled():
            sys.stderr.write(f"\n[t5_fuzz] {total} fuzz cases run:\n{lines}")


@pytest.fixture
def checked(mount):
    """The mount; after the test, the daemon must still serve with a clean log (the
    pool_dir fixture then fscks the pool after the unmount)."""
    yield mount
    assert_still_serving(mount)


def world_of(m: Mount, cls):
    """One oracle state per mount, shared by the hypothesis examples run against it."""
    w = getattr(m, "_fuzz_world", None)
    if w is None:
        w = m._fuzz_world = cls(m)
    return w


# ---------------------------------------------------------------- .ctl/clone oracle
SEP = " \t"                 # the only separators; any other control character: EINVAL


def _words(text: str, seps: str) -> list[str]:
    return [w for w in re.split("[" + re.escape(seps) + "]+", text) if w]


def _grammar(words: list[str]) -> tuple[str, str | None, str | None] | int:
    """SPEC §4 grammar → (action, src, dst), or EINVAL."""
    if not words:
        return errno.EINVAL
    if words[0].startswith("-"):
        src = dst = None
        cancel = purge = False
        i = 0
        while i < len(words):
            w = words[i]
            if w in ("-s", "-d"):      # the next word is a name, whatever it is
                if i + 1 == len(words):
                    return errno.EINVAL
                if (src if w == "-s" else dst) is not None:
                    return errno.EINVAL
                if w == "-s":
                    src = words[i + 1]
                else:
                    dst = words[i + 1]
                i += 2
                continue
            if w == "-c" and not cancel:
                cancel = True
            elif w == "-p" and not purge:
                purge = True
            else:                      # unknown, or given twice
                return errno.EINVAL
            i += 1
        if purge and not (cancel or src or dst):
            cmd = ("purge", None, None)
        elif cancel and src and not (dst or purge):
            cmd = ("cancel", src, None)
        elif src and dst and not (cancel or purge):
            cmd = ("start", src, dst)
        else:
            return errno.EINVAL
    elif words[0] == "purge":          # the keywords take exactly their arguments
        if len(words) != 1:
            return errno.EINVAL
        cmd = ("purge", None, None)
    elif words[0] == "cancel":
        if len(words) != 2:
            return errno.EINVAL
        cmd = ("cancel", words[1], None)
    elif len(words) == 2:
        cmd = ("start", words[0], words[1])
    else:
        return errno.EINVAL
    for name in cmd[1:]:
        if name is not None and not valid_name(name):
            return errno.EINVAL
    return cmd


def parse_options(data: bytes) -> list[tuple[str, str | None, str | None] | int]:
    """Every acceptable reading of one write to .ctl/clone: a command tuple or EINVAL."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return [errno.EINVAL]
    if text.endswith("\n"):
        text = text[:-1]
    if any(c not in SEP and (ord(c) < 32 or ord(c) == 127) for c in text):
        return [errno.EINVAL]
    return [_grammar(_words(text, SEP))]


class CtlWorld:
    """The mount's state as the oracle sees it: VDisks (name → content) and status rows."""

    SRC_DATA = b"source-data " * 5000

    def __init__(self, m: Mount):
        self.m = m
        with open(m.path("SRC"), "wb") as f:
            f.truncate(1 * MiB)
            f.seek(300 * KiB)
            f.write(self.SRC_DATA)
            f.flush()
            os.fsync(f.fileno())
        with open(m.path("TAKEN"), "wb") as f:
            f.truncate(64 * KiB)
        self.names = listing(m)
        self.src_content = read_file(m.path("SRC"))

    def expected(self, cmd) -> set[int]:
        if isinstance(cmd, int):
            return {cmd}
        action, src, dst = cmd
        if action == "purge":
            return {0}
        if action == "cancel":
            return {errno.ENOENT}       # never a clone in progress between examples
        errs = set()
        if src not in self.names:
            errs.add(errno.ENOENT)
        if dst in self.names:
            errs.add(errno.EEXIST)
        return errs or {0}              # SPEC gives no order when both apply: either one

    def check(self, data: bytes, flags: int = 0) -> None:
        options = parse_options(data)
        allowed: dict[int, object] = {}
        for cmd in options:
            for e in self.expected(cmd):
                allowed.setdefault(e, cmd)
        before_status = status(self.m)
        got = ctl_write(self.m, data, flags)
        assert got in allowed, (f"write of {data[:200]!r} ({len(data)} bytes) to .ctl/clone: "
                                f"got {ename(got)}, expected one of "
                                f"{[ename(e) for e in allowed]} (readings {options})")
        if got:
            assert listing(self.m) == self.names, f"refused {data[:100]!r} changed the names"
            assert status(self.m) == before_status, f"refused {data[:100]!r} changed status"
            return
        cmd = allowed[0]
        count(f"  .ctl/clone accepted: {cmd[0]}")
        if cmd[0] == "start":
            self._finish_clone(cmd[1], cmd[2])
        assert listing(self.m) == self.names
        assert status(self.m).splitlines()[1:] == [], "purge left rows"

    def _finish_clone(self, src: str, dst: str) -> None:
        """An accepted start: the clone completes, equals its source, then is removed."""
        deadline = time.monotonic() + 30
        while True:
            rows = [line.split() for line in status(self.m).splitlines()[1:]]
            assert [src, dst] in [r[:2] for r in rows], f"no row for {src} {dst}: {rows}"
            state = [r[2] for r in rows if r[:2] == [src, dst]][-1]
            if state in ("Completed", "Error", "Cancelled"):
                break
            assert time.monotonic() < deadline, f"clone {src} {dst} stuck at {state}"
            time.sleep(0.01)
        assert state == "Completed", state
        assert read_file(self.m.path(dst)) == read_file(self.m.path(src))
        os.unlink(self.m.path(dst))
        assert ctl_write(self.m, b"purge\n") == 0


# ---------------------------------------------------------------- strategies
NAMES_FOR_CTL = st.one_of(
    st.sampled_from(["SRC", "SRC", "TAKEN", "NEW", "cancel", "purge", "N" * 64, "N" * 65,
                     ".hidden", ".ctl", "..", "-s", "-d", "-x", "a/b", "é", "SRC\x1fX",
                     "new.name_1-2", "SRC\x00"]),
    st.text(alphabet=NAME_CHARS, min_size=1, max_size=70),
    st.text(min_size=1, max_size=12).filter(lambda s: not any(c in s for c in " \t\n")),
)
SEPS = st.sampled_from([" ", " ", "\t", "  ", " \t ", "\v", "\f"])


@st.composite
def commands(draw) -> bytes:
    """Well-formed-looking commands in every spelling of SPEC §4, with random names."""
    a = draw(st.one_of(st.just("SRC"), NAMES_FOR_CTL))
    b = draw(st.one_of(st.text(alphabet=NAME_CHARS, min_size=1, max_size=64), NAMES_FOR_CTL))
    form = draw(st.sampled_from(["plain", "plain", "cancel", "purge", "-s-d", "-d-s",
                                 "-s-c", "-c-s", "-p", "junkflags"]))
    words = {
        "plain": [a, b], "cancel": ["cancel", a], "purge": ["purge"],
        "-s-d": ["-s", a, "-d", b], "-d-s": ["-d", b, "-s", a], "-s-c": ["-s", a, "-c"],
        "-c-s": ["-c", "-s", a], "-p": ["-p"],
        "junkflags": draw(st.lists(st.sampled_from(["-s", "-d", "-c", "-p", "-q", a, b]),
                                   min_size=1, max_size=6)),
    }[form]
    if draw(st.integers(0, 9)) == 0:      # an extra or a missing word
        if draw(st.booleans()) and len(words) > 1:
            words = words[:-1]
        else:
            words = words + [draw(NAMES_FOR_CTL)]
    sep = draw(SEPS)
    text = draw(st.sampled_from(["", " ", "\t"])) + sep.join(words) + draw(
        st.sampled_from(["", "", " ", "\t"]))
    end = draw(st.sampled_from(["", "\n", "\n", "\n", "\n\n", "\r\n", "\0"]))
    return (text + end).encode("utf-8", "surrogatepass")


def huge(seed: bytes) -> bytes:
    return (seed * (MiB // max(len(seed), 1) + 2))[:MiB + len(seed) * 7 + 1]


GARBAGE = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.binary(min_size=1, max_size=64).map(huge),                          # 1 MiB+
    st.lists(st.sampled_from([b"SRC", b"NEW", b"TAKEN", b" ", b"\t", b"\n", b"\0", b"\xff",
                              b"\xc3\xa9", b"-s", b"-d", b"-c", b"-p", b"cancel", b"purge",
                              b"\r", b"\x1c", b"\x1f", b"\v", b"\x7f", b"SRC NEW"]),
             min_size=1, max_size=12).map(b"".join),                       # partial lines
    st.lists(st.sampled_from([b"SRC NEW", b"purge", b"cancel SRC", b"-p", b""]),
             min_size=2, max_size=3000).map(b"\n".join),                   # many lines
    st.text(min_size=1, max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
)


# ---------------------------------------------------------------- .ctl/clone tests
@FUZZ
@given(data=GARBAGE, flags=st.sampled_from([0, 0, os.O_TRUNC, os.O_APPEND]))
@example(data=b"\0", flags=0)
@example(data=b"\xff\xfe", flags=0)
@example(data=b"SRC NEW\n" * 20000, flags=0)
@example(data=b"SRC NEW\nSRC NEW2\n", flags=0)
@example(data=b"SRC", flags=0)
@example(data=b"x" * (4 * MiB), flags=os.O_TRUNC)
def test_ctl_clone_garbage(checked, data, flags):
    world = world_of(checked, CtlWorld)
    world.check(data, flags)
    count("ctl_clone_garbage")


@FUZZ
@given(data=commands())
@example(data=b"SRC NEW\n")
@example(data=b"-s SRC -d NEW")
@example(data=b"-d NEW -s SRC\n")
@example(data=b"cancel SRC\n")
@example(data=b"-s SRC -c")
@example(data=b"purge")
@example(data=b"-p\n")
@example(data=b"SRC TAKEN\n")
@example(data=b"MISSING NEW\n")
@example(data=b"MISSING TAKEN\n")
@example(data=b"SRC .ctl\n")
@example(data=b"SRC " + b"N" * 65 + b"\n")
@example(data=b"SRC SRC\n")
@example(data=b"purge now\n")
@example(data=b"-p -p\n")
@example(data=b"cancel\n")
@example(data=b"-s -s -d NEW\n")
def test_ctl_clone_grammar(checked, data):
    world = world_of(checked, CtlWorld)
    world.check(data)
    count("ctl_clone_grammar")


@pytest.mark.parametrize("sep", ["\x1c", "\x1d", "\x1e", "\x1f", "\v", "\f", "\r"])
def test_ctl_clone_control_separator_is_einval(checked, sep):
    m = checked
    with open(m.path("SRC"), "wb") as f:
        f.truncate(64 * KiB)
    got = ctl_write(m, f"SRC{sep}DST\n".encode())
    assert got == errno.EINVAL, (f"'SRC{sep!r}DST' → {ename(got)}; listing {listing(m)}, "
                                 f"status {status(m)!r}")


def test_ctl_clone_fuzz_leaves_daemon_serving(checked):
    """A short burst of the worst inputs, then the liveness checks of the fixture."""
    world = CtlWorld(checked)
    for data in (b"\0" * MiB, os.urandom(3 * MiB), b"SRC NEW\n" * 100000, b"\xff" * 4097):
        world.check(data)


# ---------------------------------------------------------------- names
SPECIAL = {b".", b"..", b".ctl"}   # directories: the kernel answers for these
NAMES = st.one_of(
    st.text(alphabet=NAME_CHARS, min_size=1, max_size=80),
    st.text(min_size=1, max_size=80),
    st.binary(min_size=1, max_size=120),
    st.sampled_from(["..x", ".x", "x" * 64, "x" * 65, "y" * 200, "ctl", ".ctl", ".", "a b",
                     "tab\tname", "nl\nname", "\x7f", "ÄÖÜ", "名前", "-", "_", "0",
                     "a/b", "SRC/x", "x/", "/x", "a//b", "SRC", "R", "..", "a..b", "..."]),
).map(lambda n: n.encode("utf-8", "surrogatepass") if isinstance(n, str) else n)


def _safe_name(name: bytes) -> bool:
    """Names the test may hand the kernel: no NUL (Python refuses), nothing that walks out
    of the mount ('..' as the first of several components), no leading '/'. A bare '..'
    is kept: creating, renaming onto or truncating the mount's parent must fail."""
    if b"\0" in name:
        return False
    return b"/" not in name or name.split(b"/")[0] not in (b"..", b".", b".ctl", b"")


def name_expect(name: bytes, op: str, existing: set[str]) -> set[int]:
    if b"/" in name:
        return {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.ENAMETOOLONG}
    if name in SPECIAL:
        return {errno.EISDIR, errno.EEXIST, errno.EPERM, errno.EINVAL, errno.EBUSY,
                errno.ENOTEMPTY, errno.EXDEV}
    if valid_name(name):
        if op == "truncate":
            return {0} if name.decode() in existing else {errno.ENOENT}
        if op == "create" and name.decode() in existing:
            return {errno.EEXIST}
        return {0}
    if op == "truncate":       # a lookup: the name is not there (or cannot be decoded)
        return {errno.ENOENT, errno.EINVAL, errno.ENAMETOOLONG}
    return {errno.EINVAL, errno.ENAMETOOLONG}


class NameWorld:
    def __init__(self, m: Mount):
        self.m = m
        self.mnt = m.mnt.encode()
        self.content = os.urandom(8 * KiB)
        for n in ("SRC", "R"):
            with open(m.path(n), "wb") as f:
                f.write(self.content)
        self.names = listing(m)
        self.parent = set(os.listdir(os.path.dirname(m.mnt)))

    def path(self, name: bytes) -> bytes:
        return self.mnt + b"/" + name     # not os.path.join: a leading '/' stays inside

    def check(self, name: bytes, op: str) -> None:
        assume(_safe_name(name))
        if op == "rename" and valid_name(name):
            assume(name.decode() not in self.names)   # would replace an existing VDisk
        allowed = name_expect(name, op, self.names)
        p = self.path(name)
        if op == "create":
            got = err_of(lambda: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                                  0o644)))
        elif op == "rename":
            got = err_of(os.rename, self.path(b"R"), p)
        else:
            got = err_of(os.truncate, p, len(self.content))   # same size: no change
        assert got in allowed, (f"{op} {name!r}: got {ename(got)}, expected one of "
                                f"{[ename(e) for e in allowed]}")
        count(f"  names: {op} {'accepted' if got == 0 else 'refused'}")
        if got == 0 and op == "create":
            new = name.decode()
            assert listing(self.m) == self.names | {new}
            st = os.stat(p)
            assert st.st_size == 0 and st.st_mode & 0o777 == 0o644 & ~UMASK, oct(st.st_mode)
            os.unlink(p)
        elif got == 0 and op == "rename":
            new = name.decode()
            assert listing(self.m) == (self.names - {"R"}) | {new}
            assert read_file(p) == self.content
            os.rename(p, self.path(b"R"))
        assert listing(self.m) == self.names, f"{op} {name!r} left {listing(self.m)}"
        assert read_file(self.m.path("R")) == self.content
        assert set(os.listdir(os.path.dirname(self.m.mnt))) == self.parent, \
            f"{op} {name!r} made something outside the mount"


@FUZZ
@given(name=NAMES, op=st.sampled_from(["create", "rename", "truncate"]))
@example(name=b"x" * 65, op="create")
@example(name=b"x" * 64, op="create")
@example(name=b".hidden", op="rename")
@example(name=b"\xff\xfe", op="create")
@example(name=b"a/b", op="create")
@example(name=b".ctl", op="rename")
@example(name=b"caf\xc3\xa9", op="rename")
@example(name=b"ctl\x01", op="create")
@example(name=b"..", op="rename")
@example(name=b"..", op="create")
def test_names(checked, name, op):
    world = world_of(checked, NameWorld)
    world.check(name, op)
    count("names")


# ---------------------------------------------------------------- xattrs
LBA = b"user.vdisk.lba_size"
READ_ONLY = [b"user.vdisk.serial", b"user.vdisk.allocated", b"user.vdisk.unique",
             b"user.vdisk.shared"]

XNAMES = st.one_of(
    st.just(LBA), st.just(LBA), st.sampled_from(READ_ONLY),
    st.sampled_from([b"user.vdisk.LBA_SIZE", b"user.vdisk.lba_size ", b"user.vdisk.",
                     b"user.vdisk", b"user.", b"user.foo", b"trusted.x", b"security.x",
                     b"system.posix_acl_access", b"system.x", b"foo", b"user.vdisk.serial2",
                     b"user.vdisk.lba_size\x01", b"user.vdisk.lba_size\xff"]),
    st.tuples(st.sampled_from([b"", b"user.", b"user.vdisk.", b"trusted.", b"security."]),
              st.binary(min_size=1, max_size=40)).map(b"".join),
).filter(lambda n: b"\0" not in n)

XVALUES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"512", b"4096", b"512\n", b"4096\n", b"4096\0"]),
    st.sampled_from([b"512", b"4096", b"512\n", b"4096\0", b"1024", b"0", b"-512", b"",
                     b"513", b"4096 4096", b"0x200", b"5 12", b"\xff512", b"512\xff",
                     b"99999999999999999999999999", "٥١٢".encode()]),
    st.integers(-10**6, 10**6).map(lambda i: str(i).encode()),
    st.binary(min_size=65 * KiB, max_size=65 * KiB + 1),
)


def lba_candidate(value: bytes) -> int | None:
    """The number a lenient parser could read in ``value`` if it names 512 or 4096; None
    when no reading of it does (then the value must be refused)."""
    if not re.fullmatch(rb"[\s\0+_0-9]*", value):
        return None
    digits = re.sub(rb"[^0-9]", b"", value).lstrip(b"0")
    if digits in (b"512", b"4096") and re.search(rb"[0-9]", value):
        return int(digits)
    return None


class XattrWorld:
    def __init__(self, m: Mount):
        self.m = m
        self.path = m.path("X")
        with open(self.path, "wb") as f:
            f.truncate(1 * MiB)
        self.serial = os.getxattr(self.path, b"user.vdisk.serial")
        self.lba = int(os.getxattr(self.path, LBA))
        assert self.lba == 512, "default lba_size is 512 (SPEC §2)"
        self.names = sorted(os.listxattr(self.path))

    def check(self, op: str, name: bytes, value: bytes, busy: bool) -> None:
        p = self.path
        fd = os.open(p, os.O_RDONLY) if busy else -1
        try:
            if op == "set":
                got = err_of(os.setxattr, p, name, value)
            elif op == "get":
                got = err_of(os.getxattr, p, name)
            else:
                got = err_of(os.removexattr, p, name)
        finally:
            if fd >= 0:
                os.close(fd)
        what = f"{op}xattr({name!r}, {value[:40]!r}{', open' if busy else ''})"
        if name == LBA and op == "set":
            strict = re.fullmatch(rb"(512|4096)[\n\0]?", value) is not None
            cand = lba_candidate(value)
            if busy:
                allowed = {errno.EBUSY} | (set() if strict else {errno.EINVAL, errno.E2BIG})
            elif strict:
                allowed = {0}
            elif cand is not None:
                allowed = {0, errno.EINVAL}     # lenient parsing is not forbidden
            else:
                allowed = {errno.EINVAL, errno.E2BIG}
            assert got in allowed, f"{what}: got {ename(got)}, expected {list(map(ename, allowed))}"
            if got == 0:
                self.lba = cand
                count(f"  xattrs: lba_size set to {cand}")
        elif name == LBA or name in READ_ONLY:
            allowed = {0} if op == "get" else {errno.EPERM, errno.E2BIG}
            assert got in allowed, f"{what}: got {ename(got)}"
        elif op == "set":
            allowed = {errno.ENOTSUP, errno.EPERM, errno.ERANGE, errno.E2BIG}
            if name.startswith(b"user.vdisk.") or not name.startswith(b"user."):
                allowed |= {errno.EINVAL, errno.EACCES}   # ours / the kernel's (ACLs)
            if name.startswith(b"system.posix_acl_") and not value:
                allowed.add(errno.ENODATA)   # an empty ACL is a removal (kernel)
            assert got in allowed, \
                f"{what}: got {ename(got)}, expected {list(map(ename, allowed))}"
        else:
            allowed = {errno.ENODATA, errno.ENOTSUP, errno.ERANGE, errno.EPERM}
            assert got in allowed, f"{what}: got {ename(got)}"
        # Nothing else changed.
        assert int(os.getxattr(p, LBA)) == self.lba, f"{what} changed lba_size"
        assert os.getxattr(p, b"user.vdisk.serial") == self.serial, f"{what} changed serial"
        assert sorted(os.listxattr(p)) == self.names, f"{what} changed the attribute list"


@FUZZ
@given(op=st.sampled_from(["set", "set", "set", "get", "remove"]), name=XNAMES,
       value=XVALUES, busy=st.integers(0, 9).map(lambda i: i == 0))
@example(op="set", name=LBA, value=b"4096", busy=False)
@example(op="set", name=LBA, value=b"512\n", busy=False)
@example(op="set", name=LBA, value=b"4096", busy=True)
@example(op="set", name=LBA, value=b"1024", busy=False)
@example(op="set", name=b"user.vdisk.serial", value=b"1", busy=False)
@example(op="set", name=b"user.foo", value=b"1", busy=False)
@example(op="remove", name=LBA, value=b"", busy=False)
def test_xattrs(checked, op, name, value, busy):
    world = world_of(checked, XattrWorld)
    world.check(op, name, value, busy)
    count("xattrs")


# ---------------------------------------------------------------- sizes
class SizeWorld:
    def __init__(self, m: Mount):
        self.m = m
        self.path = m.path("T")
        self.model = bytearray(os.urandom(200 * KiB))
        with open(self.path, "wb") as f:
            f.write(self.model)
        self.size = len(self.model)

    def expect_at(self, off: int, n: int) -> bytes:
        end = min(off + n, self.size)
        if off >= end:
            return b""
        have = bytes(self.model[off:min(end, len(self.model))])
        return have + bytes(end - off - len(have))

    def check(self, size: int, write: tuple[int, bytes] | None) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            if write:
                off, data = write
                assert os.pwrite(fd, data, off) == len(data)
                end = off + len(data)
                if end > len(self.model):
                    self.model.extend(bytes(end - len(self.model)))
                self.model[off:end] = data
                self.size = max(self.size, end)
            got = err_of(os.ftruncate, fd, size)
            if size < 0:
                allowed = {errno.EINVAL}
            elif size > MAX_VDISK_SIZE:
                allowed = {errno.EFBIG, errno.EINVAL}
            else:
                allowed = {0}
            assert got in allowed, f"ftruncate({size}): got {ename(got)}"
            if got == 0:
                self.size = size
                del self.model[size:]
            assert os.fstat(fd).st_size == self.size
            for off in (0, 100 * KiB - 7, max(self.size - 5000, 0), self.size):
                assert os.pread(fd, 9000, off) == self.expect_at(off, 9000), \
                    f"bytes at {off} after ftruncate({size})"
        finally:
            os.close(fd)
        assert os.stat(self.path).st_size == self.size

    def verify_cold(self) -> None:
        """After a remount (no page cache), the daemon holds the model."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            assert os.fstat(fd).st_size == self.size
            got = os.pread(fd, len(self.model), 0)
            assert got == bytes(self.model[:self.size]), "contents differ after remount"
        finally:
            os.close(fd)


SIZES = st.one_of(
    st.integers(-(1 << 63), -1),
    st.integers(0, 300 * KiB),
    st.integers(0, MAX_VDISK_SIZE),
    st.integers(MAX_VDISK_SIZE + 1, (1 << 63) - 1),
    st.sampled_from([2 ** 62, (1 << 63) - 1, MAX_VDISK_SIZE, MAX_VDISK_SIZE + 1, 0, 1,
                     -1, 4095, 4097, 256 * KiB]),
)
WRITES = st.one_of(st.none(), st.tuples(st.integers(0, 250 * KiB),
                                        st.binary(min_size=1, max_size=9000)))


@FUZZ
@given(size=SIZES, write=WRITES)
@example(size=-1, write=None)
@example(size=2 ** 62, write=None)
@example(size=MAX_VDISK_SIZE, write=(5, b"x"))
@example(size=3, write=(200 * KiB, b"tail"))
def test_sizes(checked, size, write):
    world = world_of(checked, SizeWorld)
    world.check(size, write)
    count("sizes")


def test_sizes_survive_remount(new_mount):
    """A shorter run of the size fuzz, then a remount: the daemon's state equals the model
    without the kernel's cache in between."""
    m = new_mount.start()
    worlds: list[SizeWorld] = []

    @settings(FUZZ, max_examples=120)
    @given(size=SIZES, write=WRITES)
    def run(size, write):
        if not worlds:
            worlds.append(SizeWorld(m))
        worlds[0].check(size, write)
        count("sizes_remount")

    run()
    assert_still_serving(m)
    m.stop()
    m.start()
    worlds[0].verify_cold()
    assert_still_serving(m)
