"""A sidecar does not load what only mesh-control needs: the external CA plugins' client libraries.

Every sidecar loads every installed plugin (entry points), so a plugin that imports its CA client at
module level costs each sidecar its memory: hvac and requests are about 6 MiB of RSS.  Likewise a
sidecar fed by mesh-control reads no YAML, so it does not load PyYAML (about 0.9 MiB), and a sidecar
loads Twisted names (about 0.6 MiB) only when it first resolves a DNS ServiceEntry's host name, and h2,
hpack and hyperframe (about 1.3 MiB) only at its first HTTP/2 connection: a ready sidecar that has
carried no HTTP/2 has none of them, Twisted Web's HTTP/2 included (mesh/proxy/web_http1.py).
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


READY_SIDECAR = """
import json, sys, threading, urllib.request
from twisted.internet import reactor
import twisted.plugins.mesh_services  # the twistd plugin, as `twistd mesh-proxy` loads it
from mesh.proxy import tap
from tests.harness.net import free_port  # never the same port twice (ports from port 0 may repeat)
from tests.harness.waiting import wait_for


admin = free_port()
options = tap.Options()
options.parseOptions(["--workload", "productpage", "--namespace", "bookinfo", "--admin-port", str(admin),
                      "--outbound-port", str(free_port()), "--inbound-port", str(free_port()),
                      "--health-port", "0", "--metrics-port", "0", *sys.argv[1:]])
service = tap.makeService(options)
loaded = []

def ready():
    return urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=5).status == 200

def wait_until_ready():
    try:
        wait_for(ready, timeout=30, what="the sidecar's /ready")
        loaded.extend(sys.modules)
    finally:
        reactor.callFromThread(reactor.stop)

reactor.callWhenRunning(service.startService)
threading.Thread(target=wait_until_ready, daemon=True).start()
reactor.run()
print(json.dumps(sorted(loaded)))
"""


def _loaded_by_sidecar(*options) -> set:
    """The modules a sidecar built with ``options`` has imported, and their top-level packages."""
    result = subprocess.run([sys.executable, "-c", BUILD_SIDECAR, *map(str, options)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout.splitlines()[-1]))
    return modules | {name.partition(".")[0] for name in modules}


def test_a_ready_sidecar_has_not_loaded_http2():
    result = subprocess.run([sys.executable, "-c", READY_SIDECAR, "--config-dir", BOOKINFO], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert {"mesh.proxy.pool", "twisted.web.http"} <= loaded, "a sidecar with its admin port"
    assert not loaded & {"h2", "hpack", "hyperframe", "mesh.proxy.codec.h2_client"}, \
        sorted(name for name in loaded if name.partition(".")[0] in {"h2", "hpack", "hyperframe"})


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
