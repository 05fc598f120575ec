"""Shared helpers of the tracing integration tests (tests/integration/test_tracing*.py); no tests here.

- :class:`Collector`: a tiny HTTP receiver in this process (Zipkin ``POST /api/v2/spans`` or OTLP
  ``POST /v1/traces``) that keeps every request body
- :class:`HangingServer`: accepts connections and never answers (a collector that hangs)
- :class:`ForwarderApp`: tests/apps/forwarder.py as a real process behind a sidecar
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.harness import REPO_ROOT, ManagedProcess, free_port, http_request, venv_bin


class _CollectorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        self.server.collector.record(self.path, dict(self.headers.items()), body)
        status = self.server.collector.status
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format, *args):
        pass


class Collector:
    """Records ``(path, headers, body)`` of each POST and answers ``status`` (202, like Zipkin)."""

    def __init__(self, status=202):
        self.status = status
        self.posts = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _CollectorHandler)
        self._server.daemon_threads = True
        self._server.collector = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="collector", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    def record(self, path, headers, body):
        with self._lock:
            self.posts.append((path, headers, body))

    def zipkin_spans(self) -> list:
        """Every span of every POST so far (each POST body is a JSON array of Zipkin v2 spans)."""
        with self._lock:
            posts = list(self.posts)
        return [span for _, _, body in posts for span in json.loads(body)]


class HangingServer:
    """Accepts TCP connections, reads, and never answers."""

    def __init__(self):
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._conns = []
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name="hanging", daemon=True)

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    def start(self):
        self._thread.start()
        return self

    def _accept(self):
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)  # kept open, never read or answered

    def stop(self):
        self._stopped = True
        self._sock.close()
        for conn in self._conns:
            conn.close()


class ForwarderApp(ManagedProcess):
    """``python tests/apps/forwarder.py``: calls ``upstream_host`` through ``sidecar_port`` for every request."""

    kind = "app"

    def __init__(self, name: str, sidecar_port: int, upstream_host: str, *, port: int | None = None,
                 log_dir: Path | None = None):
        self.port = port or free_port("127.0.0.1")
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="txmesh-forwarder-"))
        argv = [venv_bin("python"), REPO_ROOT / "tests" / "apps" / "forwarder.py", "--name", name,
                "--port", self.port, "--sidecar", f"127.0.0.1:{sidecar_port}", "--upstream-host", upstream_host]
        super().__init__(name, argv, log_dir / f"app-{name}-{self.port}.log")

    def is_ready(self) -> bool:
        try:
            return http_request("127.0.0.1", self.port, "/healthz", timeout=2.0)[0] == 200
        except OSError:
            return False
