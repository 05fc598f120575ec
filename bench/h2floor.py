"""The floor of the HTTP/2 codecs: instructions the ``h2`` library alone needs per request.

No proxy, no socket, no reactor: one h2 connection configured as the proxy's HTTP/2 client codec
(:mod:`mesh.proxy.codec.h2_client`: its configuration and HPACK, :mod:`mesh.proxy.codec.hpack_c`) sends a request
(the headers :func:`~mesh.proxy.codec.h2_client.request_headers` sends: a fresh x-request-id each
time) to one configured as its server codec (:mod:`mesh.proxy.codec.h2_server`), which answers with
nginx's response headers (as :func:`~mesh.proxy.codec.h2_server._response_headers` forwards them)
and a 1 KiB body; the client reads it and gives the window back.  That is the h2 work of one request
on both sides of one HTTP/2 hop: what the client sidecar of the ``txmesh-pair-h2`` bench case does
on its two sides, whatever the rest of the proxy costs.

Run it (valgrind's callgrind counts the instructions, twice: warm-up only, then warm-up and
``--requests`` more; the difference divided by ``--requests`` is the figure)::

    .venv/bin/python -m bench.h2floor --requests 1000
    .venv/bin/python -m bench.h2floor --requests 1000 --codec nghttp2   # the same hop on libnghttp2
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import uuid

from h2.events import DataReceived

_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"nginx.bench.svc.cluster.local"),
           (b":path", b"/"), (b"user-agent", b"h2load nghttp2/1.52.0"), (b"accept", b"*/*"),
           (b"x-forwarded-for", b"127.0.0.1")]
#: nginx's response head, as the HTTP/1.1 client codec hands it over.
RESPONSE = [(b"Server", b"nginx/1.22.1"), (b"Date", b"Sun, 06 Dec 2026 05:00:00 GMT"),
            (b"Content-Type", b"application/octet-stream"), (b"Content-Length", b"1024"),
            (b"Last-Modified", b"Sun, 06 Dec 2026 04:00:00 GMT"), (b"Connection", b"keep-alive"),
            (b"ETag", b'"6930a9c0-400"'), (b"Accept-Ranges", b"bytes")]
BODY = b"x" * 1024


def connections():
    """A (client, server) pair of h2 connections configured as the proxy's codecs, past their prefaces."""
    from mesh.proxy.codec import h2_client, h2_server, hpack_c
    from mesh.proxy.codec.h2_connection import MeshH2Connection

    client = MeshH2Connection(config=h2_client._CONFIG)
    hpack_c.install(client, huffman=False)
    server = MeshH2Connection(config=h2_server._CONFIG)
    hpack_c.install(server)
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def exchange(client, server, count: int) -> None:
    """``count`` requests, one at a time, through the two connections."""
    from mesh.proxy.codec.h2_server import _response_headers

    for _ in range(count):
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, [*REQUEST, (b"x-request-id", str(uuid.uuid4()).encode())], end_stream=True)
        server.receive_data(client.data_to_send())
        server.send_headers(stream_id, _response_headers(200, RESPONSE, None))
        server.send_data(stream_id, BODY)
        server.end_stream(stream_id)
        for event in client.receive_data(server.data_to_send()):
            if isinstance(event, DataReceived) and event.flow_controlled_length:
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        server.receive_data(client.data_to_send())


def _count(requests: int, warmup: int, codec: str) -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
                          "bench.h2floor", "--run", str(requests), "--warmup", str(warmup), "--codec", codec],
                         capture_output=True, text=True, check=True)
    return int(_REFS.search(out.stderr).group(1).replace(",", ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.h2floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests counted (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=200, help="requests before (default: %(default)s)")
    parser.add_argument("--codec", choices=("h2", "nghttp2"), default="h2",
                        help="h2: the proxy's codecs (default); nghttp2: the same hop on libnghttp2 through cffi, "
                             "a measurement of the way forward (bench/h2floor_nghttp2.py)")
    parser.add_argument("--run", type=int, metavar="N", help=argparse.SUPPRESS)  # the process valgrind runs
    args = parser.parse_args(argv)
    if args.run is not None:
        if args.codec == "nghttp2":
            from bench import h2floor_nghttp2 as codec
        else:
            codec = sys.modules[__name__]
        client, server = codec.connections()
        codec.exchange(client, server, args.warmup + args.run)
        return 0
    base, total = _count(0, args.warmup, args.codec), _count(args.requests, args.warmup, args.codec)
    print(f"{args.codec} floor: {(total - base) / args.requests:,.0f} instructions per request "
          f"(client and server side of one HTTP/2 hop, {args.requests} requests after {args.warmup})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
