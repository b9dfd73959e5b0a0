"""Ports for tests that start distributed processes."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port nobody listens on now (so that runs sharing a machine do not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
