"""The ``wrk`` load client of bench.ca (``--client wrk``): CSRs replayed by a client that costs almost nothing.

bench/ca_client.py is Python: about 0.42 M instructions per CSR on the same 2 CPUs as mesh-control
and its CA workers.  ``wrk`` (C, one thread, event-driven) sends the same requests for a small
fraction of that, so that more of the host is left to the CA.  What it does not do:

- it replays ``KEYS`` CSR requests made beforehand (the join token and identity bench/ca_client.py
  sends, each CSR with its own ECDSA P-256 key), over and over: no key generation per CSR on the
  client, which a sidecar does (and which bench/ca_client.py does not do either: it replays 32 per
  process);
- it does not verify mesh-control's certificate (bench/ca_client.py does, against the trust bundle);
- with a new connection per CSR (``Connection: close``, the server closes after its answer) it opens a
  full TLS handshake each time, as bench/ca_client.py does, but with wrk's OpenSSL defaults.

Only answers with status 200 count (bench/ca_wrk.lua's ``response()`` hook); other statuses and
wrk's socket errors are failures.  The result has the shape of bench/ca_client.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.ca_client import request_bodies
from bench.procs import run_tool

SCRIPT = Path(__file__).with_name("ca_wrk.lua")
KEYS = 32  # distinct CSRs replayed, as bench/ca_client.py makes per process


def write_bodies(path: Path, identity: str, token: str, count: int = KEYS) -> Path:
    """``count`` CSR request bodies for ``identity`` (each its own key), one JSON object a line, at ``path``."""
    path.write_bytes(b"".join(body + b"\n" for body in request_bodies(identity, token, count)))
    return path


def run(port: int, bodies: Path, seconds: float, connections: int, new_connection: bool, log: Path) -> dict:
    """``connections`` keep-alive (or, with ``new_connection``, one-request) connections to mesh-control's
    ``port`` for ``seconds`` (whole seconds), from one wrk thread.

    Returns ``{"completed", "failed", "seconds", "statuses", "errors"}``, as bench/ca_client.py prints.
    """
    argv = ["wrk", "--threads", "1", "--connections", str(connections), "--duration", f"{max(1, round(seconds))}s",
            "--timeout", "10s", "--script", str(SCRIPT), f"https://127.0.0.1:{port}", "--", str(bodies),
            *(["close"] if new_connection else [])]
    out = run_tool(argv, seconds + 60, log)
    return json.loads(out.strip().splitlines()[-1])
