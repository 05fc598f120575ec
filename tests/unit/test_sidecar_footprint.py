"""A sidecar does not load what only mesh-control needs: the external CA plugins' client libraries.

Every sidecar loads every installed plugin (entry points), so a plugin that imports its CA client at
module level costs each sidecar its memory: hvac and requests are about 6 MiB of RSS.  Likewise a
sidecar fed by mesh-control reads no YAML, so it does not load PyYAML (about 0.9 MiB), and a sidecar
loads Twisted names (about 0.6 MiB) only when it first resolves a DNS ServiceEntry's host name.
"""

import json
import subprocess
import sys
from pathlib import Path

from tests.harness.certs import ScratchCA

BOOKINFO = Path(__file__).resolve().parents[1] / "data" / "config" / "bookinfo"

BUILD_SIDECAR = """
import json, sys
import twisted.plugins.mesh_services  # the twistd plugin, as `twistd mesh-proxy` loads it
from mesh.proxy import tap
options = tap.Options()
options.parseOptions(["--workload", "productpage", "--namespace", "bookinfo", "--admin-port", "0", *sys.argv[1:]])
tap.makeService(options)
print(json.dumps(sorted(sys.modules)))
"""


def _loaded_by_sidecar(*options) -> set:
    """The modules a sidecar built with ``options`` has imported, and their top-level packages."""
    result = subprocess.run([sys.executable, "-c", BUILD_SIDECAR, *map(str, options)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout.splitlines()[-1]))
    return modules | {name.partition(".")[0] for name in modules}


def test_a_sidecar_loads_no_ca_client_library():
    loaded = _loaded_by_sidecar("--config-dir", BOOKINFO)
    assert {"txmesh_vault", "txmesh_awspca"} <= loaded, "the plugins are installed and loaded"
    assert not loaded & {"hvac", "requests", "boto3", "botocore"}, loaded & {"hvac", "requests", "boto3", "botocore"}
    assert "yaml" in loaded, "a config dir is YAML"
    assert "mesh.proxy.dns" in loaded and "twisted.names" not in loaded, "no name looked up yet"


def test_a_sidecar_fed_by_mesh_control_loads_no_yaml(tmp_path):
    ca = ScratchCA.create(tmp_path)
    token = tmp_path / "token"
    token.write_text("join-token")
    loaded = _loaded_by_sidecar("--control", "127.0.0.1:15012", "--ca-bundle", ca.cert_path, "--token-file", token)
    assert "mesh" in loaded and "yaml" not in loaded
