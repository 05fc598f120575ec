"""Istio's egress-control and egress-timeouts tasks with captured traffic, for real.

::

    "app" pod (10.97.0.1)                                "ext" netns (10.97.0.2): no sidecar,
      sidecar REGISTRY_ONLY (UID 1337), capture on         unknown to the mesh but for its
      DNS server 127.0.0.1:5353 (twisted.names)            ServiceEntry; demo app on :80
            eth0 ------------------------------------------- eth0

An unmodified ``curl http://api.example.test/`` in the pod (``--resolve`` stands in for the app's own
DNS) is captured by iptables and routed by the sidecar by its Host header to the MESH_EXTERNAL
ServiceEntry ``api.example.test`` (``resolution: DNS``), whose address the sidecar resolves itself
through ``--dns-server``; a host without a ServiceEntry gets 502 under REGISTRY_ONLY, and the
VirtualService timeout of ``api.example.test`` applies.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import venv_bin
from tests.harness.dns_server import write_zone
from tests.harness.netns import NetnsProcess, Pod, pod_network, pod_workdir, start_sidecar

APP_IP, EXT_IP = "10.97.0.1", "10.97.0.2"
DNS_PORT = 5353
DNS_SERVER = Path(__file__).resolve().parents[1] / "harness" / "dns_server.py"

CONFIG = [
    {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "api-ext"},
     "spec": {"hosts": ["api.example.test"], "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
              "resolution": "DNS", "location": "MESH_EXTERNAL"}},
    {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "api-timeout"},
     "spec": {"hosts": ["api.example.test"],
              "http": [{"timeout": "1s", "route": [{"destination": {"host": "api.example.test"}}]}]}},
]


@pytest.fixture(scope="module")
def pod():
    with pod_network("txm-egress-dns-") as (pods, workdir):
        app_ns, ext_ns = pods.add("egress-app"), pods.add("egress-ext")
        pods.link(app_ns, f"{APP_IP}/24", ext_ns, f"{EXT_IP}/24")
        pods.start(NetnsProcess(
            "ext-http", ext_ns, [venv_bin("python"), "-m", "mesh.demo.app", "--name", "ext", "--port", 80,
                                 "--address", "0.0.0.0"],
            workdir / "ext-http.log", ready_argv=["curl", "-sf", "-o", "/dev/null", "http://127.0.0.1:80/"]))
        pod = Pod(pods, app_ns, "app", pod_workdir(workdir / "app", CONFIG))
        zone = workdir / "zone.json"
        write_zone(zone, {"api.example.test": [EXT_IP]})
        log = workdir / "dns.log"
        pods.start(NetnsProcess(
            "dns", app_ns, [venv_bin("python"), DNS_SERVER, "--port", DNS_PORT, "--zone", zone], log,
            ready_argv=["grep", "-q", "listening on", log]))
        pod.proxy = start_sidecar(pods, app_ns, "app", pod.dir, "--dns-server", f"127.0.0.1:{DNS_PORT}",
                                  "--outbound-traffic-policy", "REGISTRY_ONLY")
        pod.capture("--no-inbound")
        yield pod


def app_curl(pod, host, path="/"):
    """``(status, body)`` of an unmodified curl in the pod to ``http://host/path``, which it "resolves" to
    the external address, as the app's own DNS would; captured by iptables."""
    result = pod.exec("curl", "-sS", "-m", "10", "-o", "-", "-w", "\n%{http_code}",
                      "--resolve", f"{host}:80:{EXT_IP}", f"http://{host}{path}", timeout=15)
    body, _, status = result.stdout.rpartition("\n")
    return int(status or 0), body


def test_a_dns_service_entry_host_works_through_the_captured_sidecar(pod):
    status, body = app_curl(pod, "api.example.test", "/hello")
    assert status == 200, body
    assert '"service": "ext"' in body or '"service":"ext"' in body, body
    clusters = pod.admin("/clusters")["outbound|80||api.example.test"]
    assert [row["address"] for row in clusters["endpoints"]] == [f"{EXT_IP}:80"]
    assert clusters["dns"]["api.example.test"]["addresses"] == [EXT_IP]


def test_registry_only_blocks_a_host_without_service_entry(pod):
    status, body = app_curl(pod, "other.example.test")
    assert status == 502, body
    assert "REGISTRY_ONLY" in body, body


def test_the_virtual_service_timeout_applies_to_the_external_host(pod):
    status, body = app_curl(pod, "api.example.test", "/delay/3000")
    assert status == 504, body
