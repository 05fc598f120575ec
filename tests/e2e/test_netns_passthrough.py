"""Traffic the mesh does not know, through captured sidecars (Istio's outboundTrafficPolicy), for real.

::

    "client" pod (10.98.0.1)                        "ext" netns (10.98.0.2, 10.98.1.2): no sidecar,
      sidecar ALLOW_ANY (UID 1337), capture on       unknown to the mesh
      echo app 127.0.0.1:9000 (inbound passthrough)    :7000 TCP echo   :2525 server-first banner
            eth0 ------------------------------------  :8443 TLS (HTTP)  :8080 demo app (HTTP)
    "fenced" pod (10.98.1.1)                                 |
      sidecar REGISTRY_ONLY, PeerAuthentication STRICT       |
      echo app 127.0.0.1:9000 ----------------------- eth1 --+

Unmodified clients (curl, a plain socket) in the pods dial the ext addresses; iptables sends every
connection to the pod's sidecar, which sniffs it: HTTP is routed (PassthroughCluster / 502 with
BlackHoleCluster), anything else is spliced to the original destination or closed.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.harness import venv_bin
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
from tests.harness.waiting import wait_for

CLIENT_IP, EXT_IP = "10.98.0.1", "10.98.0.2"
FENCED_IP, EXT_IP_2 = "10.98.1.1", "10.98.1.2"
ECHO, BANNER, TLS, HTTP, POD_ECHO, LOOP, H2C = 7000, 2525, 8443, 8080, 9000, 7777, 8082
PEERS = Path(__file__).resolve().parents[1] / "apps" / "tcp_peers.py"
H2_APP = Path(__file__).resolve().parents[1] / "apps" / "h2_app.py"
DETECTION_TIMEOUT = 0.3
MAX_TUNNELS = 2


class PassthroughPod(Pod):
    def call(self, host, port, send="", shut=False, timeout=5.0) -> dict:
        """:mod:`tests.apps.tcp_peers` ``call`` from this namespace: an unmodified TCP client."""
        argv = [venv_bin("python"), PEERS, "call", host, port, "--timeout", timeout]
        if send:
            argv += ["--send", send]
        if shut:
            argv.append("--shut")
        result = self.exec(*argv, check=True, timeout=timeout + 10)
        return json.loads(result.stdout)

    def curl(self, url, *args):
        """``(status or None, stderr, body)`` of a plain curl in this namespace."""
        result = self.exec("curl", "-sS", "-m", "10", "-o", "-", "-w", "\n%{http_code}", *args, url, timeout=15)
        body, _, status = result.stdout.rpartition("\n")
        return (int(status) if status.strip("0") else None), result.stderr.strip(), body

    def log(self) -> str:
        return (self.dir / "proxy.log").read_text(errors="replace")

    def tcp_access_log(self, **fields) -> list[dict]:
        """The TCP lines of the sidecar's access log (JSON objects on its stdout, in proxy.log) that have
        ``fields``; waits, with a deadline, for at least one (lines are written once a second)."""

        def matching():
            entries = [json.loads(line) for line in self.log().splitlines() if line.startswith('{"start_time"')]
            return [entry for entry in entries
                    if entry["protocol"] == "tcp" and fields.items() <= entry.items()]

        return wait_for(matching, timeout=5, what=f"a TCP access-log line with {fields}")


def _start_pod(pods, netns, name, workdir: Path, config, *proxy_args, hooks=False):
    """A pod: its echo app and its sidecar; with ``hooks``, the sidecar loads tests/plugins/txmesh_hooks.py,
    which logs the connection hooks to ``workdir/hooks.jsonl``."""
    pod_workdir(workdir, config)
    env = _hooks_plugin_env(workdir) if hooks else None
    pods.start(NetnsProcess(
        f"{name}-echo", netns, [venv_bin("python"), PEERS, "serve", "--address", "127.0.0.1", "--echo", POD_ECHO],
        workdir / "echo.log", ready_argv=[venv_bin("python"), PEERS, "call", "127.0.0.1", POD_ECHO, "--shut"],
        cwd=workdir, env={"HOME": str(workdir)}))
    pod = PassthroughPod(pods, netns, name, workdir)
    pod.proxy = start_sidecar(pods, netns, name, workdir, "--app-port", HTTP,
                              "--protocol-detection-timeout", f"{DETECTION_TIMEOUT}s", *proxy_args, env=env)
    return pod


def _hooks_plugin_env(workdir: Path) -> dict:
    """The environment that makes a sidecar load the test plugin tests/plugins/txmesh_hooks.py."""
    info = workdir / "hooks-dist" / "txmesh_hooks-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: txmesh-hooks\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mesh.plugins]\nhooks = txmesh_hooks\n")
    plugins = Path(__file__).resolve().parents[1] / "plugins"
    return {"PYTHONPATH": f"{plugins}:{workdir / 'hooks-dist'}", "TXMESH_HOOKS_LOG": str(workdir / "hooks.jsonl")}


@pytest.fixture(scope="module")
def mesh():
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    with pod_network("txm-passthrough-") as (pods, workdir):
        client_ns, fenced_ns, ext_ns = pods.add("client"), pods.add("fenced"), pods.add("ext")
        pods.link(client_ns, f"{CLIENT_IP}/24", ext_ns, f"{EXT_IP}/24")
        pods.link(fenced_ns, f"{FENCED_IP}/24", ext_ns, f"{EXT_IP_2}/24", ifname="eth1")
        ext = PassthroughPod(pods, ext_ns, "ext", workdir / "ext")
        ext.dir.mkdir()
        key, chain, _ = TestCA().issue("ext", "tls")
        (ext.dir / "key.pem").write_bytes(key)
        (ext.dir / "cert.pem").write_bytes(chain)
        pods.start(NetnsProcess(
            "ext-peers", ext_ns, [venv_bin("python"), PEERS, "serve", "--echo", ECHO, "--banner", BANNER,
                                  "--tls", TLS, "--cert", ext.dir / "cert.pem", "--key", ext.dir / "key.pem"],
            ext.dir / "peers.log", ready_argv=[venv_bin("python"), PEERS, "call", "127.0.0.1", ECHO, "--shut"]))
        pods.start(NetnsProcess(
            "ext-http", ext_ns, [venv_bin("python"), "-m", "mesh.demo.app", "--name", "ext", "--port", HTTP,
                                 "--address", "0.0.0.0"],
            ext.dir / "http.log", ready_argv=["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{HTTP}/"]))
        pods.start(NetnsProcess(
            "ext-h2c", ext_ns, [venv_bin("python"), H2_APP, "--port", H2C, "--address", "0.0.0.0"],
            ext.dir / "h2c.log", ready_argv=["curl", "-sf", "--http2-prior-knowledge", "-o", "/dev/null",
                                             f"http://127.0.0.1:{H2C}/"]))
        client = _start_pod(pods, client_ns, "client", workdir / "client", [],
                            "--max-passthrough-connections", MAX_TUNNELS, "--label", "app=client", hooks=True)
        strict = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                  "metadata": {"name": "strict", "namespace": "default"}, "spec": {"mtls": {"mode": "STRICT"}}}
        fenced = _start_pod(pods, fenced_ns, "fenced", workdir / "fenced", [strict],
                            "--outbound-traffic-policy", "REGISTRY_ONLY", "--label", "app=fenced")
        for pod in (client, fenced):
            pod.capture()
        yield {"client": client, "fenced": fenced, "ext": ext}


def test_tcp_to_an_unknown_destination_passes_through_with_half_close(mesh):
    client = mesh["client"]
    reply = client.call(EXT_IP, ECHO, send="hello over raw tcp\n", shut=True)
    # the echo server saw our FIN (it answers [eof] only then) and its close came back
    assert reply == {**reply, "received": "hello over raw tcp\n[eof]", "eof": True, "error": None}, reply
    passthrough = client.admin("/config_dump")["passthrough"]
    assert passthrough["outbound_traffic_policy"] == "ALLOW_ANY"
    assert passthrough["outbound"]["opened_total"] >= 1
    wait_for(lambda: client.admin("/config_dump")["passthrough"]["outbound"]["open"] == 0, timeout=5,
             what="the tunnel to close")
    metrics = client.metrics()
    labels = {"destination_service_name": "PassthroughCluster", "reporter": "source", "request_protocol": "tcp"}
    assert metric_sum(metrics, "istio_tcp_connections_opened_total", **labels) >= 1, metrics
    assert metric_sum(metrics, "istio_tcp_connections_closed_total", **labels) >= 1
    assert metric_sum(metrics, "istio_tcp_received_bytes_total", **labels) >= len("hello over raw tcp\n")
    [entry] = client.tcp_access_log(downstream_local_address=f"{EXT_IP}:{ECHO}", bytes_received=19, bytes_sent=24)
    assert entry == {**entry, "direction": "outbound", "upstream_cluster": "PassthroughCluster",
                     "upstream_host": f"{EXT_IP}:{ECHO}", "downstream_remote_address": CLIENT_IP,
                     "response_flags": "-"}, entry
    assert 0 <= entry["duration"] < 5000, entry  # whole ms, as Envoy's


def test_a_tcp_tunnel_is_reported_open_and_complete_once_to_the_connection_hooks(mesh):
    client = mesh["client"]
    log = client.dir / "hooks.jsonl"

    def tcp_events():
        lines = log.read_text().splitlines() if log.exists() else []
        return [event for event in map(json.loads, lines) if event["protocol"] == "tcp"]

    before = len(tcp_events())
    reply = client.call(EXT_IP, ECHO, send="hooks over tcp\n", shut=True)
    assert reply["received"] == "hooks over tcp\n[eof]", reply
    wait_for(lambda: any(event["event"] == "complete" for event in tcp_events()[before:]), timeout=5,
             what="mesh_connection_complete for the tunnel")
    opened, complete = tcp_events()[before:]
    assert (opened["event"], complete["event"], opened["id"]) == ("open", "complete", complete["id"])
    assert complete == {**complete, "direction": "outbound", "source_address": CLIENT_IP,
                        "destination": [EXT_IP, ECHO], "upstream": [EXT_IP, ECHO], "peer": None,
                        "bytes_received": len("hooks over tcp\n"), "bytes_sent": len("hooks over tcp\n[eof]"),
                        "requests": 0}, complete
    assert complete["duration"] > 0 and complete["start"] == opened["start"]


def test_https_to_an_unknown_destination_passes_through(mesh):
    status, error, body = mesh["client"].curl(f"https://{EXT_IP}:{TLS}/", "-k")
    assert (status, body) == (200, "tls ok\n"), error
    result = mesh["client"].exec("openssl", "s_client", "-connect", f"{EXT_IP}:{TLS}", "-brief", timeout=15,
                                 check=False)
    assert "CONNECTION ESTABLISHED" in result.stderr, result.stderr


def test_a_declared_tcp_port_is_routed_at_once_not_sniffed(mesh):
    """A ServiceEntry TCP port at the destination: the captured connection is routed to its cluster without
    the detection timeout (Istio never sniffs a declared protocol), so the banner comes at once."""
    client = mesh["client"]
    entry = {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
             "metadata": {"name": "banner", "namespace": "default"},
             "spec": {"hosts": ["banner.ext"], "addresses": [EXT_IP], "location": "MESH_EXTERNAL",
                      "resolution": "STATIC", "ports": [{"number": BANNER, "name": "tcp-banner", "protocol": "TCP"}],
                      "endpoints": [{"address": EXT_IP}]}}
    path = client.dir / "config" / "banner.yaml"

    def reload():
        version = client.admin("/config_dump")["version"]
        client.proxy.send_signal(signal.SIGHUP)
        wait_for(lambda: client.admin("/config_dump")["version"] != version, timeout=5, what="the config reload")

    path.write_text(yaml.safe_dump(entry))
    try:
        reload()
        reply = client.call(EXT_IP, BANNER, timeout=3)
        assert reply["received"].startswith("220 ready") and reply["first_byte_s"] < DETECTION_TIMEOUT, reply
        [entry] = client.tcp_access_log(upstream_cluster=f"outbound|{BANNER}||banner.ext")
        assert entry == {**entry, "upstream_host": f"{EXT_IP}:{BANNER}", "response_flags": "-"}, entry
    finally:
        path.unlink()
        reload()


def test_a_server_first_protocol_works_after_the_detection_timeout(mesh):
    reply = mesh["client"].call(EXT_IP, BANNER, timeout=3)  # the client sends nothing: it waits for the banner
    assert reply["received"].startswith("220 ready\r\n"), reply
    assert DETECTION_TIMEOUT * 0.9 <= reply["first_byte_s"] < DETECTION_TIMEOUT + 2.0, reply


def test_plain_http_to_an_unknown_destination_goes_to_the_passthrough_cluster(mesh):
    client = mesh["client"]
    status, error, body = client.curl(f"http://{EXT_IP}:{HTTP}/hello")
    assert status == 200, (error, body)
    echo = json.loads(body)
    assert echo["service"] == "ext" and echo["path"] == "/hello"
    assert "x-request-id" in echo["headers"]  # routed as HTTP by the sidecar, not spliced
    metrics = client.metrics()
    assert metric_sum(metrics, "istio_requests_total", destination_service_name="PassthroughCluster",
                   destination_service="PassthroughCluster", response_code="200") >= 1, metrics


def test_http2_to_an_unknown_destination_stays_http2(mesh):
    """As Envoy's PassthroughCluster (the downstream protocol upstream): an h2c-only server is reachable."""
    status, error, body = mesh["client"].curl(f"http://{EXT_IP}:{H2C}/h2", "--http2-prior-knowledge")
    assert status == 200, (error, body)
    echo = json.loads(body)
    assert echo["path"] == "/h2" and "x-request-id" in echo["headers"], echo  # routed by the sidecar


def test_the_destination_refusing_closes_the_client_quickly_and_is_logged(mesh):
    client = mesh["client"]
    reply = client.call(EXT_IP, 6999, send="anyone there?\n")  # nothing listens on 6999
    assert reply["received"] == "" and (reply["eof"] or reply["error"]), reply
    assert reply["seconds"] < 2.0, reply
    # 10.98.7.0/24 is routed for the app (so its connection is captured) but unreachable for the proxy's UID
    setup = [("ip", "route", "add", "10.98.7.0/24", "dev", "eth0"),
             ("ip", "route", "add", "unreachable", "10.98.7.0/24", "table", "77"),
             ("ip", "rule", "add", "uidrange", f"{PROXY_UID}-{PROXY_UID}", "lookup", "77")]
    for argv in setup:
        client.exec(*argv, check=True)
    try:
        unreachable = client.call("10.98.7.7", 5432, send="*1\r\n$4\r\nPING\r\n")
    finally:
        client.exec("ip", "rule", "del", "uidrange", f"{PROXY_UID}-{PROXY_UID}", "lookup", "77", check=True)
    assert unreachable["received"] == "" and unreachable["seconds"] < 2.0, unreachable
    wait_for(lambda: "10.98.7.7:5432 failed" in client.log(), timeout=5, what="the failure in the proxy log")
    assert f"{EXT_IP}:6999 failed: connection refused" in client.log()
    for destination in (f"{EXT_IP}:6999", "10.98.7.7:5432"):
        [entry] = client.tcp_access_log(downstream_local_address=destination)
        assert entry == {**entry, "response_flags": "UF", "upstream_cluster": "PassthroughCluster",
                         "upstream_host": None, "bytes_sent": 0, "bytes_received": 0}, entry


def test_tunnels_beyond_the_limit_are_closed(mesh):
    client = mesh["client"]
    holders = [subprocess.Popen(["ip", "netns", "exec", client.netns, venv_bin("python"), PEERS, "call", EXT_IP,
                                 str(ECHO), "--send", "hold\n", "--timeout", "4"], stdout=subprocess.PIPE, text=True)
               for _ in range(MAX_TUNNELS)]
    try:
        wait_for(lambda: client.admin("/config_dump")["passthrough"]["outbound"]["open"] == MAX_TUNNELS, timeout=5,
                 what="the tunnels to be open")
        reply = client.call(EXT_IP, ECHO, send="one too many\n")
        assert reply["received"] == "" and reply["seconds"] < 2.0, reply
        assert f"{MAX_TUNNELS} passthrough connections are open (the limit)" in client.log()
        assert metric_sum(client.metrics(), "istio_tcp_connections_closed_total", response_flags="UO") == 1
    finally:
        for holder in holders:
            holder.kill()
            holder.communicate()


def test_registry_only_blocks_http_with_502_and_tcp_by_closing(mesh):
    fenced = mesh["fenced"]
    status, error, body = fenced.curl(f"http://{EXT_IP_2}:{HTTP}/")
    assert status == 502, (error, body)
    assert "REGISTRY_ONLY" in body and "ServiceEntry" in body, body
    reply = fenced.call(EXT_IP_2, ECHO, send="let me out\n", shut=True)
    assert reply["received"] == "" and reply["seconds"] < 2.0, reply
    status, error, _ = fenced.curl(f"https://{EXT_IP_2}:{TLS}/", "-k")
    assert status is None and "curl: (35)" in error, error  # the TLS handshake never reached the server
    wait_for(lambda: "closed: the destination is not in the mesh registry" in fenced.log(), timeout=5,
             what="the blocked connection in the proxy log")
    metrics = fenced.metrics()
    assert metric_sum(metrics, "istio_requests_total", destination_service_name="BlackHoleCluster",
                   response_code="502", response_flags="UH") >= 1, metrics
    assert metric_sum(metrics, "istio_tcp_connections_closed_total", destination_service_name="BlackHoleCluster",
                   response_flags="UH") >= 2, metrics
    [entry] = fenced.tcp_access_log(downstream_local_address=f"{EXT_IP_2}:{ECHO}")
    assert entry == {**entry, "response_flags": "UH", "upstream_cluster": "BlackHoleCluster", "upstream_host": None,
                     "downstream_remote_address": FENCED_IP}, entry


def test_inbound_plaintext_tcp_passes_to_the_app_port_unless_strict(mesh):
    ext = mesh["ext"]
    reply = ext.call(CLIENT_IP, POD_ECHO, send="inbound\n", shut=True)  # PERMISSIVE (no PeerAuthentication)
    assert reply["received"] == "inbound\n[eof]", reply
    [entry] = mesh["client"].tcp_access_log(direction="inbound", downstream_local_address=f"{CLIENT_IP}:{POD_ECHO}")
    assert entry == {**entry, "upstream_cluster": "InboundPassthroughClusterIpv4", "response_flags": "-",
                     "upstream_host": f"127.0.0.1:{POD_ECHO}", "downstream_remote_address": EXT_IP,
                     "bytes_received": 8, "bytes_sent": 13}, entry
    refused = ext.call(FENCED_IP, POD_ECHO, send="inbound\n", shut=True)  # STRICT: plaintext refused
    assert refused["received"] == "", refused
    assert "plaintext on a STRICT mTLS port" in mesh["fenced"].log()


def test_inbound_tcp_is_authorized_by_the_policies_for_tcp(mesh):
    """The inbound passthrough evaluates the AuthorizationPolicies for TCP, as Istio's passthrough chain does:
    plaintext has no principal, so an ALLOW by principal refuses it, and one by IP block lets it through."""
    client, ext = mesh["client"], mesh["ext"]

    def policy(source):
        return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "callers", "namespace": "default"},
                "spec": {"action": "ALLOW", "rules": [{"from": [{"source": source}]}]}}

    path = client.dir / "config" / "authz.yaml"

    def apply(*documents):
        version = client.admin("/config_dump")["version"]
        if documents:
            path.write_text(yaml.safe_dump_all(documents))
        else:
            path.unlink()
        client.proxy.send_signal(signal.SIGHUP)
        wait_for(lambda: client.admin("/config_dump")["version"] != version, timeout=5, what="the config reload")

    try:
        apply(policy({"principals": ["cluster.local/ns/default/sa/frontend"]}))
        refused = ext.call(CLIENT_IP, POD_ECHO, send="inbound\n", shut=True)
        assert refused["received"] == "", refused
        wait_for(lambda: "denied by AuthorizationPolicy (rbac_access_denied_matched_policy[none])" in client.log(),
                 timeout=5, what="the refusal in the proxy log")
        apply(policy({"ipBlocks": [f"{EXT_IP}/32"]}))
        assert ext.call(CLIENT_IP, POD_ECHO, send="allowed\n", shut=True)["received"] == "allowed\n[eof]"
    finally:
        apply()
    assert ext.call(CLIENT_IP, POD_ECHO, send="again\n", shut=True)["received"] == "again\n[eof]"


def test_port_level_mtls_applies_to_the_captured_port_not_the_app_port(mesh):
    """portLevelMtls for the echo port (not the app port, 8080) decides the plaintext captured to it, both ways,
    as Istio's passthrough chains do since 1.9: PERMISSIVE with {9000: STRICT} refuses it (HTTP to the app port
    still gets in), STRICT with {9000: DISABLE} passes it to the app (and still refuses the app port)."""
    client, fenced, ext = mesh["client"], mesh["fenced"], mesh["ext"]

    def apply(pod, mode=None, port_mode=None):
        path = pod.dir / "config" / "port-mtls.yaml"
        version = pod.admin("/config_dump")["version"]
        if mode is None:
            if not path.exists():
                return
            path.unlink()
        else:
            path.write_text(yaml.safe_dump({
                "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                "metadata": {"name": f"{pod.name}-ports", "namespace": "default"},
                "spec": {"selector": {"matchLabels": {"app": pod.name}}, "mtls": {"mode": mode},
                         "portLevelMtls": {POD_ECHO: {"mode": port_mode}}}}))
        pod.proxy.send_signal(signal.SIGHUP)
        wait_for(lambda: pod.admin("/config_dump")["version"] != version, timeout=5, what="the config reload")

    try:
        apply(client, "PERMISSIVE", "STRICT")
        refused = ext.call(CLIENT_IP, POD_ECHO, send="inbound\n", shut=True)
        assert refused["received"] == "", refused
        wait_for(lambda: f"to port {POD_ECHO} refused: plaintext on a STRICT mTLS port" in client.log(), timeout=5,
                 what="the refusal in the proxy log")
        status, error, _ = ext.curl(f"http://{CLIENT_IP}:{HTTP}/")  # PERMISSIVE: in, to an app that is not there
        assert status == 503, error
        apply(fenced, "UNSET", "DISABLE")  # inherits the namespace's STRICT, but not on 9000
        assert ext.call(FENCED_IP, POD_ECHO, send="let me in\n", shut=True)["received"] == "let me in\n[eof]"
        assert ext.call(FENCED_IP, HTTP, send="inbound\n", shut=True)["received"] == ""
        wait_for(lambda: f"to port {HTTP} refused: plaintext on a STRICT mTLS port" in fenced.log(), timeout=5,
                 what="the refusal in the proxy log")
    finally:
        apply(client)
        apply(fenced)
    assert ext.call(CLIENT_IP, POD_ECHO, send="again\n", shut=True)["received"] == "again\n[eof]"
    assert ext.call(FENCED_IP, POD_ECHO, send="again\n", shut=True)["received"] == ""


def test_a_sidecar_whose_own_traffic_is_captured_stops_the_loop(mesh):
    """Misconfigured capture: a rule sends the proxy's own connections to port 7777 back to it."""
    client = mesh["client"]
    rule = ["-t", "nat", "-I", "MESH_OUTPUT", "1", "-p", "tcp", "--dport", str(LOOP), "-j", "MESH_REDIRECT"]
    client.exec("iptables", "-w", *rule, check=True)
    try:
        started = time.monotonic()
        reply = client.call(EXT_IP, LOOP, send="loop?\n")
        assert reply["received"] == "" and time.monotonic() - started < 5, reply
        wait_for(lambda: "was captured and came back" in client.log(), timeout=5, what="the loop in the log")
        wait_for(lambda: client.admin("/config_dump")["passthrough"]["outbound"]["open"] == 0, timeout=5,
                 what="no tunnel left open")
    finally:
        client.exec("iptables", "-w", "-t", "nat", "-D", "MESH_OUTPUT", "-p", "tcp", "--dport", str(LOOP),
                    "-j", "MESH_REDIRECT", check=True)
