"""A small HTTP/2 app (h2c, prior knowledge) for the upstream HTTP/2 tests, on asyncio and ``h2``.

::

    python tests/apps/h2_app.py --port PORT [--address A] [--max-streams N]
                                [--goaway-after N --goaway-refuse R]

Every request gets ``200`` with a JSON body (``path``, ``method``, ``headers``, ``body_bytes``,
``trailers``: the request's trailers, ``connection``: the number of the connection it came on,
``stream``: its stream id), unless its path says otherwise:

- ``/stats``: ``connections`` accepted so far, ``open`` now, ``max_concurrent``: the most streams
  one connection had open at once;
- ``/trailers``: the JSON body, then trailers ``grpc-status: 0`` and ``x-body-bytes: N``;
- ``/reset``: RST_STREAM(INTERNAL_ERROR) instead of a response;
- ``/drop/KEY/N``: the first N requests with this KEY make the app cut its connection (TCP
  reset, every stream on it lost); later ones are answered;
- ``/bytes/N``: N bytes of body (sent as the flow-control windows allow).

A request header ``x-delay-ms: MS`` delays its response.  ``--max-streams`` is the
SETTINGS_MAX_CONCURRENT_STREAMS the app announces.  ``--goaway-after N``: on every connection,
when the N-th request arrives, the app sends GOAWAY with the stream id of request N-R as its last
stream id (R is ``--goaway-refuse``, default 2), answers the requests up to it, never answers
the ones after it, and closes the connection once the answered ones are done.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from h2.config import H2Configuration
from h2.connection import ConnectionInputs, ConnectionState, H2Connection, H2ConnectionStateMachine
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings


class _KeepOpenAfterGoaway(H2ConnectionStateMachine):
    """h2 closes a connection that sends GOAWAY; this app answers the streams below it first."""

    def process_input(self, input_):
        if input_ is ConnectionInputs.SEND_GOAWAY and self.state is ConnectionState.SERVER_OPEN:
            return []
        return super().process_input(input_)


class Stats:
    """What every connection of the app shares."""

    def __init__(self, options):
        self.options = options
        self.connections = 0
        self.open = 0
        self.max_concurrent = 0
        self.dropped = {}  # /drop/KEY/N -> connections cut for it so far


class _Request:
    __slots__ = ("headers", "body", "trailers", "outgoing", "end_after")

    def __init__(self, headers):
        self.headers = headers
        self.body = 0
        self.trailers = []
        self.outgoing = b""  # body bytes waiting for the flow-control windows
        self.end_after = None  # trailers to send after them ([] for none)


class H2App(asyncio.Protocol):
    """One h2c connection."""

    def __init__(self, stats: Stats):
        self.stats = stats
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.state_machine = _KeepOpenAfterGoaway()
        self.requests = {}
        self.arrived = []  # stream ids in order of arrival
        self.last_stream = None  # set by our GOAWAY: streams above it are never answered
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.stats.connections += 1
        self.stats.open += 1
        self.number = self.stats.connections
        self.h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: self.stats.options.max_streams})
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc):
        self.stats.open -= 1

    def flush(self):
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data):
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.flush()
            self.transport.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self._request(event.stream_id, event.headers)
            elif isinstance(event, DataReceived):
                request = self.requests.get(event.stream_id)
                if request is not None:
                    request.body += len(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, TrailersReceived):
                request = self.requests.get(event.stream_id)
                if request is not None:
                    request.trailers = [(name.decode(), value.decode()) for name, value in event.headers]
            elif isinstance(event, StreamEnded):
                self._complete(event.stream_id)
            elif isinstance(event, StreamReset):
                self.requests.pop(event.stream_id, None)
            elif isinstance(event, WindowUpdated):
                for stream_id in list(self.requests):
                    self._send_body(stream_id)
            elif isinstance(event, ConnectionTerminated):
                self.transport.close()
        self.flush()

    def _request(self, stream_id, headers):
        self.requests[stream_id] = _Request(headers)
        self.arrived.append(stream_id)
        concurrent = len(self.requests)
        self.stats.max_concurrent = max(self.stats.max_concurrent, concurrent)
        options = self.stats.options
        if options.goaway_after and len(self.arrived) == options.goaway_after and self.last_stream is None:
            self.last_stream = self.arrived[options.goaway_after - 1 - options.goaway_refuse]
            self.h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=self.last_stream)

    def _complete(self, stream_id):
        request = self.requests.get(stream_id)
        if request is None:
            return
        if self.last_stream is not None and stream_id > self.last_stream:
            self.requests.pop(stream_id)  # above our GOAWAY: never processed
            self._close_when_done()
            return
        headers = dict(request.headers)
        delay = int(headers.get(b"x-delay-ms", b"0")) / 1000
        asyncio.get_running_loop().call_later(delay, self._respond, stream_id)

    def _respond(self, stream_id):
        request = self.requests.get(stream_id)
        if request is None or self.transport.is_closing():
            return
        headers = dict(request.headers)
        path = headers[b":path"].decode()
        try:
            if path == "/reset":
                self.requests.pop(stream_id)
                self.h2.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)
            elif path.startswith("/drop/") and self.stats.dropped.get(path, 0) < int(path.rsplit("/", 1)[1]):
                self.stats.dropped[path] = self.stats.dropped.get(path, 0) + 1
                self.transport.abort()
                return
            elif path.startswith("/bytes/"):
                size = int(path.rsplit("/", 1)[1])
                self.h2.send_headers(stream_id, [(b":status", b"200"), (b"content-length", str(size).encode())])
                request.outgoing = bytes(size)
                request.end_after = []
                self._send_body(stream_id)
            else:
                body = json.dumps(self._describe(path, request, stream_id)).encode()
                self.h2.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/json")])
                request.outgoing = body
                request.end_after = ([(b"grpc-status", b"0"), (b"x-body-bytes", str(request.body).encode())]
                                     if path == "/trailers" else [])
                self._send_body(stream_id)
        except StreamClosedError:
            self.requests.pop(stream_id, None)
        self.flush()
        self._close_when_done()

    def _describe(self, path, request, stream_id):
        if path == "/stats":
            stats = self.stats
            return {"connections": stats.connections, "open": stats.open, "max_concurrent": stats.max_concurrent}
        headers = {}
        for name, value in request.headers:
            headers.setdefault(name.decode(), value.decode())
        return {"path": path, "method": headers.get(":method"), "headers": headers, "body_bytes": request.body,
                "trailers": request.trailers, "connection": self.number, "stream": stream_id}

    def _send_body(self, stream_id):
        request = self.requests.get(stream_id)
        if request is None or request.end_after is None:
            return
        try:
            while request.outgoing:
                window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
                if window <= 0:
                    return
                chunk, request.outgoing = request.outgoing[:window], request.outgoing[window:]
                self.h2.send_data(stream_id, chunk)
            if request.end_after:
                self.h2.send_headers(stream_id, request.end_after, end_stream=True)
            else:
                self.h2.end_stream(stream_id)
        except StreamClosedError:
            pass
        self.requests.pop(stream_id, None)
        self.flush()
        self._close_when_done()

    def _close_when_done(self):
        if self.last_stream is None:
            return
        if not any(stream_id <= self.last_stream for stream_id in self.requests):
            self.flush()
            self.transport.close()


async def serve(options):
    stats = Stats(options)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: H2App(stats), options.address, options.port)
    print(f"h2 app listening on {options.address}:{options.port}", flush=True)
    async with server:
        await server.serve_forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-streams", type=int, default=100)
    parser.add_argument("--goaway-after", type=int, default=0)
    parser.add_argument("--goaway-refuse", type=int, default=2)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
