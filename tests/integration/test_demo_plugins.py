"""``meshctl demo`` shows the built-in behaviour (the default load balancer) unless asked for a plugin.

``make bootstrap`` installs the first-party plugins of plugins/* (peak-EWMA balancing, OTLP export), so
without care every demo sidecar would load them and the default balancer would never be seen.  These
tests start the demo's control plane and one workload (the frontend) as real processes and read what
the sidecar loaded from its /config_dump.  They use the demo's fixed ports (127.0.0.1:15012/15014 and
the frontend's 127.0.10.1 ports), so nothing else may hold them meanwhile.
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from mesh.demo.runner import WORKLOADS, DemoError, DemoMesh, demo_ports, installed_plugins
from tests.harness import venv_bin

FRONTEND = WORKLOADS[:1]


@pytest.fixture(autouse=True)
def demo_ports_free(fixed_ports_lock):
    taken = []
    for address, port, what in demo_ports(FRONTEND):
        try:
            socket.create_connection((address, port), timeout=1.0).close()
        except OSError:
            continue
        taken.append(f"{address}:{port} ({what})")
    if taken:
        pytest.fail(f"the demo's ports are in use before the test: {', '.join(taken)}; stop the process holding "
                    "them (`ss -ltnp`)")


@pytest.fixture(scope="module")
def third_party():
    """The installed plugins that are not built in; the bootstrap installs peak_ewma and otlp."""
    plugins = installed_plugins()
    if "peak_ewma" not in plugins:
        pytest.fail(f"the peak_ewma plugin is not installed (installed: {plugins}); `make bootstrap` installs "
                    "plugins/txmesh-peak-ewma, which these tests need")
    return plugins


def loaded_plugins(tmp_path, plugins=()) -> tuple[list, str]:
    """Start the demo's control plane and frontend with *plugins*; the sidecar's loaded plugins and the
    demo's description."""
    with DemoMesh(tmp_path, workloads=FRONTEND, plugins=plugins) as mesh:
        mesh.start()
        dump = mesh.admin(FRONTEND[0], "/config_dump").json()
        return dump["plugins"], mesh.describe()


def test_the_demo_runs_the_builtin_plugins_only_by_default(tmp_path, third_party):
    loaded, description = loaded_plugins(tmp_path)
    assert "builtin.balancing" in loaded
    assert not set(third_party) & set(loaded), loaded
    assert "LEAST_REQUEST when it names none" in description
    assert "installed but left out: " in description and "peak_ewma (txmesh-peak-ewma" in description
    assert "meshctl demo --plugin " in description


def test_the_demo_loads_the_plugins_asked_for(tmp_path, third_party):
    loaded, description = loaded_plugins(tmp_path, plugins=("peak_ewma",))
    assert "peak_ewma" in loaded and "builtin.balancing" in loaded
    assert not (set(third_party) - {"peak_ewma"}) & set(loaded), loaded
    assert "plus peak_ewma (txmesh-peak-ewma" in description


def test_an_unknown_plugin_is_refused_before_anything_starts(tmp_path, third_party):
    with pytest.raises(DemoError, match=r"no plugin named nope is installed \(installed plugins: .*peak_ewma"):
        DemoMesh(tmp_path, plugins=("nope",))
    result = subprocess.run([venv_bin("meshctl"), "demo", "--plugin", "nope", "--state-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result
    assert "meshctl demo: no plugin named nope is installed" in result.stderr
    assert "`meshctl plugins` lists them" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists()
