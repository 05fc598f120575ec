"""The demo app (:mod:`mesh.demo.app`) as a real backend process."""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from pathlib import Path

from mesh.demo.app import iter_pattern

from .net import free_port, http_request
from .processes import ManagedProcess, venv_bin


class Backend(ManagedProcess):
    """``python -m mesh.demo.app --name NAME --port PORT --address ADDRESS`` in a subprocess.

    ``Backend("user-service").start()`` returns once the app answers ``GET /``
    with its own name. The log goes to ``<log_dir>/backend-NAME-PORT.log``.
    """

    kind = "backend"

    def __init__(self, name: str, port: int | None = None, *, address: str = "127.0.0.1",
                 log_dir: Path | None = None):
        self.address = address
        self.port = port or free_port(address)
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="txmesh-backend-"))
        argv = [venv_bin("python"), "-m", "mesh.demo.app", "--name", name, "--port", self.port, "--address", address]
        super().__init__(name, argv, log_dir / f"backend-{name}-{self.port}.log")

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    def is_ready(self) -> bool:
        status, body = http_request(self.address, self.port, "/", timeout=2.0)
        return status == 200 and json.loads(body)["service"] == self.name


@functools.cache
def pattern_sha256(size: int) -> str:
    """sha256 of the first ``size`` bytes the demo app's ``/bytes/<size>`` serves."""
    digest = hashlib.sha256()
    for chunk in iter_pattern(size):
        digest.update(chunk)
    return digest.hexdigest()
