"""Egress TLS with captured traffic, for real: Istio's "Egress TLS Origination" and the HTTPS steps of
"Accessing External Services".

::

    "open" pod (10.96.0.1): sidecar ALLOW_ANY       "ext" netns (10.96.0.2, 10.96.1.2): no sidecar;
    "fenced" pod (10.96.1.1): sidecar REGISTRY_ONLY   tests/apps/tls_origin.py on :443, a certificate
        (UID 1337, capture on)                        for api.example from a test CA; it answers with
                                                      the SNI it saw

Both pods have the MESH_EXTERNAL ServiceEntry ``api.example`` as in Istio's task: port 80 HTTP with
``targetPort: 443`` (a DestinationRule originates TLS on it) and port 443 TLS.  Unmodified curls
(``--resolve`` stands in for the app's DNS):

- ``curl http://api.example/``: the sidecar originates TLS (SNI api.example, the test CA verified);
- ``curl https://api.example/``: the app's own TLS, passed through by SNI (curl verifies the server);
- ``curl -k https://unknown.example/`` to the same address and port: a server name no ServiceEntry
  has passes through under ALLOW_ANY, as Istio's passthrough filter chain, and is refused under
  REGISTRY_ONLY (BlackHoleCluster), whatever the address.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.harness import venv_bin
from tests.harness.netns import (
    NetnsProcess,
    Pod,
    metric_sum,
    pod_network,
    pod_workdir,
    start_sidecar,
)
from tests.harness.waiting import wait_for
from tests.integration.test_egress_tls import _pem
from tests.integration.test_identity_support import make_ca

OPEN_IP, EXT_IP = "10.96.0.1", "10.96.0.2"
FENCED_IP, EXT_IP_2 = "10.96.1.1", "10.96.1.2"
ORIGIN = Path(__file__).resolve().parents[1] / "apps" / "tls_origin.py"


def _config(ca_path: Path, ext_ip: str) -> list:
    return [
        {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "api"},
         "spec": {"hosts": ["api.example"], "location": "MESH_EXTERNAL", "resolution": "STATIC",
                  "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 443},
                            {"number": 443, "name": "https", "protocol": "TLS"}],
                  "endpoints": [{"address": ext_ip}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "api"},
         "spec": {"host": "api.example", "trafficPolicy": {"portLevelSettings": [
             {"port": {"number": 80}, "tls": {"mode": "SIMPLE", "caCertificates": str(ca_path)}}]}}},
    ]


@pytest.fixture(scope="module")
def pods():
    with pod_network("txm-egress-tls-") as (pods, workdir):
        open_ns, fenced_ns, ext_ns = pods.add("tls-open"), pods.add("tls-fenced"), pods.add("tls-ext")
        pods.link(open_ns, f"{OPEN_IP}/24", ext_ns, f"{EXT_IP}/24")
        pods.link(fenced_ns, f"{FENCED_IP}/24", ext_ns, f"{EXT_IP_2}/24", ifname="eth1")
        ca = make_ca("external-ca")
        ca_path = workdir / "ca.pem"
        ca_path.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
        cert, key = _pem(workdir, "api", ca, "api.example", ("api.example",))
        pods.start(NetnsProcess(
            "ext-tls", ext_ns, [venv_bin("python"), ORIGIN, "--address", "0.0.0.0", "--port", 443,
                                "--cert", cert, "--key", key],
            workdir / "ext-tls.log", ready_argv=["grep", "-q", "serving", workdir / "ext-tls.log"]))
        started = {}
        for name, netns, policy, ext_ip in (("open", open_ns, "ALLOW_ANY", EXT_IP),
                                            ("fenced", fenced_ns, "REGISTRY_ONLY", EXT_IP_2)):
            pod = Pod(pods, netns, name, pod_workdir(workdir / name, _config(ca_path, ext_ip)))
            pod.proxy = start_sidecar(pods, netns, name, pod.dir, "--outbound-traffic-policy", policy)
            pod.capture("--no-inbound")
            pod.ext_ip = ext_ip
            started[name] = pod
        started["ca"] = ca_path
        yield started


def _curl(pod, url: str, host: str, port: int, *args):
    """``(status, body, stderr)`` of an unmodified curl in ``pod``, ``host`` "resolved" to the external address."""
    result = pod.exec("curl", "-sS", "-m", "10", "-o", "-", "-w", "\n%{http_code}",
                      "--resolve", f"{host}:{port}:{pod.ext_ip}", *args, url, timeout=15)
    body, _, status = result.stdout.rpartition("\n")
    return int(status or 0), body, result.stderr


@pytest.mark.parametrize("name", ["open", "fenced"])
def test_plain_http_leaves_over_tls_the_sidecar_originates(pods, name):
    status, body, error = _curl(pods[name], "http://api.example/origination", "api.example", 80)
    assert status == 200, (body, error)
    seen = json.loads(body)
    assert (seen["sni"], seen["client"], seen["alpn"], seen["path"]) == ("api.example", None, None, "/origination")


@pytest.mark.parametrize("name", ["open", "fenced"])
def test_the_apps_own_tls_passes_through_by_sni(pods, name):
    status, body, error = _curl(pods[name], "https://api.example/own-tls", "api.example", 443,
                                "--cacert", str(pods["ca"]))
    assert status == 200, (body, error)  # curl verified the server's certificate: nothing terminated it
    assert json.loads(body)["sni"] == "api.example"


def test_an_unknown_server_name_passes_through_under_allow_any(pods):
    status, body, error = _curl(pods["open"], "https://unknown.example/", "unknown.example", 443, "-k")
    assert status == 200, (body, error)
    assert json.loads(body)["sni"] == "unknown.example"


def test_an_unknown_server_name_is_refused_under_registry_only(pods):
    fenced = pods["fenced"]
    status, body, error = _curl(fenced, "https://unknown.example/", "unknown.example", 443, "-k")
    assert status == 0, (body, error)
    log = fenced.dir / "proxy.log"
    wait_for(lambda: "with server name 'unknown.example' and the outbound traffic policy is REGISTRY_ONLY"
             in log.read_text(), timeout=5, what="the sidecar's log of the refused connection")
    labels = {"destination_service_name": "BlackHoleCluster", "reporter": "source", "request_protocol": "tcp"}
    assert metric_sum(fenced.metrics(), "istio_tcp_connections_closed_total", **labels) >= 1
