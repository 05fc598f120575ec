"""The sidecar, ``twistd mesh-proxy``, as a real process on loopback ports."""

from __future__ import annotations

import json
import signal
import tempfile
from pathlib import Path

from .curl import CurlResult, curl
from .net import free_port, http_request
from .processes import ManagedProcess, venv_bin


class Proxy(ManagedProcess):
    """``twistd -n --pidfile= mesh-proxy`` for one workload, in standalone mode (config from a directory).

    Runs::

        twistd -n --pidfile= mesh-proxy --config-dir DIR --workload NAME --namespace NS
            --outbound-port P1 --inbound-port P2 --admin-port P3 [--app-port N] [--label K=V ...]
            [--metrics-port P4] [--health-port P5] [extra_args]

    ``--metrics-port`` and ``--health-port`` are free ports unless ``extra_args`` give them; ``env``
    adds environment variables (e.g. ``PYTHONPATH`` to a plugin only this proxy loads).

    Ports not given are picked free. :meth:`start` returns once
    ``GET http://127.0.0.1:P3/ready`` answers 200. The log (twistd's stdout and
    stderr) goes to ``<log_dir>/proxy-NAME-P1.log``.
    """

    kind = "proxy"
    ready_timeout = 30.0

    def __init__(self, config_dir: Path, workload: str, *, namespace: str = "default", app_port: int | None = None,
                 labels: dict[str, str] | None = None, extra_args=(), outbound_port: int | None = None,
                 inbound_port: int | None = None, admin_port: int | None = None, log_dir: Path | None = None,
                 env: dict | None = None):
        self.config_dir = Path(config_dir)
        self.workload = workload
        self.namespace = namespace
        self.app_port = app_port
        self.outbound_port = outbound_port or free_port()
        self.inbound_port = inbound_port or free_port()
        self.admin_port = admin_port or free_port()
        argv = [
            venv_bin("twistd"), "-n", "--pidfile=", "mesh-proxy",
            "--config-dir", self.config_dir, "--workload", workload, "--namespace", namespace,
            "--outbound-port", self.outbound_port, "--inbound-port", self.inbound_port,
            "--admin-port", self.admin_port,
        ]
        if app_port is not None:
            argv += ["--app-port", app_port]
        for key, value in (labels or {}).items():
            argv += ["--label", f"{key}={value}"]
        # never the shared default 15090 (unless the test asks): a test proxy must not hold a port that
        # another process (the demo, another proxy) needs
        self.metrics_port = None if "--metrics-port" in extra_args else free_port()
        if self.metrics_port is not None:
            argv += ["--metrics-port", self.metrics_port]
        self.health_port = None if "--health-port" in extra_args else free_port()
        if self.health_port is not None:
            argv += ["--health-port", self.health_port]
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="txmesh-proxy-"))
        super().__init__(workload, [*argv, *extra_args], log_dir / f"proxy-{workload}-{self.outbound_port}.log",
                         env=env)

    @property
    def outbound_url(self) -> str:
        return f"http://127.0.0.1:{self.outbound_port}"

    @property
    def inbound_url(self) -> str:
        return f"http://127.0.0.1:{self.inbound_port}"

    def is_ready(self) -> bool:
        return self.admin_request("/ready")[0] == 200

    def admin_request(self, path: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
        """One request to the admin listener; returns (status, body)."""
        return http_request("127.0.0.1", self.admin_port, path, method=method, body=body)

    def health_request(self, path: str = "/healthz/ready", address: str = "127.0.0.1") -> tuple[int, bytes]:
        """One request to the health port (``/healthz/ready``, the kubelet's probe); returns (status, body)."""
        return http_request(address, self.health_port, path)

    def admin(self, path: str):
        """GET an admin endpoint that must answer 200 with JSON, and return the parsed document."""
        status, body = self.admin_request(path)
        if status != 200:
            raise AssertionError(self.describe(f"admin GET {path} answered {status}: {body[:500]!r}"))
        try:
            return json.loads(body)
        except ValueError:
            raise AssertionError(self.describe(f"admin GET {path} did not answer JSON: {body[:500]!r}")) from None

    def reload(self) -> None:
        """Ask the proxy to re-read its config directory (SIGHUP)."""
        self.send_signal(signal.SIGHUP)

    def curl(self, host: str, path: str = "/", **kwargs) -> CurlResult:
        """:func:`~tests.harness.curl.curl` through the outbound listener, routed by the ``Host`` header."""
        return curl(self.outbound_url + path, host=host, **kwargs)
