"""Shared parts of the tests of meshctl's observing commands (tests/integration/test_meshctl_observe*.py).

:func:`observed_mesh` starts a real control plane and three real sidecars fed by it:

- ``productpage``: a client (no inbound listener), access log to a file;
- ``reviews-v1`` and ``reviews-v2``: two workloads of service ``reviews`` (labels app=reviews,
  version=v1|v2), each in front of a demo app, access logs to files.

The config: ServiceEntry ``reviews`` selecting app=reviews; DestinationRule subsets v1/v2; a
VirtualService sending ``/v2/*`` to v2 as ``/*`` and the rest 90/10 to v1/v2 (no retries); ServiceEntry
``ghost`` with a dead endpoint (503 UF,URX); a DENY AuthorizationPolicy on ``/admin/*`` of app=reviews;
STRICT mTLS for the namespace.  No tests here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.harness import free_port, venv_bin, wait_for
from tests.integration.test_distribution_support import ControlledProxy, selector_service
from tests.integration.test_identity_support import authorization_policy, peer_authentication
from tests.integration.test_proxy_support import (
    destination_rule,
    endpoint,
    service_entry,
    virtual_service,
    write_config,
)

CONFIG = (
    selector_service("reviews"),
    destination_rule("reviews", "reviews", subsets=[{"name": "v1", "labels": {"version": "v1"}},
                                                    {"name": "v2", "labels": {"version": "v2"}}]),
    virtual_service("reviews", ["reviews"], [
        {"match": [{"uri": {"prefix": "/v2/"}}], "rewrite": {"uri": "/"},
         "route": [{"destination": {"host": "reviews", "subset": "v2"}}], "retries": {"attempts": 0}},
        {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                   {"destination": {"host": "reviews", "subset": "v2"}, "weight": 10}],
         "retries": {"attempts": 0}}]),
    authorization_policy("deny-admin", "default", selector={"app": "reviews"}, action="DENY",
                         rules=[{"to": [{"operation": {"paths": ["/admin/*"]}}]}]),
    authorization_policy("ratings-only", "default", selector={"app": "ratings"},
                         rules=[{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/productpage"]}}]}]),
    peer_authentication("strict", "default", "STRICT"),
)


def meshctl(*args, timeout=60, stdin=None):
    """Run the real meshctl; ``(exit code, stdout, stderr)``."""
    proc = subprocess.run([venv_bin("meshctl"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


def start_meshctl(*args) -> subprocess.Popen:
    """The real meshctl in the background (stdout and stderr piped, text)."""
    return subprocess.Popen([venv_bin("meshctl"), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)


def wait_for_stderr_line(proc: subprocess.Popen, text: str, timeout: float = 20.0) -> str:
    """Read ``proc``'s stderr until a line contains ``text`` (the command's own "ready" line)."""
    lines = []

    def seen():
        if proc.poll() is not None and not lines:
            raise AssertionError(f"meshctl exited {proc.returncode}: {proc.stderr.read()}")
        line = proc.stderr.readline()
        lines.append(line)
        return text in line and line

    return wait_for(seen, timeout=timeout, interval=0, what=f"meshctl to print {text!r}")


def access_log_lines(path: Path, path_prefix: str) -> list:
    """The access-log entries of ``path`` whose request path starts with ``path_prefix`` (waits for one)."""
    def entries():
        if not path.exists():
            return []
        return [entry for entry in map(json.loads, path.read_text().splitlines())
                if (entry.get("path") or "").startswith(path_prefix)]
    return wait_for(entries, timeout=10, what=f"an access-log line for {path_prefix} in {path}")


def observed_mesh(control_factory, backend_factory, process_log_dir, tmp_path):
    """Start the mesh of the module docstring; returns a dict (control, proxies, logs) and a stop function."""
    config = write_config(tmp_path / "config", *CONFIG,
                          service_entry("ghost", [endpoint(("127.0.0.1", free_port()))]))
    control = control_factory(extra_args=["--config-dir", str(config)])
    logs = tmp_path / "logs"
    logs.mkdir()
    started = {}

    def sidecar(workload, **kwargs):
        log = logs / f"{workload}.log"
        proxy = ControlledProxy(control, workload, log_dir=process_log_dir, service_account=kwargs.pop("account"),
                                extra_args=["--access-log", str(log)], **kwargs).start()
        started[workload] = proxy
        return proxy

    for version in ("v1", "v2"):
        app = backend_factory(f"reviews-{version}")
        sidecar(f"reviews-{version}", account="reviews", app_port=app.port,
                labels={"app": "reviews", "version": version})
    sidecar("productpage", account="productpage", labels={"app": "productpage"})
    client = started["productpage"]
    wait_for(lambda: client.curl("reviews", "/v2/").status == 200, timeout=20,
             what="productpage to reach reviews-v2 through the mesh")
    mesh = {"control": control, "config": config, "logs": logs, **started,
            "control_admin": f"127.0.0.1:{control.admin_port}"}

    def stop():
        for proxy in reversed(list(started.values())):
            proxy.stop()

    return mesh, stop
