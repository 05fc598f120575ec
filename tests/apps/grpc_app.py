"""A small gRPC service for the gRPC tests, on grpcio's generic handlers (no protoc: messages are raw bytes).

::

    python tests/apps/grpc_app.py --port PORT --name NAME [--address A]

Service ``echo.Echo`` (plaintext HTTP/2, as an app behind its sidecar), methods:

- ``Unary``: answers ``NAME:`` followed by the request bytes;
- ``Count`` (server streaming): the request is a number N; answers N messages ``NAME:0`` ..;
- ``Sum`` (client streaming): answers ``NAME:K:TOTAL``, K messages of TOTAL bytes received;
- ``Chat`` (bidirectional): answers each message at once, ``NAME:`` followed by it;
- ``Seen``: the request is a key; answers JSON ``{"calls": C, "time_remaining": [...]}``: the calls
  made with metadata ``x-key: KEY`` so far, and the deadline each had left when it arrived (None:
  no deadline; the app reads what the ``grpc-timeout`` it got leaves).

Metadata changes any call: ``x-delay-ms: MS``: the answer comes after MS milliseconds (or when
the call is cancelled); ``x-fail: N`` with ``x-key: KEY``: the first N calls with that key then
fail with ``UNAVAILABLE``; ``x-unavailable: NAME``: the app named NAME fails every call with
``UNAVAILABLE``.  Any other method gets ``UNIMPLEMENTED`` from grpcio.
"""

from __future__ import annotations

import argparse
import json
import threading
from concurrent import futures

import grpc

SERVICE = "echo.Echo"


class Echo:
    """The methods, and what the calls with an ``x-key`` left behind."""

    def __init__(self, name: str):
        self.name = name
        self.prefix = name.encode() + b":"
        self.lock = threading.Lock()
        self.calls = {}  # key -> number of calls
        self.remaining = {}  # key -> [seconds left when each call arrived, or None]

    def _arrived(self, context) -> None:
        """Record the call, then fail it or delay it as its metadata asks."""
        metadata = dict(context.invocation_metadata())
        if metadata.get("x-unavailable") == self.name:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} answers every call UNAVAILABLE on purpose")
        key = metadata.get("x-key")
        calls = 0
        if key is not None:
            with self.lock:
                calls = self.calls[key] = self.calls.get(key, 0) + 1
                self.remaining.setdefault(key, []).append(context.time_remaining())
        delay = int(metadata.get("x-delay-ms", 0)) / 1000.0
        if delay:
            done = threading.Event()
            context.add_callback(done.set)  # the call ended: cancelled, or its deadline passed
            done.wait(delay)
        if calls and calls <= int(metadata.get("x-fail", 0)):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"failing call {calls} of key {key} on purpose")

    def unary(self, request, context):
        self._arrived(context)
        return self.prefix + request

    def count(self, request, context):
        self._arrived(context)
        for index in range(int(request)):
            yield self.prefix + b"%d" % index

    def sum(self, requests, context):
        self._arrived(context)
        count = total = 0
        for message in requests:
            count += 1
            total += len(message)
        return self.prefix + b"%d:%d" % (count, total)

    def chat(self, requests, context):
        self._arrived(context)
        for message in requests:
            yield self.prefix + message

    def seen(self, request, context):
        key = request.decode()
        with self.lock:
            return json.dumps({"calls": self.calls.get(key, 0), "time_remaining": self.remaining.get(key, [])}).encode()

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler of service ``echo.Echo``: bytes in, bytes out."""
        raw = {"request_deserializer": None, "response_serializer": None}
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary, **raw),
            "Count": grpc.unary_stream_rpc_method_handler(self.count, **raw),
            "Sum": grpc.stream_unary_rpc_method_handler(self.sum, **raw),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat, **raw),
            "Seen": grpc.unary_unary_rpc_method_handler(self.seen, **raw),
        })


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((Echo(args.name).handler(),))
    server.add_insecure_port(f"{args.address}:{args.port}")
    server.start()
    print(f"grpc app {args.name} listening on {args.address}:{args.port}", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(0)


if __name__ == "__main__":
    main()
