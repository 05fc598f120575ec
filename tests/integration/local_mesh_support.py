"""Shared pieces of the tests of the local mesh (``meshctl up/run/down/check/bug-report``); no tests here.

- :func:`meshctl`: run the real ``meshctl`` binary, with a deadline
- :class:`LocalMeshUnderTest`: ``meshctl up`` on free ports with a state directory of its own, and a
  clean-up that stops everything it started (``meshctl down``, then any process its records still name)
  and fails if a log of the mesh holds a traceback
- :func:`hello_config`: a ServiceEntry that selects the registered workloads labelled ``app: hello``, with
  subsets v1/v2 and a VirtualService splitting ``weights``
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from mesh.cli.local import LocalMesh, running
from tests.harness import free_port, venv_bin
from tests.harness.processes import LOG_ALARMS


def meshctl(*args, timeout: float = 90.0, env=None, cwd=None) -> subprocess.CompletedProcess:
    """The real ``meshctl`` with *args*; stdout and stderr as text."""
    return subprocess.run([venv_bin("meshctl"), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, cwd=cwd)


def app_command(name: str, port: int) -> list[str]:
    """The demo app (echoes each request as JSON, headers included) as a workload's command."""
    return [sys.executable, "-m", "mesh.demo.app", "--name", name, "--address", "127.0.0.1", "--port", str(port)]


def hello_config(weights=(90, 10)) -> list[dict]:
    v1, v2 = weights
    return [
        {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
         "metadata": {"name": "hello", "namespace": "default"},
         "spec": {"hosts": ["hello"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                  "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                  "workloadSelector": {"labels": {"app": "hello"}}}},
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
         "metadata": {"name": "hello", "namespace": "default"},
         "spec": {"host": "hello", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                               {"name": "v2", "labels": {"version": "v2"}}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
         "metadata": {"name": "hello", "namespace": "default"},
         "spec": {"hosts": ["hello"], "http": [{"route": [
             {"destination": {"host": "hello", "subset": "v1"}, "weight": v1},
             {"destination": {"host": "hello", "subset": "v2"}, "weight": v2}]}]}},
    ]


class LocalMeshUnderTest:
    """A local mesh in ``root``: state in ``root/state``, config in ``root/config``, free control plane ports."""

    def __init__(self, root: Path, documents=()):
        self.root = Path(root)
        self.state_dir = self.root / "state"
        self.config_dir = self.root / "config"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        if documents:
            (self.config_dir / "mesh.yaml").write_text(yaml.safe_dump_all(documents))
        self.port = free_port()
        self.admin_port = free_port()
        self.mesh = LocalMesh(self.state_dir)

    @property
    def control_admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def meshctl(self, command: str, *args, **kwargs) -> subprocess.CompletedProcess:
        """``meshctl COMMAND --state-dir STATE ARGS...``."""
        return meshctl(command, "--state-dir", self.state_dir, *args, **kwargs)

    def up(self) -> subprocess.CompletedProcess:
        result = self.meshctl("up", "--config-dir", self.config_dir, "--port", self.port,
                              "--admin-port", self.admin_port)
        assert result.returncode == 0, result
        return result

    def run(self, *args) -> subprocess.CompletedProcess:
        """``meshctl run --detach ARGS``, which must succeed."""
        result = self.meshctl("run", "--detach", *args)
        assert result.returncode == 0, result
        return result

    def record(self, name: str) -> dict:
        return json.loads(self.mesh.run_path(name).read_text())

    def processes(self) -> list[dict]:
        """Every process the mesh's records name (control plane, supervisors, apps, sidecars)."""
        refs = []
        control = self.mesh.control()
        if control:
            refs.append(control["process"])
        for path in self.mesh.runs_dir.glob("*.json") if self.mesh.runs_dir.is_dir() else ():
            record = json.loads(path.read_text())
            refs += [record[key] for key in ("supervisor", "app", "sidecar") if record.get(key)]
        return refs

    def log_alarms(self) -> list[str]:
        alarms = []
        for log in sorted(self.mesh.log_dir.glob("*.log")) if self.mesh.log_dir.is_dir() else ():
            alarms += [f"{log.name}: {line}" for line in log.read_text(errors="replace").splitlines()
                       if any(alarm in line for alarm in LOG_ALARMS)]
        return alarms

    def clean_up(self) -> None:
        """``meshctl down``; then SIGKILL for anything a record still names (a safety net)."""
        refs = self.processes()
        meshctl("down", "--state-dir", self.state_dir, timeout=60)
        for ref in refs:
            if running(ref):
                os.kill(ref["pid"], signal.SIGKILL)
