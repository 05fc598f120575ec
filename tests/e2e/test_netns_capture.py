"""Transparent capture for real: two network namespaces as pods, iptables, an unmodified curl.

::

    client pod (netns, 10.99.0.1)                     server pod (netns, 10.99.0.2)
    curl http://10.99.0.2:8080/                       demo app "server" on 127.0.0.1:8080
      | OUTPUT nat: MESH_OUTPUT -> REDIRECT :15001      ^ inbound cluster (--app-port 8080)
    mesh-proxy (UID 1337) --- mTLS --> 10.99.0.2:8080 -> PREROUTING nat: MESH_INBOUND -> REDIRECT :15006
      (its own traffic: not captured)                 mesh-proxy (UID 1337): authz, XFCC

The server app listens on 127.0.0.1 only, so 10.99.0.2:8080 answers only through
the capture.  The client proxy routes the Host ``10.99.0.2:8080``, which names no
service, by the original destination (SO_ORIGINAL_DST): 10.99.0.2:8080 is an
endpoint of the ServiceEntry of ``server``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.harness import venv_bin, wait_for
from tests.harness.netns import (
    PROXY_UID,
    NetnsProcess,
    Pod,
    TestCA,
    metric_sum,
    pod_network,
    pod_workdir,
    start_sidecar,
)

CLIENT_IP, SERVER_IP = "10.99.0.1", "10.99.0.2"
APP_PORT = 8080
TD = "cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/server"
SERVER_CLUSTER = "outbound|8080||server.default.svc.cluster.local"
#: The server app's probes, as the injector records them for the sidecar (``--app-probers``).
SERVER_PROBERS = {"/app-health/server/readyz": {"httpGet": {"path": "/status/200", "port": APP_PORT}},
                  "/app-health/server/livez": {"httpGet": {"path": "/status/503", "port": APP_PORT}}}


def _client_config():
    return [{
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "server", "namespace": "default"},
        "spec": {"hosts": ["server.default.svc.cluster.local"], "location": "MESH_INTERNAL",
                 "ports": [{"number": APP_PORT, "name": "http", "protocol": "HTTP"}],
                 "resolution": "STATIC",
                 "endpoints": [{"address": SERVER_IP, "serviceAccount": "server",
                                "labels": {"security.istio.io/tlsMode": "istio"}}]},
    }]


def _server_config():
    return [{
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-client", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW",
                 "rules": [{"from": [{"source": {"principals": [f"{TD}/ns/default/sa/client"]}}]}]},
    }]


class CapturePod(Pod):
    def curl(self, url, *args, uid=None):
        """``(status, headers text, body)`` of a plain curl in this pod (-m 10)."""
        body_path = self.dir / f"body-{uid or 0}"  # writable by the UID curl runs as
        result = self.exec("curl", "-sS", "-m", "10", "-D", "-", "-o", str(body_path),
                           *args, url, uid=uid, timeout=15)
        if result.returncode != 0:
            return None, result.stderr.strip(), b""
        head = result.stdout
        status = int(head.split()[1]) if head.startswith("HTTP/") else None
        body = body_path.read_bytes()
        return status, head, body

    def nat_rules(self):
        return self.exec("iptables-save", "-t", "nat", check=True).stdout


def _start_pod(pods, netns, name, ca, workdir: Path, config, extra_args=()):
    pod_workdir(workdir, config)
    key, chain, _ = ca.issue("default", name)
    (workdir / "cert.pem").write_bytes(chain)
    (workdir / "ca.pem").write_bytes(ca.bundle_pem())
    key_path = workdir / "key.pem"
    key_path.write_bytes(key)
    os.chown(key_path, PROXY_UID, PROXY_UID)
    key_path.chmod(0o600)
    pods.start(NetnsProcess(
        f"{name}-app", netns, [venv_bin("python"), "-m", "mesh.demo.app", "--name", name, "--port", APP_PORT],
        workdir / "app.log", ready_argv=["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{APP_PORT}/"],
        cwd=workdir, env={"HOME": str(workdir)}))
    pod = CapturePod(pods, netns, name, workdir)
    pod.proxy = start_sidecar(
        pods, netns, name, workdir, "--service-account", name, "--label", f"app={name}", "--app-port", APP_PORT,
        "--cert", workdir / "cert.pem", "--key", key_path, "--ca-bundle", workdir / "ca.pem", *extra_args)
    return pod


@pytest.fixture(scope="module")
def mesh():
    started = time.monotonic()
    with pod_network("txm-netns-") as (pods, workdir):
        client_ns, server_ns = pods.add("client"), pods.add("server")
        pods.link(client_ns, f"{CLIENT_IP}/24", server_ns, f"{SERVER_IP}/24")
        ca = TestCA(TD)
        client = _start_pod(pods, client_ns, "client", ca, workdir / "client", _client_config())
        server = _start_pod(pods, server_ns, "server", ca, workdir / "server", _server_config(),
                            extra_args=["--app-probers", json.dumps(SERVER_PROBERS)])
        for pod in (client, server):
            pod.capture()
        yield {"client": client, "server": server, "ca": ca, "meshctl": str(venv_bin("meshctl")),
               "setup_s": time.monotonic() - started}


def test_rules_are_in_their_own_chains(mesh):
    rules = mesh["client"].nat_rules()
    for line in ("-A OUTPUT -p tcp -j MESH_OUTPUT", "-A PREROUTING -p tcp -j MESH_INBOUND",
                 f"-A MESH_OUTPUT -m owner --uid-owner {PROXY_UID} -j RETURN",
                 "-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
                 "-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"):
        assert line in rules, rules


def test_unmodified_curl_goes_through_both_sidecars_over_mtls(mesh):
    client, server = mesh["client"], mesh["server"]
    status, head, body = client.curl(f"http://{SERVER_IP}:{APP_PORT}/hello")
    assert status == 200, (head, body, client.dir)
    echo = json.loads(body)
    assert echo["service"] == "server" and echo["path"] == "/hello"
    xfcc = echo["headers"]["x-forwarded-client-cert"]
    fields = dict(part.split("=", 1) for part in xfcc.split(";"))
    assert fields["URI"] == CLIENT_ID, xfcc  # the caller's identity, proven by mTLS
    assert fields["By"] == SERVER_ID, xfcc  # terminated by the server's sidecar
    # the Host "10.99.0.2:8080" is no domain of the client's routes: the original destination routed it
    domains = [d for route in client.admin("/config_dump")["config"]["routes"] for d in route["domains"]]
    assert "server.default.svc.cluster.local" in domains and SERVER_IP not in domains
    # the client sidecar sent it to the endpoint over mTLS, expecting the server's identity
    outbound = client.admin("/clusters")[SERVER_CLUSTER]["endpoints"]
    assert outbound[0]["address"] == f"{SERVER_IP}:{APP_PORT}" and outbound[0]["identity"] == SERVER_ID
    assert outbound[0]["total_requests"] >= 1
    # the server sidecar forwarded it to its app
    inbound = server.admin("/clusters")[f"inbound|{APP_PORT}||"]["endpoints"]
    assert inbound[0]["address"] == f"127.0.0.1:{APP_PORT}" and inbound[0]["total_requests"] >= 1
    # and both sidecars' metrics say so: an mTLS request from the client's identity to the server's
    mtls = {"response_code": "200", "connection_security_policy": "mutual_tls",
            "source_principal": CLIENT_ID, "destination_principal": SERVER_ID}
    assert metric_sum(server.metrics(), "istio_requests_total", reporter="destination", **mtls) >= 1
    assert metric_sum(client.metrics(), "istio_requests_total", reporter="source",
                      **{**mtls, "connection_security_policy": "unknown"}) >= 1


def test_a_denied_principal_gets_403(mesh):
    """A workload with another identity calls the server pod over mTLS: RBAC denies it.

    The call is made as the proxy's UID, which the client pod's rules leave alone
    (were it captured, the client sidecar would pass its TLS through unchanged, as
    TCP to an address the registry knows; this test is about the server side).
    """
    client, ca = mesh["client"], mesh["ca"]
    key, chain, _ = ca.issue("default", "intruder")
    files = client.dir / "intruder"
    files.mkdir()
    (files / "key.pem").write_bytes(key)
    (files / "cert.pem").write_bytes(chain)
    for path in (files, files / "key.pem", files / "cert.pem"):
        os.chown(path, PROXY_UID, PROXY_UID)
    status, head, body = client.curl(f"https://{SERVER_IP}:{APP_PORT}/", "-k", "--cert", str(files / "cert.pem"),
                                     "--key", str(files / "key.pem"), uid=PROXY_UID)
    assert status == 403, (head, body)
    assert b"RBAC: access denied" in body


def test_the_kubelet_probe_reaches_the_health_port_past_capture(mesh):
    """Inbound capture leaves 15021 alone: a probe of the pod IP gets the proxy's /healthz/ready, not :15006.

    The probe comes from the other pod as UID 1337, so that the prober's own outbound capture stays out of
    the way, as the kubelet's traffic from the node is never captured.
    """
    status, head, body = mesh["client"].curl(f"http://{SERVER_IP}:15021/healthz/ready", uid=PROXY_UID)
    assert (status, body) == (200, b"ready\n"), head


def test_app_probes_reach_the_app_through_the_health_port_under_strict_mtls(mesh):
    """With STRICT mTLS, a plaintext probe of the app port (captured to :15006) fails; the rewritten probe of
    the pod IP's :15021/app-health/... reaches the app, and answers with its status."""
    client, server = mesh["client"], mesh["server"]
    config = server.dir / "config" / "mesh.yaml"
    plain = config.read_text()
    strict = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
              "metadata": {"name": "strict", "namespace": "default"}, "spec": {"mtls": {"mode": "STRICT"}}}
    before = server.admin("/config_dump")["version"]
    config.write_text(yaml.safe_dump_all([*_server_config(), strict]))
    try:
        server.proxy.send_signal(signal.SIGHUP)
        wait_for(lambda: server.admin("/config_dump")["version"] != before, timeout=5, what="STRICT in force")
        status, error, _ = client.curl(f"http://{SERVER_IP}:{APP_PORT}/healthz", uid=PROXY_UID)
        assert status is None, "a plaintext probe of the app port does not get through STRICT"
        status, head, body = client.curl(f"http://{SERVER_IP}:15021/app-health/server/readyz", uid=PROXY_UID)
        assert (status, body) == (200, f"the app answered 200 to GET /status/200 on port {APP_PORT}\n".encode()), head
        status, head, body = client.curl(f"http://{SERVER_IP}:15021/app-health/server/livez", uid=PROXY_UID)
        assert status == 503 and body.startswith(b"the app answered 503"), (head, body)
    finally:
        config.write_text(plain)
        server.proxy.send_signal(signal.SIGHUP)
        wait_for(lambda: server.admin("/config_dump")["version"] == before, timeout=5, what="the config back")


def test_clean_removes_everything(mesh):
    client, server, meshctl = mesh["client"], mesh["server"], mesh["meshctl"]
    for _ in range(2):  # idempotent
        result = client.exec(meshctl, "iptables", "--clean")
        assert result.returncode == 0, result.stderr
        assert "MESH_" not in client.nat_rules()
    # the client sidecar is out of the path: plaintext reaches the server pod's sidecar, which has no
    # principal to authorize
    status, head, body = client.curl(f"http://{SERVER_IP}:{APP_PORT}/")
    assert status == 403, (head, body)
    assert server.exec(meshctl, "iptables", "--clean").returncode == 0
    assert "MESH_" not in server.nat_rules()
    # nothing captures 10.99.0.2:8080 any more, and the app listens on loopback only
    status, error, _ = client.curl(f"http://{SERVER_IP}:{APP_PORT}/")
    assert status is None and "curl: (7)" in error, error  # connection refused
