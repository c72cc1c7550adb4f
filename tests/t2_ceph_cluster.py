"""The test cluster (tests/support/ceph.py, docs/CEPH.md) does what the RADOS store will
need, from this venv's Python: librados imports and connects with the cluster's conf;
objects are written and read back; an exclusive lock held by one cookie is refused to
another (ObjectBusy); a client blocklisted through mon_command has its writes refused
(ConnectionShutdown, errno 108); an OSD restarted during a loop of writes makes them wait,
then succeed, with the objects written before it still there."""

from __future__ import annotations

import errno
import json
import threading
import time

import pytest

pytestmark = pytest.mark.ceph

# No op of these tests may hang the session: one that gets no answer fails after this.
OP_TIMEOUT = "30"


@pytest.fixture
def clients(ceph_cluster):
    """clients(**conf) -> a connected rados.Rados; every one is shut down at teardown."""
    made = []

    def make(**conf):
        r = ceph_cluster.client(rados_osd_op_timeout=OP_TIMEOUT,
                                rados_mon_op_timeout=OP_TIMEOUT, **conf)
        made.append(r)
        return r
    yield make
    for r in made:
        r.shutdown()


def test_write_read(ceph_cluster, clients):
    import rados
    assert ceph_cluster.mon_addr.startswith("v2:127.0.0.1:")
    r = clients()
    assert ceph_cluster.pool in r.list_pools()
    with r.open_ioctx(ceph_cluster.pool) as io:
        data = bytes(range(256)) * 16
        io.write_full("t2-obj", data)
        io.write("t2-obj", b"XY", 4094)
        assert io.read("t2-obj", 8192) == data[:4094] + b"XY" + data[4096:]
        assert io.stat("t2-obj")[0] == 4096
        io.remove_object("t2-obj")
        with pytest.raises(rados.ObjectNotFound):
            io.read("t2-obj")


def test_exclusive_lock(ceph_cluster, clients):
    import rados
    a, b = clients(), clients()
    with a.open_ioctx(ceph_cluster.pool) as ia, b.open_ioctx(ceph_cluster.pool) as ib:
        ia.write_full("t2-lock", b"")
        ia.lock_exclusive("t2-lock", "vdiskfs", "cookie-a", desc="holder")
        try:
            with pytest.raises(rados.ObjectBusy):
                ib.lock_exclusive("t2-lock", "vdiskfs", "cookie-b")
            with pytest.raises(rados.ObjectBusy):      # another cookie of the same client
                ia.lock_exclusive("t2-lock", "vdiskfs", "cookie-b")
        finally:
            ia.unlock("t2-lock", "vdiskfs", "cookie-a")
        ib.lock_exclusive("t2-lock", "vdiskfs", "cookie-b")   # free again
        ib.unlock("t2-lock", "vdiskfs", "cookie-b")
        ia.remove_object("t2-lock")


def mon_command(r, **cmd) -> str:
    ret, out, outs = r.mon_command(json.dumps(cmd), b"")
    assert ret == 0, f"{cmd}: {ret} {outs}"
    return out.decode()


def test_blocklisted_client_cannot_write(ceph_cluster, clients):
    import rados
    admin, victim = clients(), clients()
    with victim.open_ioctx(ceph_cluster.pool) as iv:
        iv.write_full("t2-fenced", b"before")
        addr = victim.get_addrs()
        mon_command(admin, prefix="osd blocklist", blocklistop="add", addr=addr)
        try:
            assert addr in mon_command(admin, prefix="osd blocklist ls", format="json")
            deadline = time.monotonic() + 10     # the OSD refuses it once it has the map
            with pytest.raises(rados.ConnectionShutdown) as e:
                while time.monotonic() < deadline:
                    iv.write_full("t2-fenced", b"after")
                    time.sleep(0.01)
            assert e.value.errno == errno.ESHUTDOWN == 108
        finally:
            mon_command(admin, prefix="osd blocklist", blocklistop="rm", addr=addr)
    with admin.open_ioctx(ceph_cluster.pool) as ia:
        assert ia.read("t2-fenced") == b"before"
        ia.remove_object("t2-fenced")


def test_osd_restart_during_writes(ceph_cluster, clients):
    # A client whose ops wait for an OSD looks for it again every objecter tick (5 s by
    # default): a shorter tick keeps this test short.
    r = clients(objecter_tick_interval="0.2")
    io = r.open_ioctx(ceph_cluster.pool)
    io.write_full("t2-before", b"kept")
    times: list[tuple[float, float]] = []       # (start, end) of every completed write
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer():
        i = 0
        try:
            while not stop.is_set():
                t = time.monotonic()
                io.write_full(f"t2-w{i % 16}", i.to_bytes(8, "little") * 512)
                times.append((t, time.monotonic()))
                i += 1
        except BaseException as e:               # noqa: BLE001 (reported below)
            errors.append(e)

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    try:
        time.sleep(0.2)
        before = len(times)
        down = time.monotonic()
        ceph_cluster.kill_osd()
        time.sleep(0.3)                          # writes issued now have no OSD
        ceph_cluster.restart_osd()
        up = time.monotonic()
        deadline = up + 10
        while len(times) < before + 50 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
    finally:
        stop.set()
        th.join(40)
        if ceph_cluster.pid("osd.0") is None:   # the next tests need it
            ceph_cluster.restart_osd()
    assert not th.is_alive(), "a write never returned"
    assert not errors, f"a write failed across the OSD restart: {errors[0]!r}"
    assert before > 0 and len(times) >= before + 50, (before, len(times))
    # Some write was waiting while the OSD was away and completed once it was back.
    waited = [(s, e) for s, e in times if s < up and e > up]
    assert waited and max(e - s for s, e in waited) >= 0.25, (up - down, waited)
    assert io.read("t2-before") == b"kept"      # memstore kept it across the restart
    last = len(times) - 1
    assert io.read(f"t2-w{last % 16}") == last.to_bytes(8, "little") * 512
    for i in range(16):
        io.remove_object(f"t2-w{i}")
    io.remove_object("t2-before")
    io.close()
