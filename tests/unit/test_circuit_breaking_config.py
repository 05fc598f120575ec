"""DestinationRule connectionPool circuit-breaking limits: validated and compiled into ClusterSpec.limits."""

from mesh.config.tables import CircuitLimits
from tests.unit.test_h2_upstream_config import _compile, _entry, _errors

_RULE = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: svc, namespace: shop}
    spec:
      host: svc
      trafficPolicy:
        connectionPool:
          tcp: {maxConnections: 1}
          http: {http1MaxPendingRequests: 2, http2MaxRequests: 3, maxRetries: 4, maxRequestsPerConnection: 1}
      subsets:
      - name: open
        labels: {}
        trafficPolicy:
          connectionPool: {http: {idleTimeout: 5s}}
    """


def test_istio_limits_compile_into_the_cluster_spec(tmp_path):
    config = _compile(tmp_path, _entry("svc", "HTTP"), _RULE)
    limited = config.clusters["outbound|80||svc.shop.svc.cluster.local"]
    assert limited.limits == CircuitLimits(max_connections=1, max_pending=2, max_requests=3, max_retries=4)
    assert limited.max_requests_per_connection == 1


def test_a_pool_without_limits_compiles_to_none(tmp_path):
    """The proxy pays for circuit breaking only on clusters that have limits (None: one cheap test)."""
    config = _compile(tmp_path, _entry("svc", "HTTP"), _RULE)
    assert config.clusters["outbound|80|open|svc.shop.svc.cluster.local"].limits is None


def test_bad_limits_are_rejected_with_what_to_do(tmp_path):
    rule = _RULE.replace("maxConnections: 1", "maxConnections: -1").replace("maxRetries: 4", "maxRetries: '4'")
    assert _errors(tmp_path, _entry("svc", "HTTP"), rule) == [
        "spec.trafficPolicy.connectionPool.tcp.maxConnections: must be >= 0, not -1",
        "spec.trafficPolicy.connectionPool.http.maxRetries: must be an integer, not a string",
    ]
