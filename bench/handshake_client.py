"""Load generator of bench.handshakes: one new mTLS connection per request, for a fixed time.

    python -m bench.handshake_client --port P --cert C --key K --ca CA [--seconds 10]
        [--processes 2] [--threads 4] [--resume]

``--processes`` processes each run ``--threads`` threads (the standard library's ``ssl`` releases
the GIL while it computes, so threads of one process overlap).  Every thread loops until the
deadline: TCP connect, TLS 1.3 handshake presenting the client certificate and verifying the server's
chain against ``--ca``, one ``GET / HTTP/1.1`` with ``Connection: close``, the response read to the
end of the connection, close.  A connection counts when its response was ``200`` and ended before
the deadline.

Without ``--resume`` every handshake is a full one (no session is offered).  With ``--resume`` each
thread offers the session of its own previous connection (the server's TLS 1.3 ticket), as a sidecar
client that keeps sessions per peer would; ``resumed`` counts the handshakes the server accepted so.

Prints one JSON line: ``{"completed", "failed", "resumed", "seconds", "errors"}`` where ``errors``
maps the first words of each failure to its count.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import ssl
import sys
import threading
import time
from collections import Counter

REQUEST = b"GET / HTTP/1.1\r\nHost: handshakes\r\nConnection: close\r\n\r\n"
START_DELAY = 1.0  # seconds given to every process to be up before the common start time


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """TLS 1.3 with the client certificate; the server's chain is verified (not its name: it has none)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.load_verify_locations(ca)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    return context


def one_request(context: ssl.SSLContext, port: int, session):
    """One connection, one request; returns ``(ok, resumed, session)``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as a sidecar does; else Nagle waits 40 ms
        with context.wrap_socket(raw, session=session) as tls:
            tls.sendall(REQUEST)
            response = bytearray()
            while True:
                data = tls.recv(65536)
                if not data:
                    break
                response += data
            return response.startswith(b"HTTP/1.1 200 "), tls.session_reused, tls.session


def worker(options, start: float, results) -> None:
    """One process: ``options.threads`` threads from ``start`` for ``options.seconds``; totals to ``results``."""
    context = client_context(options.cert, options.key, options.ca)
    deadline = start + options.seconds
    lock = threading.Lock()
    totals = Counter()
    errors = Counter()

    def loop():
        session = None
        mine = Counter()
        while time.time() < start:
            time.sleep(0.01)
        while True:
            try:
                ok, resumed, new_session = one_request(context, options.port, session)
            except (OSError, ssl.SSLError) as error:
                ok, resumed, new_session = False, False, None
                with lock:
                    errors[" ".join(str(error).split()[:6])] += 1
            if time.time() > deadline:
                break
            mine["completed" if ok else "failed"] += 1
            mine["resumed"] += int(bool(ok and resumed))
            if options.resume:
                session = new_session
        with lock:
            totals.update(mine)

    threads = [threading.Thread(target=loop) for _ in range(options.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put((dict(totals), dict(errors)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.handshake_client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="the mTLS port on 127.0.0.1")
    parser.add_argument("--cert", required=True, help="client certificate (PEM)")
    parser.add_argument("--key", required=True, help="its key (PEM)")
    parser.add_argument("--ca", required=True, help="the root that signed the server's certificate (PEM)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=2, help="client processes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=4, help="threads per process (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="offer the previous connection's session")
    options = parser.parse_args(argv)

    start = time.time() + START_DELAY
    results = multiprocessing.Queue()
    processes = [multiprocessing.Process(target=worker, args=(options, start, results))
                 for _ in range(options.processes)]
    for process in processes:
        process.start()
    totals, errors = Counter(), Counter()
    for _ in processes:
        counts, failures = results.get()
        totals.update(counts)
        errors.update(failures)
    for process in processes:
        process.join()
    print(json.dumps({"completed": totals["completed"], "failed": totals["failed"], "resumed": totals["resumed"],
                      "seconds": options.seconds, "errors": dict(errors.most_common(5))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
