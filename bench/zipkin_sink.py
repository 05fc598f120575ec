"""A small Zipkin collector for the traced bench cases: ``python -m bench.zipkin_sink PORT``.

It accepts what the proxies export, ``POST /api/v2/spans`` with a Zipkin v2
JSON array, answers 202 like Zipkin, and keeps the spans of the most recent
traces so that the harness can check that a traced case really traces:

- ``GET /ready``: 200 once it listens;
- ``GET /api/v2/trace/<trace id>``: the spans received for that trace, a JSON
  array (Zipkin's own path), ``[]`` if none came;
- ``GET /stats``: ``{"posts": N, "spans": N}`` since start.

It serves the two proxies of both traced pairs of a run on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SPANS_PATH = "/api/v2/spans"
TRACE_PATH = "/api/v2/trace/"
MAX_TRACES = 10_000  # traces whose spans are kept (the oldest go first)


class SpanStore:
    """The spans received, by trace id, for the most recent ``max_traces`` traces."""

    def __init__(self, max_traces: int = MAX_TRACES):
        self.max_traces = max_traces
        self.posts = 0
        self.spans = 0
        self._traces: OrderedDict[str, list] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, spans: list) -> None:
        with self._lock:
            self.posts += 1
            self.spans += len(spans)
            for span in spans:
                trace = self._traces.setdefault(str(span.get("traceId", "")).lower(), [])
                trace.append(span)
            while len(self._traces) > self.max_traces:
                self._traces.popitem(last=False)

    def trace(self, trace_id: str) -> list:
        with self._lock:
            return list(self._traces.get(trace_id.lower(), ()))

    def stats(self) -> dict:
        with self._lock:
            return {"posts": self.posts, "spans": self.spans}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the proxies reuse their connection
    store: SpanStore

    def do_POST(self):
        body = self._body()
        if self.path.split("?")[0] != SPANS_PATH:
            return self._answer(404, b"")
        try:
            spans = json.loads(body)
        except ValueError:
            return self._answer(400, b"not JSON")
        if not isinstance(spans, list):
            return self._answer(400, b"not a JSON array")
        self.store.add([span for span in spans if isinstance(span, dict)])
        self._answer(202, b"")

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/ready":
            return self._answer(200, b"ready\n")
        if path == "/stats":
            return self._answer(200, json.dumps(self.store.stats()).encode())
        if path.startswith(TRACE_PATH):
            return self._answer(200, json.dumps(self.store.trace(path[len(TRACE_PATH):])).encode())
        self._answer(404, b"")

    def _body(self) -> bytes:
        """The request body, sized by content-length or chunked (Envoy's Zipkin tracer sends chunks)."""
        if "chunked" not in self.headers.get("transfer-encoding", "").lower():
            return self.rfile.read(int(self.headers.get("content-length") or 0))
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if not size:
                while self.rfile.readline().strip():  # trailers, up to the empty line
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after the chunk

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # one line per POST would drown the run's log
        pass


def make_server(port: int, store: SpanStore | None = None) -> ThreadingHTTPServer:
    """The sink's server on 127.0.0.1:``port`` (0: any free port), not yet serving."""
    handler = type("Handler", (_Handler,), {"store": store or SpanStore()})
    return ThreadingHTTPServer(("127.0.0.1", port), handler)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m bench.zipkin_sink PORT", file=sys.stderr)
        return 2
    server = make_server(int(argv[0]))
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
