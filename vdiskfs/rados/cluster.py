"""Connecting to a Ceph cluster, with errors a user can act on.

A vdiskfs pool on RADOS lives in one RADOS namespace (its name) of one RADOS pool, so
that several vdiskfs pools share a RADOS pool and each lists only its own objects.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

CONNECT_TIMEOUT = 10           # seconds to reach the monitors


class CephUnavailable(OSError):
    """No cluster to talk to: the binding missing, a bad conf, monitors unreachable."""


@dataclass(frozen=True)
class Where:
    pool: str                  # the RADOS pool
    namespace: str             # the vdiskfs pool's name: its RADOS namespace
    conf: str = ""             # ceph.conf ("" : librados's default search)
    client: str = "admin"      # the client id (client.<id>)

    def record(self) -> dict:
        return {"kind": "rados", "pool": self.pool, "namespace": self.namespace,
                "conf": self.conf, "id": self.client}

    @classmethod
    def from_record(cls, rec: dict) -> "Where":
        return cls(rec["pool"], rec["namespace"], rec.get("conf", ""), rec.get("id", "admin"))


def check_record(rec: object) -> None:
    """ValueError unless ``rec`` is a store record this version understands."""
    if not isinstance(rec, dict) or rec.get("kind") != "rados":
        raise ValueError(f"unknown chunk store {rec!r:.60}")
    for key in ("pool", "namespace", "conf", "id"):
        if not isinstance(rec.get(key, ""), str):
            raise ValueError(f"bad {key} in the chunk store record")
    if not rec.get("pool") or not rec.get("namespace"):
        raise ValueError("the chunk store record names no RADOS pool or namespace")


def rados_module():
    try:
        import rados
    except ImportError:
        raise CephUnavailable(errno.ENOPKG, "the Python binding of librados is not "
                              "installed (bash scripts/setup.sh ceph installs it)") from None
    return rados


def connect(where: Where, timeout: float = CONNECT_TIMEOUT):
    """A connected rados.Rados for ``where``; CephUnavailable naming why not."""
    rados = rados_module()
    try:
        cluster = rados.Rados(conffile=where.conf or "", rados_id=where.client)
        t = str(int(timeout))
        for key, value in (("client_mount_timeout", t), ("rados_mon_op_timeout", t)):
            cluster.conf_set(key, value)
        cluster.connect(timeout=int(timeout))
    except rados.Error as e:
        raise CephUnavailable(getattr(e, "errno", None) or errno.EHOSTUNREACH,
                              f"cannot connect to the Ceph cluster "
                              f"({where.conf or 'default ceph.conf'}): {e}") from None
    return cluster


def open_ioctx(cluster, where: Where):
    """An Ioctx on ``where``'s RADOS pool and namespace."""
    rados = rados_module()
    try:
        io = cluster.open_ioctx(where.pool)
    except rados.ObjectNotFound:
        raise CephUnavailable(errno.ENOENT, f"the Ceph cluster has no RADOS pool "
                              f"{where.pool!r} (create it: ceph osd pool create "
                              f"{where.pool})") from None
    except rados.Error as e:
        raise CephUnavailable(errno.EIO, f"opening RADOS pool {where.pool!r}: {e}") from None
    io.set_namespace(where.namespace)
    return io
