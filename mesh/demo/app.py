"""The demo application: a small but real HTTP/1.1 server (with WebSocket echo).

It stands in for "the app" behind a sidecar, in ``meshctl demo`` and in the
integration tests::

    python -m mesh.demo.app --name NAME --port N [--address 127.0.0.1]

Behaviour by path (any method):

``/status/<code>``
    respond with that status code (200-599) and the echo document.
``/flaky/<n>``
    keyed by the ``x-request-id`` header: the first *n* requests with one key
    get 503, the following ones 200 (for retry tests).
``/delay/<ms>``
    respond after *ms* milliseconds, without blocking other connections.
``/bytes/<n>``
    stream *n* bytes of :func:`iter_pattern` content, with Content-Length, or
    chunked with ``?chunked=1``; produced lazily, honouring backpressure.
``/ws``
    WebSocket echo (RFC 6455): data frames come back unmasked, pings get pongs.
anything else
    200 with the echo document, JSON: ``service``, ``method``, ``path`` (the
    request target as received, query included), ``version``, ``headers``
    (lower-case names, repeated ones joined with ", "), ``body_bytes`` and
    ``body_sha256``. The body is streamed and hashed incrementally, so its size
    is unbounded and memory stays flat.

Every response carries ``x-demo-service: NAME``. Keep-alive, pipelining,
chunked and Content-Length request bodies and ``Expect: 100-continue`` work.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import http
import json
import re
import sys
from urllib.parse import parse_qs

import httptools
from twisted.internet import error, interfaces, protocol
from zope.interface import implementer

#: The repeating unit of ``/bytes`` content; :func:`iter_pattern` yields it.
PATTERN = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
_BLOCK = PATTERN * 1024  # 64 KiB, a whole number of patterns
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"
_MAX_QUEUED = 32  # pipelined requests held before we stop reading the socket
_MAX_WS_PAYLOAD = 16 * 1024 * 1024


def iter_pattern(size: int):
    """Yield *size* bytes of the deterministic ``/bytes`` content, in chunks of at most 64 KiB."""
    while size > 0:
        chunk = _BLOCK[: min(size, len(_BLOCK))]
        size -= len(chunk)
        yield chunk


class AppState:
    """What all connections of one app process share: its name and the /flaky counters."""

    def __init__(self, name: str):
        self.name = name
        self.flaky_seen: dict[str, int] = collections.Counter()


class Request:
    """One parsed request: its head, and a running count and hash of its body."""

    def __init__(self):
        self.method = ""
        self.target = b""
        self.version = "1.1"
        self.headers: dict[str, str] = {}
        self.keep_alive = True
        self.error: str | None = None  # set for a request that could not be parsed
        self.body_bytes = 0
        self.body_hash = hashlib.sha256()

    def add_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def echo(self, service: str) -> dict:
        """The JSON document that describes this request."""
        return {
            "service": service,
            "method": self.method,
            "path": self.target.decode("latin-1"),
            "version": self.version,
            "headers": self.headers,
            "body_bytes": self.body_bytes,
            "body_sha256": self.body_hash.hexdigest(),
        }


@implementer(interfaces.IPushProducer)
class _BodyStreamer:
    """Writes an iterator of chunks to a transport, pausing whenever the transport says so."""

    def __init__(self, transport, chunks, chunked: bool, done):
        self._transport = transport
        self._chunks = chunks
        self._chunked = chunked
        self._done = done
        self._paused = False

    def start(self) -> None:
        self._transport.registerProducer(self, True)
        self._pump()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._paused = True
        self._chunks = None

    def _pump(self) -> None:
        while not self._paused and self._chunks is not None:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._chunks = None
                if self._chunked:
                    self._transport.write(b"0\r\n\r\n")
                self._transport.unregisterProducer()
                self._done()
            elif self._chunked:
                self._transport.writeSequence([b"%x\r\n" % len(chunk), chunk, b"\r\n"])
            else:
                self._transport.write(chunk)


class _WebSocketEcho:
    """The server side of an RFC 6455 connection that echoes every data frame back."""

    def __init__(self, transport):
        self._transport = transport
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while self._transport is not None:
            frame = self._next_frame()
            if frame is None:
                return
            self._on_frame(*frame)

    def _next_frame(self):
        """Remove and return (fin, opcode, payload) from the buffer, or None if incomplete."""
        buf = self._buffer
        if len(buf) < 2:
            return None
        fin, opcode = buf[0] & 0x80, buf[0] & 0x0F
        masked, length = buf[1] & 0x80, buf[1] & 0x7F
        offset = 2
        if length >= 126:
            width = 2 if length == 126 else 8
            if len(buf) < offset + width:
                return None
            length = int.from_bytes(buf[offset : offset + width], "big")
            offset += width
        if not masked:
            self._close(1002, b"client frames must be masked")
            return None
        if length > _MAX_WS_PAYLOAD:
            self._close(1009, b"frame too large")
            return None
        if len(buf) < offset + 4 + length:
            return None
        mask = bytes(buf[offset : offset + 4]) * (length // 4 + 1)
        start = offset + 4
        masked_payload = int.from_bytes(buf[start : start + length], "big")
        payload = (masked_payload ^ int.from_bytes(mask[:length], "big")).to_bytes(length, "big")
        del buf[: start + length]
        return fin, opcode, payload

    def _on_frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode == 0x8:
            self._close(int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000, b"")
        elif opcode == 0x9:
            self._send(0x80, 0xA, payload)
        elif opcode in (0x0, 0x1, 0x2):
            self._send(fin, opcode, payload)

    def _send(self, fin: int, opcode: int, payload: bytes) -> None:
        size = len(payload)
        if size < 126:
            head = bytes([fin | opcode, size])
        elif size < 1 << 16:
            head = bytes([fin | opcode, 126]) + size.to_bytes(2, "big")
        else:
            head = bytes([fin | opcode, 127]) + size.to_bytes(8, "big")
        self._transport.writeSequence([head, payload])

    def _close(self, code: int, reason: bytes) -> None:
        self._send(0x80, 0x8, code.to_bytes(2, "big") + reason)
        self._transport.loseConnection()
        self._transport = None


class DemoHTTPProtocol(protocol.Protocol):
    """One client connection: parses requests with httptools and answers them in order."""

    def __init__(self, state: AppState):
        self.state = state
        self._parser = httptools.HttpRequestParser(self)
        self._request: Request | None = None
        self._queue: collections.deque[Request] = collections.deque()
        self._busy = False  # a response is being written
        self._dispatching = False
        self._reading_paused = False
        self._held = b""  # bytes after an upgrade request, for the WebSocket
        self._websocket: _WebSocketEcho | None = None
        self._delayed = None
        self._lost = False

    # -- httptools callbacks -------------------------------------------------
    def on_message_begin(self) -> None:
        self._request = Request()

    def on_url(self, url: bytes) -> None:
        self._request.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._request.add_header(name, value)

    def on_headers_complete(self) -> None:
        req = self._request
        req.method = self._parser.get_method().decode("ascii")
        req.version = self._parser.get_http_version()
        req.keep_alive = self._parser.should_keep_alive()
        if req.headers.get("expect", "").lower() == "100-continue" and not (self._busy or self._queue):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._request.body_bytes += len(body)
        self._request.body_hash.update(body)

    def on_message_complete(self) -> None:
        self._queue.append(self._request)
        self._request = None
        if len(self._queue) >= _MAX_QUEUED and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    # -- connection ----------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._websocket is not None:
            self._websocket.feed(data)
            return
        if self._parser is None:  # after an upgrade or a parse error; the socket is paused
            self._held += data
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._stop_parsing()
            self._held = data[exc.args[0] :]
        except httptools.HttpParserError as exc:
            self._stop_parsing()
            bad = Request()
            bad.error, bad.keep_alive = f"malformed request: {exc}", False
            self._queue.append(bad)
        self._dispatch()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._lost = True
        self._queue.clear()
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()

    def _stop_parsing(self) -> None:
        """No more HTTP on this connection: hold further bytes, stop reading the socket."""
        self._parser = None
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    # -- request dispatch ----------------------------------------------------
    def _dispatch(self) -> None:
        """Answer queued requests in order, one at a time (a loop, so pipelining cannot recurse)."""
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while not self._busy and self._queue and not self._lost:
                self._busy = True
                self._handle(self._queue.popleft())
        finally:
            self._dispatching = False

    def _finish(self, req: Request) -> None:
        """The response to *req* is fully written: close, or go on with the next request."""
        self._busy = False
        if self._lost:
            return
        if not req.keep_alive or (self._parser is None and not self._queue):
            self.transport.loseConnection()
            return
        if self._reading_paused and self._parser is not None and len(self._queue) < _MAX_QUEUED:
            self._reading_paused = False
            self.transport.resumeProducing()
        self._dispatch()

    _ROUTES = (
        (re.compile(r"/status/(\d+)"), "_handle_status"),
        (re.compile(r"/flaky/(\d+)"), "_handle_flaky"),
        (re.compile(r"/delay/(\d+)"), "_handle_delay"),
        (re.compile(r"/bytes/(\d+)"), "_handle_bytes"),
        (re.compile(r"/ws"), "_handle_websocket"),
    )

    def _handle(self, req: Request) -> None:
        if req.error:
            self._respond(req, 400, {"error": req.error, "hint": "send valid HTTP/1.1"})
            return
        try:
            url = httptools.parse_url(req.target)
        except httptools.HttpParserInvalidURLError:
            self._respond(req, 400, {"error": f"invalid request target {req.target!r}"})
            return
        path = (url.path or b"/").decode("latin-1")
        query = parse_qs((url.query or b"").decode("latin-1"))
        for pattern, handler in self._ROUTES:
            match = pattern.fullmatch(path)
            if match:
                getattr(self, handler)(req, query, *match.groups())
                return
        self._respond(req, 200, req.echo(self.state.name))

    def _handle_status(self, req: Request, query, code: str) -> None:
        status = int(code)
        if not 200 <= status <= 599:
            self._respond(req, 400, {"error": f"/status/{code}: the code must be 200-599"})
            return
        self._respond(req, status, req.echo(self.state.name))

    def _handle_flaky(self, req: Request, query, count: str) -> None:
        key = req.headers.get("x-request-id")
        if key is None:
            self._respond(req, 400, {"error": "/flaky/<n> counts attempts per x-request-id: send that header"})
            return
        seen = self.state.flaky_seen[key] = self.state.flaky_seen[key] + 1
        status = 503 if seen <= int(count) else 200
        self._respond(req, status, dict(req.echo(self.state.name), attempt=seen))

    def _handle_delay(self, req: Request, query, millis: str) -> None:
        from twisted.internet import reactor

        self._delayed = reactor.callLater(int(millis) / 1000.0, self._respond, req, 200, req.echo(self.state.name))

    def _handle_bytes(self, req: Request, query, size: str) -> None:
        length = int(size)
        chunked = query.get("chunked") == ["1"] and req.version != "1.0"
        framing = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(length))]
        self._write_head(req, 200, [("Content-Type", "application/octet-stream"), *framing])
        if req.method == "HEAD":
            self._finish(req)
            return
        _BodyStreamer(self.transport, iter_pattern(length), chunked, lambda: self._finish(req)).start()

    def _handle_websocket(self, req: Request, query) -> None:
        key = req.headers.get("sec-websocket-key")
        if self._parser is not None or req.headers.get("upgrade", "").lower() != "websocket" or not key:
            self._respond(req, 400,
                          {"error": "/ws expects a WebSocket upgrade (Upgrade: websocket, Sec-WebSocket-Key)"})
            return
        accept = base64.b64encode(hashlib.sha1(key.encode("latin-1") + _WS_GUID).digest()).decode()
        req.keep_alive = True
        self._write_head(req, 101, [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                    ("Sec-WebSocket-Accept", accept)])
        self._websocket = _WebSocketEcho(self.transport)
        held, self._held = self._held, b""
        self._reading_paused = False
        self.transport.resumeProducing()
        self._websocket.feed(held)

    # -- response writing ----------------------------------------------------
    def _write_head(self, req: Request, status: int, headers) -> None:
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}", f"x-demo-service: {self.state.name}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if not req.keep_alive:
            lines.append("Connection: close")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        what = req.error or f"{req.method} {req.target.decode('latin-1')}"
        print(f"{self.state.name} {what} -> {status}", flush=True)

    def _respond(self, req: Request, status: int, document: dict) -> None:
        """Send a complete JSON response (no body for HEAD, 204 and 304), then finish."""
        if self._lost:
            return
        body = b"" if status in (204, 304) else json.dumps(document).encode() + b"\n"
        headers = [("Content-Type", "application/json")] if body else []
        if status != 204:
            headers.append(("Content-Length", str(len(body))))
        self._write_head(req, status, headers)
        if body and req.method != "HEAD":
            self.transport.write(body)
        self._finish(req)


class DemoHTTPFactory(protocol.Factory):
    """Makes a :class:`DemoHTTPProtocol` per connection, all sharing one :class:`AppState`."""

    def __init__(self, name: str):
        self.state = AppState(name)

    def buildProtocol(self, addr):
        return DemoHTTPProtocol(self.state)


def main(argv=None) -> int:
    """Run the demo app until SIGINT/SIGTERM."""
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(prog="python -m mesh.demo.app", description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="service name reported in every response")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    args = parser.parse_args(argv)
    try:
        port = reactor.listenTCP(args.port, DemoHTTPFactory(args.name), interface=args.address, backlog=1024)
    except error.CannotListenError as exc:
        print(f"demo app {args.name}: cannot listen on {args.address}:{args.port} ({exc.socketError}); "
              "choose another --port or stop the process that holds it", file=sys.stderr)
        return 2
    print(f"demo app {args.name} listening on {args.address}:{port.getHost().port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
