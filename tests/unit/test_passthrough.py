"""Traffic outside the registry (mesh.proxy.passthrough): PassthroughCluster, BlackHoleCluster, options.

The tunnels themselves run in tests/e2e/test_netns_passthrough.py, with real capture.
"""


import pytest
from twisted.python import usage

from mesh.proxy.outcome import LocalReply
from mesh.proxy.passthrough import ALLOW_ANY, REGISTRY_ONLY, PassthroughClusters
from mesh.proxy.tap import Options, makeService
from tests.unit.routing_support import SERVER_ENTRY, captured_request, compile_yaml, outbound_router


class Pool:
    """Stands in for a connection pool: only ``close_idle`` is used here."""

    def __init__(self, spec):
        self.spec = spec
        self.closed = False

    def close_idle(self):
        self.closed = True


def _pool(endpoint_spec, cluster_spec):
    return Pool(endpoint_spec)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return compile_yaml(tmp_path_factory.mktemp("pt"))


def _router(config, policy):
    return outbound_router(config, PassthroughClusters(policy, _pool))


def test_allow_any_sends_unknown_captured_http_to_a_passthrough_cluster_per_destination(config):
    router = _router(config, ALLOW_ANY)
    action, cluster = router.route(captured_request("api.example.com", ("93.184.216.34", 80)))
    assert action.name == "allow_any" and cluster.name == "PassthroughCluster"
    [endpoint] = cluster.endpoints
    assert (endpoint.host_port, endpoint.spec.identity) == ("93.184.216.34:80", None)  # plaintext
    # reused: keep-alive connections
    assert router.route(captured_request("other", ("93.184.216.34", 80)))[1] is cluster
    assert router.route(captured_request("other", ("93.184.216.34", 8080)))[1] is not cluster
    # a known destination still routes to its service, and an explicit call (no capture) still gets 404
    known = router.route(captured_request("x", ("10.99.0.2", 8080)))[1]
    assert known == "outbound|80||server.default.svc.cluster.local"
    with pytest.raises(LocalReply) as raised:
        router.route(captured_request("api.example.com"))
    assert (raised.value.status, raised.value.flag) == (404, "NR")


def test_registry_only_answers_502_naming_the_fix(config):
    ctx = captured_request("api.example.com", ("93.184.216.34", 443))
    with pytest.raises(LocalReply) as raised:
        _router(config, REGISTRY_ONLY).route(ctx)
    assert (raised.value.status, raised.value.flag) == (502, "UH")
    assert "93.184.216.34:443" in raised.value.message and "add a ServiceEntry" in raised.value.message
    assert "--outbound-traffic-policy ALLOW_ANY" in raised.value.message
    assert (ctx.cluster, ctx.route.name) == ("BlackHoleCluster", "block_all")


@pytest.mark.parametrize("mode, option, blocked", [
    ("REGISTRY_ONLY", ALLOW_ANY, True), ("ALLOW_ANY", REGISTRY_ONLY, False), (None, REGISTRY_ONLY, True)],
    ids=["sidecar-blocks", "sidecar-allows", "option-applies"])
def test_the_sidecar_resources_outbound_traffic_policy_overrides_the_option(tmp_path, mode, option, blocked):
    """As Istio's Sidecar ``outboundTrafficPolicy`` overrides meshConfig: HTTP and TCP passthrough both follow it."""
    policy = f"  outboundTrafficPolicy: {{mode: {mode}}}\n" if mode else ""
    sidecar = ("---\napiVersion: networking.istio.io/v1\nkind: Sidecar\n"
               "metadata: {name: default, namespace: default}\n"
               f"spec:\n  egress: [{{hosts: ['./*']}}]\n{policy}")
    router = _router(compile_yaml(tmp_path, SERVER_ENTRY + sidecar), option)
    assert router.outbound_traffic_policy() == (REGISTRY_ONLY if blocked else ALLOW_ANY)
    ctx = captured_request("api.example.com", ("93.184.216.34", 80))
    if blocked:
        with pytest.raises(LocalReply) as raised:
            router.route(ctx)
        assert (raised.value.status, raised.value.flag) == (502, "UH")
    else:
        assert router.route(ctx)[1].name == "PassthroughCluster"


def test_the_oldest_passthrough_cluster_goes_with_its_idle_connections():
    clusters = PassthroughClusters(ALLOW_ANY, _pool, size=2)
    first = clusters.route(captured_request("a"), ("10.0.0.1", 80), ALLOW_ANY)[1]
    clusters.route(captured_request("b"), ("10.0.0.2", 80), ALLOW_ANY)
    clusters.route(captured_request("c"), ("10.0.0.3", 80), ALLOW_ANY)
    assert first.endpoints[0].pool.closed
    assert clusters.route(captured_request("a"), ("10.0.0.1", 80), ALLOW_ANY)[1] is not first


def test_the_registry_knows_service_addresses_and_endpoints(config):
    router = _router(config, REGISTRY_ONLY)
    assert router.knows(("10.96.0.10", 5432)) and router.knows(("10.99.0.2", 8080))
    assert not router.knows(("10.99.0.2", 5432)) and not router.knows(("93.184.216.34", 443))


def test_options(tmp_path):
    options = Options()
    with pytest.raises(usage.UsageError, match="ALLOW_ANY or REGISTRY_ONLY, got 'DENY'"):
        options.parseOptions(["--config-dir", str(tmp_path), "--workload", "w", "--outbound-traffic-policy", "DENY"])
    options = Options()
    options.parseOptions(["--config-dir", str(tmp_path), "--workload", "w", "--protocol-detection-timeout", "50ms",
                          "--outbound-traffic-policy", "REGISTRY_ONLY", "--max-passthrough-connections", "7"])
    settings = makeService(options).settings.passthrough
    assert (settings.outbound_traffic_policy, settings.detection_timeout, settings.connect_timeout,
            settings.max_connections) == (REGISTRY_ONLY, 0.05, 10.0, 7)
    options = Options()
    options.parseOptions(["--config-dir", str(tmp_path), "--workload", "w"])
    defaults = makeService(options).settings.passthrough
    assert (defaults.outbound_traffic_policy, defaults.detection_timeout) == (ALLOW_ANY, 0.5)
