"""Shared helpers of the distribution tests (tests/integration/test_distribution_*.py); no tests here.

- :class:`ControlledProxy`: ``twistd mesh-proxy --control ...`` *without* ``--config-dir``: certificate and
  config both come from the control plane (``--state-dir`` keeps the last-known-good snapshot)
- :func:`selector_service`: a ServiceEntry whose endpoints are the registered proxies with matching labels
- :func:`proxies`: the control plane's ``/proxies`` rows by workload
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.harness import Proxy

NETWORKING = "networking.istio.io/v1"


class ControlledProxy(Proxy):
    """A sidecar fed by the control plane: :class:`~tests.harness.Proxy` minus ``--config-dir``.

    ``control`` is the :class:`~tests.harness.Control`; the token and trust bundle come from it.
    ``ready`` is the harness's readiness (admin /ready 200: certificate and a config, LKG or pushed).
    """

    def __init__(self, control, workload: str, *, namespace: str = "default", service_account: str | None = None,
                 state_dir: Path | None = None, extra_args=(), log_dir: Path | None = None, **kwargs):
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="txmesh-dist-"))
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix=f"proxy-state-{workload}-", dir=log_dir))
        args = [*control.proxy_args(namespace, service_account or workload), "--state-dir", str(self.state_dir),
                *extra_args]
        super().__init__(Path("/nonexistent"), workload, namespace=namespace, extra_args=args, log_dir=log_dir,
                         **kwargs)
        index = self.argv.index("--config-dir")
        del self.argv[index:index + 2]

    def ready_doc(self) -> tuple[int, dict]:
        import json
        status, body = self.admin_request("/ready")
        return status, json.loads(body)


def selector_service(name: str, *, namespace: str = "default", selector=None, port: int = 80) -> dict:
    """A ServiceEntry (one HTTP port named ``http``) whose endpoints are the workloads with ``selector``."""
    return {"apiVersion": NETWORKING, "kind": "ServiceEntry", "metadata": {"name": name, "namespace": namespace},
            "spec": {"hosts": [name], "location": "MESH_INTERNAL", "resolution": "STATIC",
                     "ports": [{"number": port, "name": "http", "protocol": "HTTP"}],
                     "workloadSelector": {"labels": dict(selector or {"app": name})}}}


def proxies(control) -> dict:
    """``GET /proxies`` of the control plane's admin port, as ``{workload: row}``."""
    return {row["workload"]: row for row in control.admin("/proxies")}
