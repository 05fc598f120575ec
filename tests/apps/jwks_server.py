"""A JSON Web Key Set server for the RequestAuthentication tests: serves key sets from files, counts fetches.

::

    python tests/apps/jwks_server.py --port PORT --keys-dir DIR

``GET /NAME.json`` answers the file ``DIR/NAME.json`` as it is at that moment (so a test rotates keys by
rewriting the file), 404 when there is none; ``GET /fetches`` answers ``{"/NAME.json": count, ...}``,
how many times each key set was served.  It prints ``listening`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class KeySets(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        server = self.server
        if self.path == "/fetches":
            with server.lock:
                self._answer(200, json.dumps(server.fetches).encode())
            return
        name = Path(self.path).name
        path = server.keys_dir / name
        if not name.endswith(".json") or not path.is_file():
            self._answer(404, b'{"error": "no such key set"}')
            return
        with server.lock:
            server.fetches[self.path] = server.fetches.get(self.path, 0) + 1
        self._answer(200, path.read_bytes())

    def _answer(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--keys-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.address, args.port), KeySets)
    server.daemon_threads = True
    server.keys_dir = args.keys_dir
    server.fetches = {}
    server.lock = threading.Lock()
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
