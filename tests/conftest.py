"""Shared fixtures: pools, real vdiskfs mounts in subprocesses, loop devices; and the check
that a test which mounts carries the ``mount`` (and ``loop``) marker. The helpers they
hand out (``Mount``, ``KernelMounts``, ...) are in support/common.py.

Every fixture cleans up what it made: it unmounts (lazily if it must), detaches the loop
devices it attached and kills only the daemon it started. Every pool a test leaves behind
is checked with ``vdiskfs fsck`` at teardown.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

# The helper modules' asserts get pytest's introspection, as the test modules' do.
pytest.register_assert_rewrite("support")

from support.common import KernelMounts, Mount, fsck_clean  # noqa: E402
import support.engine  # noqa: E402

pytest_plugins = ("support.ceph",)      # the ceph_cluster fixture and the ceph marker


# ---------------------------------------------------------------------------- chunk stores
# The engine tests of these modules run twice: with the chunks in the pool directory
# (``[local]``) and in RADOS on the session's Ceph (``[rados]``; vdiskfs/rados/chunks.py).
# A test that opens the pool's data or sums file itself carries ``local_chunks`` and runs
# once; of a test parametrized further, the first case runs on RADOS.
BOTH_STORES = {"t1_engine", "t1_engine_io", "t1_engine_partial", "t1_thin", "t1_checksums"}


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__ not in BOTH_STORES:
        return
    if metafunc.definition.get_closest_marker("local_chunks"):
        stores = ["local"]
    else:
        stores = ["local", pytest.param("rados", marks=pytest.mark.ceph)]
    metafunc.parametrize("chunk_store", stores, indirect=True)


def pytest_collection_modifyitems(config, items):
    """On RADOS, one run per test function: of a test parametrized further (seeds, failure
    points) only its first case, which keeps the suite within its time."""
    seen, keep, dropped = set(), [], []
    for item in items:
        cs = getattr(item, "callspec", None)
        if cs is not None and cs.params.get("chunk_store") == "rados":
            key = (item.module.__name__, item.originalname)
            if key in seen:
                dropped.append(item)
                continue
            seen.add(key)
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(autouse=True)      # autouse: set up before the fixtures that make pools
def chunk_store(request, monkeypatch):
    """Where the pools this test makes keep their chunks: "local" or "rados"."""
    where = getattr(request, "param", "local")
    if where == "rados":
        import uuid

        from vdiskfs.rados.cluster import Where
        cluster = request.getfixturevalue("ceph_cluster")
        monkeypatch.setattr(support.engine, "STORE", lambda: Where(
            cluster.pool, "t-" + uuid.uuid4().hex[:16], cluster.conf).record())
    return where


def _missing_fuse() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not shutil.which("fusermount3"):
        return "fusermount3 is not installed"
    if os.geteuid() != 0:
        return "tests with mounts run as root"
    return None


def _missing_loop() -> str | None:
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is missing (no loop devices)"
    for tool in ("losetup", "mkfs.ext4", "e2fsck"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    return None


def _skip_or_fail(reason: str) -> None:
    msg = f"SKIPPING: this machine cannot run the test: {reason}"
    if os.environ.get("CI"):
        pytest.fail(f"{msg} (CI machines have FUSE and loop devices: this is a failure)")
    sys.stderr.write(f"\n*** {msg} ***\n")
    pytest.skip(msg)


# ---------------------------------------------------------------------------- markers
# A test that mounts must say so: whatever requests need_fuse (directly, or through mount,
# new_mount, need_loop or a fixture of its own module) carries the ``mount`` marker, and
# whatever requests need_loop the ``loop`` marker too, so that
# ``pytest -m "not mount and not loop"`` (make test-fast) runs no mount at all. A test
# without the marker fails in its setup, before any of its fixtures has run.
MARKER_OF = {"need_fuse": "mount", "need_loop": "loop"}


def _require_marker(item: pytest.Item, fixture: str) -> None:
    mark = MARKER_OF[fixture]
    if item.get_closest_marker(mark) is None:
        pytest.fail(f"{item.nodeid} uses the {fixture} fixture (directly or through another "
                    f"fixture) but has no @pytest.mark.{mark}: mark it (a decorator, or "
                    f"pytestmark for the module) so that -m \"not mount and not loop\" "
                    f"deselects it", pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Refuse to set up a test whose fixture closure holds need_fuse/need_loop without the
    matching marker (runs before the test's fixtures are set up)."""
    for fixture in MARKER_OF:
        if fixture in getattr(item, "fixturenames", ()):
            _require_marker(item, fixture)


@pytest.fixture
def need_fuse(request):
    _require_marker(request.node, "need_fuse")    # also for request.getfixturevalue()
    reason = _missing_fuse()
    if reason:
        _skip_or_fail(reason)


@pytest.fixture
def need_loop(request, need_fuse):
    _require_marker(request.node, "need_loop")
    reason = _missing_loop()
    if reason:
        _skip_or_fail(reason)


@pytest.fixture
def pool(path):
    """An open engine Pool (no FUSE) on the test module's ``path`` fixture (its geometry)."""
    from vdiskfs.cow.pool import Pool
    p = Pool(path)
    yield p
    if p._lock_fd >= 0:
        p.close(commit=False)


@pytest.fixture
def pool_dir(tmp_path):
    """A pool directory; fsck'd at teardown if the test made a pool there."""
    path = str(tmp_path / "pool")
    yield path
    if os.path.exists(os.path.join(path, "vdiskfs-pool")) and not _locked(path):
        fsck_clean(path)


def _locked(pool: str) -> bool:
    import fcntl
    fd = os.open(os.path.join(pool, "lock"), os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@pytest.fixture
def kmounts():
    km = KernelMounts()
    yield km
    km.cleanup()


@pytest.fixture
def mount(need_fuse, pool_dir, tmp_path, kmounts):
    """A started vdiskfs mount of a new pool with the default options."""
    m = Mount(pool_dir, str(tmp_path / "mnt"))
    m.start()
    yield m
    kmounts.cleanup()      # loop mounts on top of the VDisks go first
    m.cleanup()


@pytest.fixture
def new_mount(need_fuse, pool_dir, tmp_path, kmounts):
    """A Mount not yet started (for tests that choose options or restart it)."""
    m = Mount(pool_dir, str(tmp_path / "mnt"))
    yield m
    kmounts.cleanup()
    m.cleanup()
