"""What ``vdiskfs mount --nbd…`` asked for: endpoints, read-only exports, TLS files.

Parsed by the CLI (no trio or ssl needed) and handed whole to the daemon's NbdServer.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    kind: str             # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (``tcp:[::1]:PORT`` for IPv6)."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return Endpoint("unix", path=os.path.abspath(rest))
    if kind == "tcp" and rest:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return Endpoint("tcp", host=host, port=int(port))
    raise ValueError(f"bad NBD endpoint {text!r}: use unix:PATH or tcp:HOST:PORT")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class NbdConfig:
    endpoints: tuple[Endpoint, ...]
    readonly: bool = False                        # every export
    readonly_exports: frozenset[str] = frozenset()   # these VDisks' exports
    tls: tuple[str, str, str | None] | None = None   # cert, key, CA (PEM files)

    def readonly_for(self, name: str) -> bool:
        return self.readonly or name in self.readonly_exports
