"""Egress to DNS ServiceEntries (``resolution: DNS`` / ``DNS_ROUND_ROBIN``) through a real sidecar.

A real authoritative DNS server (:mod:`tests.harness.dns_server`, 1 s TTL) on loopback serves the
names; the sidecar resolves them (``--dns-server``) and re-resolves on the TTL.  Two demo apps listen
on the same port at 127.0.0.1 ("ext-a") and 127.0.0.2 ("ext-b"), so a record names which one
serves.  As Istio's "Accessing External Services" task: a MESH_EXTERNAL ServiceEntry for an HTTP
host on port 80, a VirtualService timeout on it, and ``--outbound-traffic-policy REGISTRY_ONLY``.
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.harness.dns_server import DnsServer
from tests.harness.net import free_port
from tests.harness.proxy import Proxy
from tests.harness.waiting import wait_for
from tests.integration.test_proxy_support import NETWORKING, cluster_endpoints, virtual_service, write_config
from tests.integration.test_telemetry_support import access_log

A, B = "127.0.0.1", "127.0.0.2"


def dns_entry(name, host, resolution="DNS", target_port=None, endpoints=None) -> dict:
    """A MESH_EXTERNAL ServiceEntry for ``host`` on HTTP port 80 (as Istio's egress tasks)."""
    port = {"number": 80, "name": "http", "protocol": "HTTP"}
    if target_port:
        port["targetPort"] = target_port
    spec = {"hosts": [host], "location": "MESH_EXTERNAL", "resolution": resolution, "ports": [port]}
    if endpoints:
        spec["endpoints"] = endpoints
    return {"apiVersion": NETWORKING, "kind": "ServiceEntry", "metadata": {"name": name}, "spec": spec}


@pytest.fixture(scope="module")
def apps(backend_factory):
    first = backend_factory("ext-a", address=A)
    return {"ext-a": first, "ext-b": backend_factory("ext-b", port=first.port, address=B)}


@pytest.fixture(scope="module")
def mesh(apps, proxy_factory, process_log_dir, tmp_path_factory):
    port = apps["ext-a"].port
    dns = DnsServer({"api.example.test": [A], "pool.example.test": [A, B], "rr.example.test": [B, A]},
                    log_dir=process_log_dir)
    dns.start()
    config = write_config(
        tmp_path_factory.mktemp("egress-dns-config"),
        dns_entry("api", "api.example.test", target_port=port),
        dns_entry("pool", "pool.example.test",
                  endpoints=[{"address": "pool.example.test", "ports": {"http": port}}]),
        dns_entry("rr", "rr.example.test", "DNS_ROUND_ROBIN", target_port=port),
        dns_entry("late", "late.example.test", target_port=port),
        virtual_service("api-timeout", ["api.example.test"],
                        [{"route": [{"destination": {"host": "api.example.test"}}], "timeout": "0.5s"}]),
    )
    log = tmp_path_factory.mktemp("egress-dns-logs") / "access.log"
    proxy = proxy_factory(config, "client", extra_args=[
        "--dns-server", dns.address, "--outbound-traffic-policy", "REGISTRY_ONLY", "--access-log", log])
    state = {"dns": dns, "proxy": proxy, "log": log, "port": port}
    yield state
    state["dns"].stop()


def served(proxy, host, path="/"):
    """The demo app that answered a GET of ``host`` through the sidecar (asserts 200)."""
    result = proxy.curl(host, path)
    assert result.status == 200, (result.status, result.body)
    return result.headers["x-demo-service"]


def addresses(mesh, host) -> set:
    """The endpoint addresses of ``host``'s cluster on the sidecar's admin /clusters page."""
    return set(cluster_endpoints(mesh["proxy"], f"outbound|80||{host}"))


def dns_state(mesh, host) -> dict:
    """The /clusters page's view of the DNS name ``host`` of its own cluster."""
    return mesh["proxy"].admin("/clusters")[f"outbound|80||{host}"]["dns"][host]


def test_names_resolve_as_envoys_strict_and_logical_dns(mesh):
    port = mesh["port"]
    wait_for(lambda: addresses(mesh, "api.example.test") == {f"{A}:{port}"}, 10, what="api resolved")
    assert served(mesh["proxy"], "api.example.test") == "ext-a"
    # DNS: every address is an endpoint (STRICT_DNS); the hostname endpoint gets its own port
    wait_for(lambda: addresses(mesh, "pool.example.test") == {f"{A}:{port}", f"{B}:{port}"}, 10,
             what="pool resolved")
    assert served(mesh["proxy"], "pool.example.test") in ("ext-a", "ext-b")
    # DNS_ROUND_ROBIN: the first address only (LOGICAL_DNS)
    wait_for(lambda: addresses(mesh, "rr.example.test") == {f"{B}:{port}"}, 10, what="rr resolved")
    assert served(mesh["proxy"], "rr.example.test") == "ext-b"
    assert dns_state(mesh, "api.example.test")["ttl"] == 1


def test_the_virtual_service_timeout_applies(mesh):
    result = mesh["proxy"].curl("api.example.test", "/delay/2000")
    assert (result.status, result.headers.get("x-mesh-flags")) == (504, "UT")


def test_registry_only_still_refuses_unknown_hosts(mesh):
    result = mesh["proxy"].curl("unknown.example.test")
    assert (result.status, result.headers.get("x-mesh-flags")) == (404, "NR")


def test_a_record_change_moves_traffic_without_restart(mesh):
    proxy, dns = mesh["proxy"], mesh["dns"]
    pid = proxy.pid
    with ThreadPoolExecutor(1) as pool:  # a request in flight on the old address while the record changes
        slow = pool.submit(proxy.curl, "api.example.test", "/delay/400")
        wait_for(lambda: any(row["active_requests"] for row in cluster_endpoints(
            proxy, "outbound|80||api.example.test").values()), 5, what="the slow request in flight")
        dns.set_records({"api.example.test": [B], "pool.example.test": [A, B], "rr.example.test": [B, A]})
        wait_for(lambda: served(proxy, "api.example.test") == "ext-b", 10, what="api to move to ext-b")
        assert (slow.result().status, slow.result().headers["x-demo-service"]) == (200, "ext-a")
    assert addresses(mesh, "api.example.test") == {f"{B}:{mesh['port']}"}
    assert proxy.pid == pid and proxy.running


def test_a_name_never_resolved_gets_503_uh_then_recovers(mesh):
    proxy, dns = mesh["proxy"], mesh["dns"]
    request_id = str(uuid.uuid4())
    result = proxy.curl("late.example.test", headers={"x-request-id": request_id})
    assert (result.status, result.headers.get("x-mesh-flags")) == (503, "UH")
    assert b"DNS name late.example.test resolved to no address" in result.body, result.body
    entry = wait_for(lambda: next((line for line in access_log(mesh["log"]) if line["request_id"] == request_id),
                                  None), 10, what="the access-log line")
    assert (entry["response_flags"], entry["response_code_details"]) == \
        ("UH", "no_healthy_upstream{dns_no_address}")
    dns.set_records({"api.example.test": [B], "late.example.test": [A]})
    wait_for(lambda: proxy.curl("late.example.test").status == 200, 10, what="late.example.test to resolve")
    assert served(proxy, "late.example.test") == "ext-a"


def test_dns_down_keeps_the_last_addresses_then_recovers(mesh):
    proxy, dns = mesh["proxy"], mesh["dns"]
    dns.stop()
    wait_for(lambda: dns_state(mesh, "api.example.test")["failures"] >= 1, 10, what="a failed lookup")
    assert "timed out" in dns_state(mesh, "api.example.test")["error"]
    assert served(proxy, "api.example.test") == "ext-b"  # the last known address
    assert proxy.log_path.read_text().count("DNS lookup of api.example.test failed") == 1
    dns.set_records({"api.example.test": [A], "late.example.test": [A]})
    mesh["dns"] = dns.restarted()
    wait_for(lambda: served(proxy, "api.example.test") == "ext-a", 15, what="api to follow the new record")
    assert dns_state(mesh, "api.example.test")["failures"] == 0
    assert "DNS lookup of api.example.test succeeds again" in proxy.log_path.read_text()


def test_without_an_answer_the_sidecar_warms_then_answers_503_uh(mesh, process_log_dir, tmp_path_factory):
    """No DNS server answers: /ready waits for the first lookup (Envoy's cluster warming), then the
    never-resolved name gets 503 UH saying the lookup timed out."""
    config = write_config(tmp_path_factory.mktemp("egress-dns-dead"), dns_entry("api", "api.example.test"))
    proxy = Proxy(config, "lonely", log_dir=process_log_dir,
                  extra_args=["--dns-server", f"127.0.0.1:{free_port('127.0.0.1')}"]).spawn()
    try:
        status, body = wait_for(lambda: _ready(proxy), 15, what="the first /ready answer")
        assert (status, json.loads(body)["waiting_for"]) == (503, "DNS"), body
        proxy.wait_ready(15)
        result = proxy.curl("api.example.test")
        assert (result.status, result.headers.get("x-mesh-flags")) == (503, "UH")
        assert b"DNS name api.example.test has not resolved yet (lookup failed: timed out" in result.body, \
            result.body
    finally:
        proxy.stop()


def _ready(proxy):
    """``(status, body)`` of the admin /ready, or None while the admin port is not up."""
    try:
        return proxy.admin_request("/ready")
    except OSError:
        return None
