"""Loopback networking helpers: free ports and one-shot HTTP requests."""

from __future__ import annotations

import http.client
import random
import socket

#: Ports are picked below Linux's default ephemeral range (32768-60999), so they
#: cannot collide with the source ports of outgoing connections (curl, proxies).
_PORT_RANGE = (20000, 32767)
_handed_out: set[int] = set()


def free_port(host: str = "0.0.0.0") -> int:
    """Return a TCP port that nothing listens on now (on *host*; the default covers every IPv4 address)
    and that this process has not handed out before."""
    for _ in range(1000):
        port = random.randint(*_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port on {host} in {_PORT_RANGE}")


def http_request(host: str, port: int, path: str, method: str = "GET", body: bytes | None = None,
                 headers: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request on a fresh connection; return (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
