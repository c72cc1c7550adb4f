"""A throwaway single-node Ceph for the tests (one mon, one memstore OSD, auth none, on
127.0.0.1 at a free port), made by the same code as ``scripts/ceph.py`` (docs/CEPH.md).

    start_cluster(tmpdir, port=None) -> Cluster     # .conf .pool .mon_addr .stop()
                                                    # .kill_osd() .restart_osd() .client()

and, as a pytest plugin (``pytest_plugins = ("support.ceph",)`` in conftest.py), the
session-scoped fixture ``ceph_cluster`` (one cluster for the whole session, stopped at its
end) and the ``ceph`` marker, which every test using the fixture gets, so that
``-m "not ceph"`` deselects them. (A module that imports ``ceph_cluster`` instead of
relying on the plugin gets a session cluster of its own.) Without Ceph installed
(``bash scripts/setup.sh test`` or ``... ceph`` installs it) the fixture fails when $CI is
set and skips, loudly, otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SCRIPT = os.path.join(ROOT, "scripts", "ceph.py")

_spec = importlib.util.spec_from_file_location("vdiskfs_scripts_ceph", _SCRIPT)
cephctl = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cephctl
_spec.loader.exec_module(cephctl)

CephError = cephctl.CephError


class Cluster(cephctl.Cluster):
    """A running test cluster: ``conf`` (path of its ceph.conf), ``pool``, ``mon_addr``
    (``v2:127.0.0.1:PORT``), ``dir`` (its scratch directory, removed by ``stop``)."""

    def kill_osd(self) -> None:
        """Take the OSD away: its connections drop and the mon marks it down at once, so
        clients' ops wait for it. Its objects are kept (memstore saves them as it stops)
        and come back with ``restart_osd``. (A SIGKILL would lose them: memstore.)"""
        self.stop_osd(keep=True)

    def restart_osd(self, timeout: float = 30.0) -> None:
        """Stop the OSD if it runs (as ``kill_osd``), start it, return when it is up.
        Clients see it again at their next map: a librados client whose ops wait for it
        looks again every ``objecter tick interval`` (5 s; ``client(objecter_tick_interval=
        "0.5")`` for a quicker test)."""
        if self.pid(cephctl.OSD) is not None:
            self.kill_osd()
        self.start_osd(timeout)

    def client(self, timeout: float = 10.0, **conf: str):
        """A connected ``rados.Rados`` on this cluster (conf options as keywords); the
        caller shuts it down."""
        import rados
        r = rados.Rados(conffile=self.conf)
        for key, value in conf.items():
            r.conf_set(key, str(value))
        r.connect(timeout=int(timeout))
        return r


def start_cluster(tmpdir: str, port: int | None = None, pool: str = cephctl.DEFAULT_POOL,
                  memstore_bytes: int | None = None, timeout: float = 60.0) -> Cluster:
    """Start a cluster with its scratch directory ``tmpdir`` (empty or missing; removed by
    ``stop``), its mon on ``port`` (default: a free one), and return it when a write has
    succeeded. Raises CephError (with the daemons' log tails) if it does not come up."""
    memstore_bytes = memstore_bytes or int(os.environ.get("CEPH_MEMSTORE_BYTES")
                                           or cephctl.DEFAULT_BYTES)
    for attempt in range(3):
        p = port or cephctl.free_port()
        try:
            cephctl.start(tmpdir, p, pool, memstore_bytes, timeout)
            break
        except CephError as e:
            # A free port taken between the choice and the mon's bind: choose again.
            if port or attempt == 2 or "in use" not in str(e):
                raise
    return Cluster(tmpdir)


def missing() -> str | None:
    """Why this machine cannot run a test cluster, or None."""
    absent = cephctl.missing_binaries()
    if absent:
        return f"Ceph is not installed ({', '.join(absent)} missing)"
    try:
        import rados  # noqa: F401
    except ImportError as e:
        return f"librados' Python binding is not importable from {sys.executable} ({e})"
    return None


def _skip_or_fail(reason: str) -> None:
    msg = f"SKIPPING: this machine cannot run the Ceph tests: {reason}; " \
          f"bash scripts/setup.sh test (or ... ceph) installs it"
    if os.environ.get("CI"):
        pytest.fail(f"{msg} (CI machines have Ceph: this is a failure)", pytrace=False)
    sys.stderr.write(f"\n*** {msg} ***\n")
    pytest.skip(msg)


# ---------------------------------------------------------------------------- plugin
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ceph: needs a single-node Ceph (ceph-mon, ceph-osd, python3-rados; the "
                   "ceph_cluster fixture of tests/support/ceph.py)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test whose fixtures include ceph_cluster gets the ``ceph`` marker (before -m
    deselects anything), marked by hand or not."""
    for item in items:
        if "ceph_cluster" in getattr(item, "fixturenames", ()) and \
                item.get_closest_marker("ceph") is None:
            item.add_marker(pytest.mark.ceph)


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One cluster for the whole session (stopped, its directory removed, at the end)."""
    reason = missing()
    if reason:
        _skip_or_fail(reason)
    c = start_cluster(str(tmp_path_factory.mktemp("ceph")))
    try:
        yield c
    finally:
        c.stop()
