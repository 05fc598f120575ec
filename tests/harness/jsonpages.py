"""A small HTTP server answering fixed JSON pages: a control plane's admin API with rows a real one cannot show."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JsonPages:
    """Serves ``pages`` (path -> JSON-able value) on 127.0.0.1; any other path is a JSON 404.

    ``pages`` may be replaced or changed while the server runs. Use as a context manager.
    """

    def __init__(self, pages=None):
        self.pages = dict(pages or {})
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                found = self.path in owner.pages
                body = json.dumps(owner.pages[self.path] if found else {"error": "not found"}).encode()
                self.send_response(200 if found else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as meshctl's --control-admin takes it."""
        return "127.0.0.1:%d" % self._server.server_address[1]

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info):
        self._server.shutdown()
        self._server.server_close()
