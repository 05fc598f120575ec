"""Shared helpers of the hostile-input HTTP/1 tests (test_hostile_http1.py, test_fuzz_http1.py); no tests here.

- :class:`RecordingApp`: a raw-socket HTTP/1.1 app that records every request exactly as the proxy forwarded
  it, and every byte it received after switching protocols, so that a test asserts what the app got
- :func:`send_and_close`: write bytes, half-close, read every response until the proxy closes
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field

from tests.harness import RawConnection, RawResponse
from tests.harness.rawhttp import WS_GUID


@dataclass
class AppRequest:
    """One request as the app parsed it.

    ``headers``: ``(lower-case name, value)`` pairs, the value as it was on the wire after the colon and the
    whitespace before it (whitespace after it is kept, so a test sees exactly what was forwarded).
    """

    method: str
    target: str
    version: str
    headers: list
    body: bytes
    connection: int

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (trimmed, repeats joined with ", "), as a typical app reads it."""
        values = [value.strip(" \t") for key, value in self.headers if key == name]
        return ", ".join(values) if values else None

    def names(self) -> set:
        return {key for key, _ in self.headers}


@dataclass
class _Parsed:
    request: AppRequest
    rest: bytes = field(repr=False)


class RecordingApp:
    """A keep-alive HTTP/1.1 server on 127.0.0.1 that parses requests the way a simple app does.

    It frames a body by Transfer-Encoding (chunked) or Content-Length (trimmed), and takes a request without
    either as bodiless, so bytes forwarded unframed become the next request, as in a real app. Every
    complete request is recorded in :attr:`requests` (as soon as its bytes are in, before any response
    is sent) and answered 200 with a JSON echo (method, target, headers, body length).

    Like a real app, it switches protocols when asked: ``Upgrade: websocket`` (a 101 with the right
    Sec-WebSocket-Accept) and ``Upgrade: h2c`` (an h2c-capable app), and the target ``/switch-anyway``
    gets a 101 whatever the request said. After a switch, everything the connection receives is recorded
    in :attr:`tunnelled` and echoed back.
    """

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address, self.port = self.sock.getsockname()
        self.lock = threading.Lock()
        self.requests: list[AppRequest] = []
        self.tunnelled: list[bytes] = []
        self.unparsable: list[bytes] = []
        self._connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()
            self.tunnelled.clear()
            self.unparsable.clear()

    def snapshot(self) -> tuple:
        """``(requests, tunnelled, unparsable)``: copies, taken under the lock."""
        with self.lock:
            return list(self.requests), list(self.tunnelled), list(self.unparsable)

    def targets(self) -> list:
        return [request.target for request in self.snapshot()[0]]

    # -- serving -------------------------------------------------------------------------------
    def _accept(self):
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self._connections += 1
            threading.Thread(target=self._serve, args=(connection, self._connections), daemon=True).start()

    def _serve(self, connection, number):
        buffer, switched = b"", False
        with connection:
            while True:
                try:
                    data = connection.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                if switched:
                    with self.lock:
                        self.tunnelled.append(data)
                    if not _send(connection, data):
                        return
                    continue
                buffer += data
                answers = []
                while not switched:
                    try:
                        parsed = _parse_request(buffer, number)
                    except ValueError:
                        with self.lock:
                            self.unparsable.append(buffer)
                        _send(connection, b"".join(answers))
                        return
                    if parsed is None:
                        break
                    buffer = parsed.rest
                    with self.lock:
                        self.requests.append(parsed.request)
                    answer, switched = _answer(parsed.request)
                    answers.append(answer)
                if switched and buffer:
                    with self.lock:
                        self.tunnelled.append(buffer)
                if not _send(connection, b"".join(answers)):
                    return


def _send(connection, data: bytes) -> bool:
    """Send all of ``data``; False if the proxy has closed or reset the connection meanwhile."""
    try:
        connection.sendall(data)
    except OSError:
        return False
    return True


def _parse_request(buffer: bytes, number: int):
    """One complete request from the start of ``buffer`` (None: not all there yet); ValueError if garbage."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buffer[:end].decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(line)
        headers.append((name.lower(), value.lstrip(" \t")))
    request = AppRequest(method, target, version, headers, b"", number)
    rest = buffer[end + 4:]
    if "chunked" in (request.header("transfer-encoding") or "").lower():
        body, rest = _read_chunked(rest)
        if body is None:
            return None
        request.body = body
    elif request.header("content-length") is not None:
        size = int(request.header("content-length"))
        if len(rest) < size:
            return None
        request.body, rest = rest[:size], rest[size:]
    return _Parsed(request, rest)


def _read_chunked(data: bytes):
    """``(body, rest)`` of a chunked body at the start of ``data``, or ``(None, data)`` if incomplete."""
    body, position = [], 0
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            return None, data
        size = int(data[position:line_end].split(b";")[0], 16)
        position = line_end + 2
        if size == 0:
            trailer_end = data.find(b"\r\n", position)
            while trailer_end > position:  # skip trailer fields
                position = trailer_end + 2
                trailer_end = data.find(b"\r\n", position)
            if trailer_end < 0:
                return None, data
            return b"".join(body), data[trailer_end + 2:]
        if len(data) < position + size + 2:
            return None, data
        body.append(data[position:position + size])
        position += size + 2


def _answer(request: AppRequest) -> tuple:
    """``(response bytes, switched)`` for one request."""
    upgrade = (request.header("upgrade") or "").lower()
    asked = "upgrade" in (request.header("connection") or "").lower()
    if asked and upgrade == "websocket":
        key = (request.header("sec-websocket-key") or "").encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept), True
    if asked and upgrade == "h2c":
        return b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", True
    if request.target == "/switch-anyway":
        return b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: anything\r\n\r\n", True
    body = json.dumps({"method": request.method, "target": request.target, "headers": request.headers,
                       "body_bytes": len(request.body)}).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Recorded-By: app\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)), False


def send_and_close(port: int, data: bytes, timeout: float = 10.0) -> list[RawResponse]:
    """Write ``data`` to 127.0.0.1:``port``, half-close, and read responses until the proxy closes.

    The proxy answers what it accepted, in order, then closes (a half-closed client gets no more), so the
    list is complete when this returns. A response cut short raises. After a 101 the rest is no HTTP: it is
    read to the end and dropped.
    """
    responses = []
    with RawConnection("127.0.0.1", port, timeout=timeout) as conn:
        conn.send(data)
        conn.sock.shutdown(socket.SHUT_WR)
        while conn.rfile.peek(1):
            responses.append(conn.read_response())
            if responses[-1].status == 101:
                conn.rfile.read()
                break
    return responses
