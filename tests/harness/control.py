"""The control plane, ``twistd mesh-control``, as a real process on loopback ports."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from .net import free_port, http_request
from .processes import ManagedProcess, venv_bin


class Control(ManagedProcess):
    """``twistd -n --pidfile= mesh-control`` with its own state directory and free ports.

    Runs::

        twistd -n --pidfile= mesh-control --state-dir STATE --address 127.0.0.1
            --port P1 --admin-port P2 [--workload-cert-ttl TTL] [extra_args]

    :meth:`start` returns once ``GET http://127.0.0.1:P2/ready`` answers 200.
    The CA lives in ``state_dir`` (generated on first start unless
    ``extra_args`` gives ``--ca-cert/--ca-key``); ``root_cert`` is the trust
    bundle to hand to sidecars. Stopping and starting again reuses the state
    directory, so the CA and the token key survive a restart. ``env`` adds
    environment variables (e.g. ``PYTHONPATH`` to a CA plugin only this
    control plane loads, or an external CA's address).
    """

    kind = "control"
    ready_timeout = 30.0

    def __init__(self, state_dir: Path | None = None, *, workload_cert_ttl: str | None = None,
                 trust_domain: str | None = None, port: int | None = None, admin_port: int | None = None,
                 extra_args=(), log_dir: Path | None = None, env: dict | None = None):
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="txmesh-control-"))
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="state-", dir=log_dir))
        self.trust_domain = trust_domain or "cluster.local"
        self.port = port or free_port()
        self.admin_port = admin_port or free_port()
        self.tokens: list[str] = []  # every token :meth:`token` printed, e.g. to check that no log shows one
        argv = [
            venv_bin("twistd"), "-n", "--pidfile=", "mesh-control", "--state-dir", self.state_dir,
            "--address", "127.0.0.1", "--port", self.port, "--admin-port", self.admin_port,
        ]
        if workload_cert_ttl:
            argv += ["--workload-cert-ttl", workload_cert_ttl]
        if trust_domain:
            argv += ["--trust-domain", trust_domain]
        super().__init__("mesh-control", [*argv, *extra_args], log_dir / f"control-{self.port}.log", env=env)

    @property
    def address(self) -> str:
        """``HOST:PORT`` of the CSR endpoint, as ``mesh-proxy --control`` wants it."""
        return f"127.0.0.1:{self.port}"

    @property
    def root_cert(self) -> Path:
        """The trust bundle (``STATE/root-cert.pem``)."""
        return self.state_dir / "root-cert.pem"

    def is_ready(self) -> bool:
        return self.admin_request("/ready")[0] == 200

    def admin_request(self, path: str) -> tuple[int, bytes]:
        return http_request("127.0.0.1", self.admin_port, path)

    def admin(self, path: str = "/ready"):
        """GET an admin endpoint that must answer 200 with JSON; return the parsed document."""
        status, body = self.admin_request(path)
        if status != 200:
            raise AssertionError(self.describe(f"admin GET {path} answered {status}: {body[:500]!r}"))
        return json.loads(body)

    def token(self, namespace: str, service_account: str, ttl: str = "1h") -> str:
        """A join token from ``meshctl token create`` for this control plane's state directory."""
        argv = [venv_bin("meshctl"), "token", "create", "--state-dir", str(self.state_dir),
                "--namespace", namespace, "--service-account", service_account, "--ttl", ttl,
                "--trust-domain", self.trust_domain]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr}")
        token = proc.stdout.strip()
        self.tokens.append(token)
        return token

    def token_file(self, namespace: str, service_account: str, ttl: str = "1h", directory: Path | None = None) -> Path:
        """:meth:`token` written to a file (mode 0600) for ``mesh-proxy --token-file``."""
        directory = Path(directory or self.state_dir.parent)
        path = directory / f"token-{namespace}-{service_account}-{free_port()}"
        path.touch(mode=0o600)
        path.write_text(self.token(namespace, service_account, ttl) + "\n")
        return path

    def proxy_args(self, namespace: str, service_account: str, *, cert_ttl: str | None = None,
                   token_ttl: str = "1h") -> list[str]:
        """``mesh-proxy`` arguments that make a sidecar get its certificate here (a fresh token file)."""
        args = ["--control", self.address, "--ca-bundle", str(self.root_cert),
                "--token-file", str(self.token_file(namespace, service_account, token_ttl)),
                "--service-account", service_account]
        if self.trust_domain != "cluster.local":
            args += ["--trust-domain", self.trust_domain]
        if cert_ttl:
            args += ["--cert-ttl", cert_ttl]
        return args
