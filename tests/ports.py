"""Loopback TCP ports for the suite and bench/: one helper, used by all."""

from __future__ import annotations

import socket

__all__ = ["free_port"]

_given_ports: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` nobody listens on now (bound, then released; never the
    same one twice in a process, so two callers never race for one port)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _given_ports:
            _given_ports.add(port)
            return port
    raise RuntimeError("no free loopback port")
