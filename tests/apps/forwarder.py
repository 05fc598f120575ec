"""A tiny app that calls another service through its own sidecar, propagating the trace headers.

It stands in for a real microservice in the middle of a call chain (the demo app
answers by itself; it never calls anyone)::

    python tests/apps/forwarder.py --name user-service --port 8080 \
        --sidecar 127.0.0.1:15001 --upstream-host payment.demo.svc.cluster.local

Every request (except ``GET /healthz``) is answered by making ``GET <same path>``
to ``--sidecar`` with ``Host: --upstream-host`` and the trace headers the app
received (``traceparent``, ``tracestate``, ``b3``, ``x-b3-*``, ``x-request-id``),
as Istio asks applications to do.  The response has the upstream's status and a
JSON body: ``service``, ``received`` (the request headers, lower-case) and
``upstream`` (the upstream's JSON body, or its text).
"""

from __future__ import annotations

import argparse
import http.client
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROPAGATED = ("traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
              "x-b3-sampled", "x-b3-flags", "x-request-id")


class Forwarder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "forwarder"

    def do_GET(self):
        if self.path == "/healthz":
            self._answer(200, {"service": self.server.name})
            return
        received = {name.lower(): value for name, value in self.headers.items()}
        host, _, port = self.server.sidecar.rpartition(":")
        outgoing = {name: received[name] for name in PROPAGATED if name in received}
        outgoing["host"] = self.server.upstream_host
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", self.path, headers=outgoing)
            response = conn.getresponse()
            status, body = response.status, response.read()
        except OSError as error:
            status, body = 502, f"forwarder: {error}".encode()
        finally:
            conn.close()
        try:
            upstream = json.loads(body)
        except ValueError:
            upstream = body.decode("utf-8", "replace")
        self._answer(status, {"service": self.server.name, "received": received, "upstream": upstream})

    def _answer(self, status, document):
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-demo-service", self.server.name)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--sidecar", required=True, help="HOST:PORT of this app's sidecar outbound listener")
    parser.add_argument("--upstream-host", required=True, help="Host header of the calls it makes")
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.address, args.port), Forwarder)
    server.daemon_threads = True
    server.name = args.name
    server.sidecar = args.sidecar
    server.upstream_host = args.upstream_host
    print(f"forwarder {args.name} on {args.address}:{args.port} -> {args.sidecar} Host {args.upstream_host}",
          flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
