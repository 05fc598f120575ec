"""Load generator of bench.ca: workload CSRs to mesh-control's ``POST /v1/csr``, for a fixed time.

    python -m bench.ca_client --port P --ca ROOTS --token-file F --identity SPIFFE_ID [--seconds 8]
        [--processes 3] [--threads 2] [--new-connection] [--count N]

``--processes`` processes each run ``--threads`` threads.  Every thread loops until the deadline:
one CSR request (a join token as the credential, as a new sidecar sends it), the response read, its
status counted.  With ``--new-connection`` each CSR goes over a new TLS connection (TCP connect and a
full TLS 1.3 handshake, verifying the control plane's chain against ``--ca``); without it each thread
keeps one connection open (HTTP/1.1 keep-alive) and reconnects only if the server closed it.

Each process makes ``--keys`` ECDSA P-256 keys and their CSRs before the start time, and the threads
send them in turn: the control plane signs the same public key again without complaint, and the
client spends its CPU on requests, not on key generation.  A CSR counts when its answer was 200 and
came before the deadline.  With ``--count N`` each thread sends N CSRs, one after the other, whatever
the time they take (for ``bench.ca --callgrind``).

Prints one JSON line: ``{"completed", "failed", "seconds", "statuses", "errors"}``; ``statuses``
counts the HTTP statuses of failed answers, ``errors`` the first words of each exception.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import multiprocessing
import socket
import ssl
import sys
import threading
import time
from collections import Counter

from cryptography.hazmat.primitives.asymmetric import ec

from mesh.identity.agent import make_csr

START_DELAY = 2.0  # seconds given to every process to make its CSRs before the common start time


def client_context(ca: str) -> ssl.SSLContext:
    """TLS 1.3 verifying the control plane's chain against ``ca`` (its name is a SPIFFE id, not a host)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.load_verify_locations(ca)
    return context


class _Connection(http.client.HTTPSConnection):
    """An HTTPS connection with TCP_NODELAY, as the sidecar's agent has (else Nagle adds 40 ms)."""

    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def request_bodies(identity: str, token: str, count: int) -> list[bytes]:
    """``count`` CSR request bodies for ``identity``, each with its own key."""
    return [json.dumps({"credential": token, "csr": make_csr(ec.generate_private_key(ec.SECP256R1()),
                                                             identity).decode()}).encode()
            for _ in range(count)]


def one_csr(connection: http.client.HTTPSConnection, body: bytes) -> int:
    """POST one CSR on ``connection``; the response status (the body is read to the end)."""
    connection.request("POST", "/v1/csr", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response.status


def worker(options, start: float, results) -> None:
    """One process: ``options.threads`` threads from ``start`` for ``options.seconds``; totals to ``results``."""
    context = client_context(options.ca)
    with open(options.token_file, encoding="utf-8") as handle:
        token = handle.read().strip()
    bodies = itertools.cycle(request_bodies(options.identity, token, options.keys))
    deadline = start + options.seconds if not options.count else float("inf")
    lock = threading.Lock()
    totals, statuses, errors = Counter(), Counter(), Counter()

    def loop():
        mine = Counter()
        connection = None
        while time.time() < start:
            time.sleep(0.01)
        while True:
            if connection is None:
                connection = _Connection("127.0.0.1", options.port, context=context, timeout=10)
            with lock:
                body = next(bodies)
            try:
                status = one_csr(connection, body)
            except (OSError, ssl.SSLError, http.client.HTTPException) as error:
                status = None
                with lock:
                    errors[" ".join(str(error).split()[:6]) or type(error).__name__] += 1
            if options.new_connection or status is None:
                connection.close()
                connection = None
            if time.time() > deadline:
                break
            mine["completed" if status == 200 else "failed"] += 1
            if options.count and mine["completed"] + mine["failed"] >= options.count:
                break
            if status not in (200, None):
                with lock:
                    statuses[str(status)] += 1
        if connection is not None:
            connection.close()
        with lock:
            totals.update(mine)

    threads = [threading.Thread(target=loop) for _ in range(options.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put((dict(totals), dict(statuses), dict(errors)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ca_client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="mesh-control's CSR port on 127.0.0.1")
    parser.add_argument("--ca", required=True, help="the trust bundle that verifies mesh-control (PEM)")
    parser.add_argument("--token-file", required=True, help="a join token for --identity")
    parser.add_argument("--identity", required=True, help="the SPIFFE id the token proves")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=3, help="client processes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="threads per process (default: %(default)s)")
    parser.add_argument("--keys", type=int, default=32, help="distinct CSRs per process (default: %(default)s)")
    parser.add_argument("--new-connection", action="store_true", help="a new TLS connection per CSR")
    parser.add_argument("--count", type=int, default=0, help="CSRs per thread instead of --seconds")
    options = parser.parse_args(argv)

    start = time.time() + START_DELAY
    results = multiprocessing.Queue()
    processes = [multiprocessing.Process(target=worker, args=(options, start, results))
                 for _ in range(options.processes)]
    for process in processes:
        process.start()
    totals, statuses, errors = Counter(), Counter(), Counter()
    for _ in processes:
        counts, failed_statuses, failures = results.get()
        totals.update(counts)
        statuses.update(failed_statuses)
        errors.update(failures)
    for process in processes:
        process.join()
    print(json.dumps({"completed": totals["completed"], "failed": totals["failed"], "seconds": options.seconds,
                      "statuses": dict(statuses), "errors": dict(errors.most_common(5))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
