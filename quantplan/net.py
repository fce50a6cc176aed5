"""Reachability of a `host:port` address (Ray's GCS), without importing Ray: the HTTP API's health check
(`quantplan.service.api`) and the Ray driver's fail-fast check (`quantplan.workers.tasks`) share it. Standard
library only, so any layer may import it."""

from __future__ import annotations

import socket


class AddressError(ValueError):
    """An address that is not `host:port` (optionally `scheme://host:port`)."""


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise AddressError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379 or ray://head:10001)")
    return host, int(port)


def unreachable(address: str, timeout: float) -> str | None:
    """None when the address accepts a TCP connection within `timeout` seconds, else why not (a bad address
    raises `AddressError`)."""
    try:
        socket.create_connection(host_port(address), timeout=timeout).close()
    except OSError as e:
        return str(e.strerror or e)
    return None
