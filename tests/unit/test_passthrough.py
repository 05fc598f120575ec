"""Traffic outside the registry (mesh.proxy.passthrough): PassthroughCluster, BlackHoleCluster, options.

The tunnels themselves run in tests/e2e/test_netns_passthrough.py, with real capture.
"""

import textwrap

import pytest
from twisted.python import usage

from mesh.config.compile import Workload, compile_proxy_config
from mesh.config.loader import load_files
from mesh.config.validate import validate
from mesh.proxy.context import RequestContext
from mesh.proxy.outcome import LocalReply
from mesh.proxy.passthrough import ALLOW_ANY, REGISTRY_ONLY, PassthroughClusters
from mesh.proxy.runtime import OutboundRouter
from mesh.proxy.tap import Options, makeService

CONFIG = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: server, namespace: default}
spec:
  hosts: [server.default.svc.cluster.local]
  addresses: [10.96.0.10]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  resolution: STATIC
  endpoints: [{address: 10.99.0.2}]
"""


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
    path = tmp_path_factory.mktemp("pt") / "config.yaml"
    path.write_text(textwrap.dedent(CONFIG).lstrip("\n"))
    loaded = load_files([path])
    objects, errors = validate(loaded.resources)
    assert loaded.errors == [] and errors == []
    return compile_proxy_config(objects, Workload("client", "default", {}, "client"))


def _router(config, policy):
    class Runtime:
        snapshot = type("Snapshot", (), {"config": config, "clusters": {name: name for name in config.clusters}})

    class Hooks:
        @staticmethod
        def mesh_route(ctx, table):
            from mesh.builtin.routing import mesh_route
            return mesh_route(ctx, table)

    return OutboundRouter(Runtime(), Hooks(), PassthroughClusters(policy, _pool))


def _ctx(host, dst=None):
    ctx = RequestContext.for_test(host=host)
    if dst is not None:
        ctx.extra["original_dst"] = dst
    return ctx


def test_allow_any_sends_unknown_captured_http_to_a_passthrough_cluster_per_destination(config):
    router = _router(config, ALLOW_ANY)
    action, cluster = router.route(_ctx("api.example.com", ("93.184.216.34", 80)))
    assert action.name == "allow_any" and cluster.name == "PassthroughCluster"
    [endpoint] = cluster.endpoints
    assert (endpoint.host_port, endpoint.spec.identity) == ("93.184.216.34:80", None)  # plaintext
    assert router.route(_ctx("other", ("93.184.216.34", 80)))[1] is cluster  # reused: keep-alive connections
    assert router.route(_ctx("other", ("93.184.216.34", 8080)))[1] is not cluster
    # a known destination still routes to its service, and an explicit call (no capture) still gets 404
    assert router.route(_ctx("x", ("10.99.0.2", 8080)))[1] == "outbound|80||server.default.svc.cluster.local"
    with pytest.raises(LocalReply) as raised:
        router.route(_ctx("api.example.com"))
    assert (raised.value.status, raised.value.flag) == (404, "NR")


def test_registry_only_answers_502_naming_the_fix(config):
    ctx = _ctx("api.example.com", ("93.184.216.34", 443))
    with pytest.raises(LocalReply) as raised:
        _router(config, REGISTRY_ONLY).route(ctx)
    assert (raised.value.status, raised.value.flag) == (502, "UH")
    assert "93.184.216.34:443" in raised.value.message and "add a ServiceEntry" in raised.value.message
    assert "--outbound-traffic-policy ALLOW_ANY" in raised.value.message
    assert (ctx.cluster, ctx.route.name) == ("BlackHoleCluster", "block_all")


def test_the_oldest_passthrough_cluster_goes_with_its_idle_connections():
    clusters = PassthroughClusters(ALLOW_ANY, _pool, size=2)
    first = clusters.route(_ctx("a"), ("10.0.0.1", 80))[1]
    clusters.route(_ctx("b"), ("10.0.0.2", 80))
    clusters.route(_ctx("c"), ("10.0.0.3", 80))
    assert first.endpoints[0].pool.closed
    assert clusters.route(_ctx("a"), ("10.0.0.1", 80))[1] is not first


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
