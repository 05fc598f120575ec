"""Shared helpers of the HTTP/2 downstream tests (tests/integration/test_h2_*.py, test_hostile_h2.py); no tests here.

- :class:`H2Client`: a well-behaved HTTP/2 client on a real socket (the h2 library's client side),
  for what curl cannot do: many streams at once, resetting one, request trailers, a closed window.
- :class:`RawH2`: an attacker on a real socket: frames written exactly as given (hyperframe, hpack),
  and the proxy's answer read frame by frame, with no client state machine to object to either.
- :func:`mesh_certs`, :func:`client_tls`: a throwaway CA and workload certificates, for sidecars
  started with ``--cert`` and for an mTLS client of a sidecar's inbound port.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

import hpack
from cryptography.hazmat.primitives import serialization
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import Settings
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, SettingsFrame

from tests.integration.test_identity_support import issue_cert, make_ca, spiffe

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Response:
    """What came back on one stream."""

    status: int = 0
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    trailers: dict = field(default_factory=dict)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code, if the stream was reset


class H2Client:
    """An HTTP/2 client (prior knowledge, or ALPN ``h2`` over ``tls``, an :class:`ssl.SSLContext`).

    ``settings`` are its SETTINGS (e.g. ``{SettingCodes.INITIAL_WINDOW_SIZE: 0}``); it gives every
    received byte back to the proxy's windows unless ``auto_ack`` is False.
    """

    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None, settings=None, auto_ack: bool = True):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock)
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        if settings:
            self.conn.local_settings = Settings(client=True, initial_values=settings)
        self.auto_ack = auto_ack
        self.responses: dict[int, Response] = {}
        self.terminated = None  # the ConnectionTerminated event (GOAWAY) if one came
        self.closed = False
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str, authority: str, *, method: str = "GET", headers=(), body: bytes | None = None,
                trailers=None, end: bool = True) -> int:
        """Open a stream with a request; returns its id. ``end=False`` leaves the body open."""
        stream_id = self.conn.get_next_available_stream_id()
        pairs = [(":method", method), (":scheme", "http"), (":path", path), (":authority", authority), *headers]
        last = body is None and trailers is None and end
        self.conn.send_headers(stream_id, [(n.encode(), v.encode()) for n, v in pairs], end_stream=last)
        if body is not None:
            self.conn.send_data(stream_id, body, end_stream=trailers is None and end)
        if trailers is not None:
            self.conn.send_headers(stream_id, [(n.encode(), v.encode()) for n, v in trailers], end_stream=True)
        self.responses[stream_id] = Response()
        self.flush()
        return stream_id

    def reset(self, stream_id: int, code: int = 8) -> None:
        """RST_STREAM (CANCEL by default)."""
        self.conn.reset_stream(stream_id, code)
        self.flush()

    def pump(self, timeout: float) -> bool:
        """Read once (up to ``timeout`` seconds) and handle the events; False when the connection is closed."""
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self._handle(event)
        self.flush()
        return True

    def _handle(self, event) -> None:
        response = self.responses.get(getattr(event, "stream_id", None))
        if isinstance(event, ResponseReceived):
            response.headers = {n.decode(): v.decode() for n, v in event.headers}
            response.status = int(response.headers[":status"])
        elif isinstance(event, DataReceived):
            response.body += event.data
            if self.auto_ack:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, TrailersReceived):
            response.trailers = {n.decode(): v.decode() for n, v in event.headers}
        elif isinstance(event, StreamEnded):
            response.ended = True
        elif isinstance(event, StreamReset):
            response.reset = event.error_code
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event

    def wait(self, condition, timeout: float = 10.0, what: str = "the responses") -> None:
        """Pump until ``condition()`` holds; AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0 or not self.pump(min(left, 0.5)) and not condition():
                raise AssertionError(f"waited {timeout}s for {what}; got {self.responses}, "
                                     f"terminated={self.terminated}, closed={self.closed}")

    def done(self, *stream_ids) -> bool:
        """Whether each stream has ended or was reset."""
        return all(self.responses[s].ended or self.responses[s].reset is not None for s in stream_ids)

    def close(self) -> None:
        self.sock.close()


class RawH2:
    """An attacker: writes frames as given, reads the proxy's frames as they come (no state machine)."""

    def __init__(self, port: int, settings=None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.encoder = hpack.Encoder()
        self._buffer = b""
        self.eof = False
        self.sock.sendall(PREFACE + SettingsFrame(0, settings=settings or {}).serialize())

    def block(self, path: str = "/", authority: str = "victim", extra=()) -> bytes:
        """An HPACK header block of a GET request (with this connection's encoder)."""
        return self.encoder.encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", path.encode()),
                                    (b":authority", authority.encode()), *extra])

    def headers(self, stream_id: int, block: bytes, flags=("END_HEADERS", "END_STREAM")) -> bytes:
        return HeadersFrame(stream_id, data=block, flags=list(flags)).serialize()

    def send(self, data: bytes) -> None:
        """Write ``data``; a proxy that closed the connection meanwhile is not an error here."""
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def frames(self, timeout: float):
        """Yield the proxy's frames until end of stream or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            while len(self._buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self._buffer[:9]))
                if len(self._buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self._buffer[9:9 + length]))
                self._buffer = self._buffer[9 + length:]
                yield frame
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                return
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return
            except OSError:
                data = b""
            if not data:
                self.eof = True
            self._buffer += data

    def first(self, kind, timeout: float = 10.0):
        """The first frame of class ``kind`` the proxy sends; AssertionError naming what came instead."""
        seen = []
        for frame in self.frames(timeout):
            if isinstance(frame, kind):
                return frame
            seen.append(type(frame).__name__)
        raise AssertionError(f"no {kind.__name__} within {timeout}s (eof={self.eof}); got {seen[-20:]}")

    def goaway(self, timeout: float = 10.0) -> GoAwayFrame:
        return self.first(GoAwayFrame, timeout)

    def close(self) -> None:
        self.sock.close()


def mesh_certs(directory: Path, namespace: str, *service_accounts):
    """A CA and a certificate per service account, in ``directory``: ``(ca, bundle path, options)``,
    ``options[account]`` being the sidecar options that make it that workload (``--cert`` ...)."""
    ca = make_ca("txmesh-test-ca")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bundle = directory / "bundle.pem"
    bundle.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    options = {}
    for account in service_accounts:
        cert, key = issue_cert(directory, account, ca, spiffe(namespace, account))
        options[account] = ["--cert", str(cert), "--key", str(key), "--ca-bundle", str(bundle),
                            "--service-account", account]
    return ca, bundle, options


def client_tls(ca, directory: Path, namespace: str, account: str) -> ssl.SSLContext:
    """An mTLS client context with a workload certificate of ``account``, offering ALPN ``h2``.

    The sidecar's certificate names a SPIFFE id, no host name: the chain is verified, not the name.
    """
    cert, key = issue_cert(directory, f"client-{account}", ca, spiffe(namespace, account))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(directory / "bundle.pem")
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    return context
