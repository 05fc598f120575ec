"""Loopback networking helpers: free ports, one-shot HTTP requests, another process's connections
(their keepalive settings), whether a peer closed a socket, and a threaded raw-socket server."""

from __future__ import annotations

import http.client
import os
import random
import socket
import threading

#: Ports are picked below Linux's default ephemeral range (32768-60999), so they
#: cannot collide with the source ports of outgoing connections (curl, proxies).
_PORT_RANGE = (20000, 32767)
_handed_out: set[int] = set()


def _worker_range() -> tuple[int, int]:
    """This test process's share of :data:`_PORT_RANGE`: under pytest-xdist each worker (gw0, gw1, ...)
    gets its own slice, so two workers never hand out the same port; otherwise the whole range."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if count <= 1 or not worker.startswith("gw"):
        return _PORT_RANGE
    low, high = _PORT_RANGE
    size = (high - low + 1) // count
    index = int(worker[2:])
    return low + index * size, low + (index + 1) * size - 1


def free_port(host: str = "0.0.0.0") -> int:
    """Return a TCP port that nothing listens on now (on *host*; the default covers every IPv4 address)
    and that this process has not handed out before."""
    ports = _worker_range()
    for _ in range(1000):
        port = random.randint(*ports)
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
    raise RuntimeError(f"no free TCP port on {host} in {ports}")


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


#: ``pidfd_getfd(2)`` (Linux 5.6): a copy of another process's file descriptor (root, or ptrace rights).
_SYS_PIDFD_GETFD = 438


def _keepalive(sock) -> dict | None:
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE):
        return None
    return {"time": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "probes": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)}


def connections_to(pid: int, peer_port: int) -> list[dict]:
    """The TCP connections process ``pid`` has to ``peer_port`` (on any address), read from the sockets
    themselves: each is copied into this process with ``pidfd_getfd(2)`` and asked with ``getsockname`` and
    ``getsockopt``. Each entry: ``local_port``, and ``keepalive``: None when SO_KEEPALIVE is off, else
    ``{"time", "interval", "probes"}`` (TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT: the kernel's values, the
    system's where none was set)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    found = []
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except FileNotFoundError:  # closed meanwhile
                continue
            copy = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if copy < 0:
                continue  # closed meanwhile
            sock = socket.socket(fileno=copy)
            try:
                if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                try:
                    peer = sock.getpeername()
                except OSError:  # a listener, or not connected (yet)
                    continue
                if peer[1] == peer_port:
                    found.append({"local_port": sock.getsockname()[1], "keepalive": _keepalive(sock)})
            finally:
                sock.close()  # our copy only: the process's descriptor stays open
    finally:
        os.close(pidfd)
    return found


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer has closed ``sock`` (a FIN or a reset); never blocks."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


class ThreadedSocketServer:
    """A loopback TCP server that hands each accepted connection to :meth:`answer` in a thread of its own:
    for upstreams that must misbehave in ways no real server does on purpose.  ``address`` is its
    ``(host, port)``; :meth:`close` stops accepting."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = self.sock.getsockname()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(connection,), daemon=True).start()

    def answer(self, connection: socket.socket) -> None:
        """Serve one connection (and close it when done)."""
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()
