"""A sidecar does not load what only mesh-control needs: the external CA plugins' client libraries.

Every sidecar loads every installed plugin (entry points), so a plugin that imports its CA client at
module level costs each sidecar its memory: hvac and requests are about 6 MiB of RSS.
"""

import json
import subprocess
import sys
from pathlib import Path

BOOKINFO = Path(__file__).resolve().parents[1] / "data" / "config" / "bookinfo"

BUILD_SIDECAR = """
import json, sys
import twisted.plugins.mesh_services  # the twistd plugin, as `twistd mesh-proxy` loads it
from mesh.proxy import tap
options = tap.Options()
options.parseOptions(["--config-dir", sys.argv[1], "--workload", "productpage",
                      "--namespace", "bookinfo", "--admin-port", "0"])
tap.makeService(options)
print(json.dumps(sorted({name.partition(".")[0] for name in sys.modules})))
"""


def test_a_sidecar_loads_no_ca_client_library():
    result = subprocess.run([sys.executable, "-c", BUILD_SIDECAR, str(BOOKINFO)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert {"txmesh_vault", "txmesh_awspca"} <= loaded, "the plugins are installed and loaded"
    assert not loaded & {"hvac", "requests", "boto3", "botocore"}, loaded & {"hvac", "requests", "boto3", "botocore"}
