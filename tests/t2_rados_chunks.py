"""The RADOS chunk store (vdiskfs/rados/chunks.py) against a real single-node Ceph
(tests/support/ceph.py starts one per test session): objects per slot, sums beside the
data, zeros for what was never written, removal of freed slots, failures as fail-stop.
"""

from __future__ import annotations

import errno
import json
import uuid

import pytest

from vdiskfs.cow import checksum
from vdiskfs.cow.errors import StoreFailed
from vdiskfs.rados.chunks import RadosChunks, oid
from vdiskfs.rados.cluster import CephUnavailable, Where, connect

CS = 64 << 10
NB = CS // checksum.BLOCK


@pytest.fixture
def where(ceph_cluster):
    return Where(ceph_cluster.pool, "t-" + uuid.uuid4().hex[:12], ceph_cluster.conf)


@pytest.fixture
def store(where):
    s = RadosChunks.open(where, CS)
    yield s
    s.close()


def test_writes_read_back_across_slots_and_holes_read_as_zeros(store, where):
    data = bytes(range(256)) * (CS * 2 // 256)
    store.reserve([3, 4])
    store.writev_at(3 * CS + 100, [memoryview(data[:CS]), memoryview(data[CS:])])
    store.sync()
    assert store.read_at(3 * CS + 100, 2 * CS) == data
    assert store.read_at(0, 4096) == bytes(4096)                  # never written
    assert store.read_at(3 * CS, 100) == bytes(100)               # before the write
    assert store.read_at(5 * CS, 200) == data[2 * CS - 100:] + bytes(100)   # a short object
    assert store.known_zero(9) and not store.known_zero(3)
    # A second handle (the next mount) sees what the first wrote, and what exists.
    again = RadosChunks.open(where, CS, readonly=True)
    try:
        assert again.read_at(3 * CS + 100, 2 * CS) == data
        assert again.count == 3                     # slots 3, 4 and 5 have objects
        assert again.file_size() == 6 * CS          # the end of the highest slot
        assert not again.known_zero(5) and again.known_zero(6)
    finally:
        again.close()


def test_sums_live_beside_the_data_and_go_with_it(store, where):
    block = b"\x5a" * checksum.BLOCK
    store.writev_at(2 * CS, [memoryview(block * NB)])
    store.write_sums(2 * NB, checksum.sums_of(memoryview(block * NB)))
    store.sync()
    assert list(store.sums(2 * NB + 3, 2)) == [checksum.sum_of(block)] * 2
    assert list(store.read_sums(0, 2)) == [0, 0]                  # no object: 0, not zeros' sum
    fresh = RadosChunks.open(where, CS, readonly=True)            # not from the cache
    try:
        assert list(fresh.read_sums(2 * NB, NB)) == [checksum.sum_of(block)] * NB
    finally:
        fresh.close()
    store.release([2])
    assert store.count == 0 and store.known_zero(2)
    assert store.read_at(2 * CS, 4096) == bytes(4096)
    assert list(store.read_sums(2 * NB, 1)) == [0]
    import rados
    with pytest.raises(rados.ObjectNotFound):
        store.io.stat(oid(2))


def test_writes_of_a_fenced_client_fail_stop_at_sync(store, where):
    """A blocklisted client (another host took the pool over) has its writes refused:
    sync reports it as the failed fdatasync it stands for."""
    store.writev_at(0, [memoryview(b"a" * 4096)])
    store.sync()
    admin = connect(where)
    try:
        for addr in store.cluster.get_addrs().split(","):
            ret, _, err = admin.mon_command(json.dumps(
                {"prefix": "osd blocklist", "blocklistop": "add", "addr": addr.strip()}), b"")
            assert ret == 0, err
        store.writev_at(0, [memoryview(b"b" * 4096)])
        with pytest.raises(StoreFailed) as e:
            store.sync()
        assert e.value.errno == errno.ESHUTDOWN, e.value    # librados: ConnectionShutdown
        io = admin.open_ioctx(where.pool)
        io.set_namespace(where.namespace)
        assert io.read(oid(0), 1) == b"a"           # the fenced write never landed
        io.close()
    finally:
        admin.shutdown()


def test_an_unreachable_cluster_is_a_clear_error(tmp_path):
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\nmon host = v2:127.0.0.1:9\nauth cluster required = none\n"
                    "auth service required = none\nauth client required = none\n")
    with pytest.raises(CephUnavailable) as e:
        connect(Where("p", "n", str(conf)), timeout=2)
    assert "cannot connect to the Ceph cluster" in str(e.value)
