"""HTTP/1.1 and WebSocket spoken by hand over a plain socket, for tests that need exact bytes on the wire."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
from dataclasses import dataclass

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"


@dataclass
class RawResponse:
    """One parsed response. ``headers``: lower-case names, repeated ones joined with ", "."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


class RawConnection:
    """A TCP connection on which the test writes raw bytes and reads parsed responses and frames."""

    def __init__(self, host: str, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def at_eof(self) -> bool:
        """Whether the peer closed the connection (reads one byte: use only when no data is expected)."""
        return self.rfile.read(1) == b""

    def read_response(self, head_only: bool = False) -> RawResponse:
        """Read one response (Content-Length, chunked or close-delimited body; none when *head_only*)."""
        status_line = self.rfile.readline()
        if not status_line:
            raise ConnectionError("connection closed before a response arrived")
        _version, status, reason = (status_line.decode("latin-1").rstrip("\r\n").split(" ", 2) + [""])[:3]
        headers = self._read_headers()
        code = int(status)
        if head_only or code in (101, 204, 304) or 100 <= code < 200:
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._read_chunked()
        elif "content-length" in headers:
            body = self._read_exactly(int(headers["content-length"]))
        else:
            body = self.rfile.read()
        return RawResponse(code, reason, headers, body)

    def _read_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        while (line := self.rfile.readline().decode("latin-1").rstrip("\r\n")):
            name, _, value = line.partition(":")
            key, value = name.strip().lower(), value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return headers

    def _read_exactly(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) != size:
            raise ConnectionError(f"connection closed after {len(data)} of {size} body bytes")
        return data

    def _read_chunked(self) -> bytes:
        parts = []
        while (size := int(self.rfile.readline().split(b";")[0], 16)):
            parts.append(self._read_exactly(size))
            self.rfile.readline()
        self._read_headers()  # trailers
        return b"".join(parts)

    # -- WebSocket (client side) --------------------------------------------
    def websocket_handshake(self, path: str = "/ws", host: str = "localhost") -> RawResponse:
        """Send an RFC 6455 upgrade request; return the response after checking Sec-WebSocket-Accept."""
        key = base64.b64encode(os.urandom(16))
        self.send(b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path.encode(), host.encode(), key))
        response = self.read_response()
        expected = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        if response.status == 101 and response.headers.get("sec-websocket-accept") != expected:
            got = response.headers.get("sec-websocket-accept")
            raise AssertionError(f"Sec-WebSocket-Accept {got!r} != {expected!r}")
        return response

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        """Send one masked frame, as a client must."""
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = bytes([fin << 7 | opcode, 0x80 | size])
        elif size < 1 << 16:
            head = bytes([fin << 7 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
        else:
            head = bytes([fin << 7 | opcode, 0x80 | 127]) + size.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.send(head + mask + masked)

    def read_frame(self) -> tuple[bool, int, bytes]:
        """Read one frame from the server, which must be unmasked; return (fin, opcode, payload)."""
        first, second = self._read_exactly(2)
        if second & 0x80:
            raise AssertionError("server-to-client WebSocket frames must not be masked")
        size = second & 0x7F
        if size >= 126:
            size = int.from_bytes(self._read_exactly(2 if size == 126 else 8), "big")
        return bool(first & 0x80), first & 0x0F, self._read_exactly(size)
