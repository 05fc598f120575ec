"""When the sidecar speaks HTTP/2 upstream: DestinationRule h2UpgradePolicy, useClientProtocol and
maxConcurrentStreams, port protocols, the app port's protocol, and the HTTP/2 request headers."""

import pytest

from mesh.config.compile import Workload
from mesh.config.tables import UPSTREAM_CLIENT, UPSTREAM_H2, UPSTREAM_HTTP1, RouteAction, upstream_protocol
from mesh.proxy.codec.h2_client import request_headers
from mesh.proxy.context import RequestContext
from tests.harness.config_yaml import compile_yaml, validate_yaml

CLIENT = Workload("client", "shop", {"app": "client"})


def _errors(tmp_path, *documents):
    _, errors, _ = validate_yaml(tmp_path, *documents)
    return [str(error).split(": ", 2)[-1] for error in errors]


def _entry(name, protocol, labels="{}", port_name="http"):
    return f"""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: {name}, namespace: shop}}
        spec:
          hosts: [{name}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 80, name: {port_name}, protocol: {protocol}}}]
          endpoints: [{{address: 10.0.0.1, labels: {labels}}}]
        """


def _rule(host, http):
    return f"""
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: {host}, namespace: shop}}
        spec:
          host: {host}
          trafficPolicy:
            connectionPool:
              http: {http}
        """


def _compile(tmp_path, *documents, workload=CLIENT):
    return compile_yaml(tmp_path, *documents, workload=workload)


@pytest.mark.parametrize(("protocol", "http", "expected"), [
    ("HTTP", "{}", UPSTREAM_HTTP1),
    ("HTTP", "{h2UpgradePolicy: DEFAULT}", UPSTREAM_HTTP1),  # the mesh default: DO_NOT_UPGRADE, as Istio's
    ("HTTP", "{h2UpgradePolicy: DO_NOT_UPGRADE}", UPSTREAM_HTTP1),
    ("HTTP", "{h2UpgradePolicy: UPGRADE}", UPSTREAM_H2),
    ("HTTP", "{useClientProtocol: true}", UPSTREAM_CLIENT),
    ("HTTP2", "{}", UPSTREAM_H2),
    ("GRPC", "{h2UpgradePolicy: DO_NOT_UPGRADE}", UPSTREAM_H2),  # HTTP/2 on the wire whatever the policy
    ("GRPC", "{useClientProtocol: true}", UPSTREAM_H2),
])
def test_cluster_upstream_protocol(tmp_path, protocol, http, expected):
    config = _compile(tmp_path, _entry("svc", protocol), _rule("svc", http))
    spec = config.clusters["outbound|80||svc.shop.svc.cluster.local"]
    assert (spec.protocol, spec.upstream_protocol) == (protocol, expected)
    assert config.dump["clusters"][0]["upstream_protocol"] == expected


def test_subset_and_port_level_policies_upgrade_their_own_clusters(tmp_path):
    config = _compile(tmp_path, _entry("svc", "HTTP"), """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: svc, namespace: shop}
        spec:
          host: svc
          subsets:
          - name: v2
            labels: {}
            trafficPolicy:
              portLevelSettings:
              - port: {number: 80}
                connectionPool: {http: {h2UpgradePolicy: UPGRADE, maxConcurrentStreams: 8}}
        """)
    plain, upgraded = (config.clusters[f"outbound|80|{subset}|svc.shop.svc.cluster.local"] for subset in ("", "v2"))
    assert (plain.upstream_protocol, plain.max_concurrent_streams) == (UPSTREAM_HTTP1, 0)
    assert (upgraded.upstream_protocol, upgraded.max_concurrent_streams) == (UPSTREAM_H2, 8)


def test_bad_http2_settings_are_rejected_with_what_to_do(tmp_path):
    errors = _errors(tmp_path, *(_rule(host, http) for host, http in (
        ("a", "{h2UpgradePolicy: ALWAYS, maxConcurrentStreams: -1}"),
        ("b", "{h2UpgradePolicy: UPGRADE, useClientProtocol: true}"),
        ("c", "{http2MaxRequests: 10, useClientProtocol: yes please}"))))
    assert errors == [
        "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy: invalid h2UpgradePolicy 'ALWAYS'; use one of: "
        "DEFAULT, DO_NOT_UPGRADE, UPGRADE",
        "spec.trafficPolicy.connectionPool.http.maxConcurrentStreams: must be >= 0, not -1",
        "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy: useClientProtocol: true keeps the client's "
        "protocol, so Istio ignores h2UpgradePolicy UPGRADE; remove one of the two",
        "spec.trafficPolicy.connectionPool.http.useClientProtocol: must be true or false, not a string",
    ]


# -- the app port's protocol (the inbound sidecar speaks it to its app) ------------------------------

def test_app_protocol_comes_from_the_service_entries_that_lead_to_the_workload(tmp_path):
    server = Workload("grpc-server", "shop", {"app": "grpc-server"}, app_port=9000)
    config = _compile(tmp_path, _entry("grpc-server", "GRPC", "{app: grpc-server, version: v1}"),
                      _entry("other", "HTTP", "{app: other}"), workload=server)
    assert config.app_protocol == "GRPC" and config.dump["app_protocol"] == "GRPC"
    assert _compile(tmp_path, _entry("other", "HTTP", "{app: other}"), workload=server).app_protocol is None


def test_app_protocol_by_workload_selector(tmp_path):
    server = Workload("web", "shop", {"app": "web"}, app_port=8080)
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: web, namespace: shop}
        spec:
          hosts: [web]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{number: 80, name: http, protocol: HTTP}, {number: 81, name: grpc, protocol: GRPC,
                                                             targetPort: 8080}]
          workloadSelector: {labels: {app: web}}
        """, workload=server)
    assert config.app_protocol == "GRPC"  # the port that leads to the app port (targetPort 8080)


def test_ports_that_disagree_leave_the_app_protocol_unknown_with_a_warning(tmp_path):
    server = Workload("mixed", "shop", {"app": "mixed"}, app_port=9000)
    config = _compile(tmp_path, _entry("mixed-a", "GRPC", "{app: mixed}"), _entry("mixed-b", "HTTP", "{app: mixed}"),
                      workload=server)
    assert config.app_protocol is None
    assert "give its app port 9000 different protocols (GRPC, HTTP)" in str(config.warnings[0])


def test_unknown_app_protocol_follows_the_client():
    assert upstream_protocol(None) == UPSTREAM_CLIENT
    assert upstream_protocol("HTTP") == UPSTREAM_HTTP1


# -- the HTTP/2 request headers ----------------------------------------------------------------------

class _Exchange:
    def __init__(self, ctx, action, framing=None, content_length=0, extra=()):
        self.ctx, self.action, self.framing, self.content_length, self.extra_headers = (
            ctx, action, framing, content_length, extra)


def test_request_headers_are_the_http1_head_as_http2_fields():
    ctx = RequestContext.for_test(method="POST", path="/api/v1?q=1", host="svc",
                                  headers={"x-custom": "a", "te": "trailers, deflate", "keep-alive": "5",
                                           "upgrade": "h2c", "x-forwarded-for": "10.1.1.1"})
    ctx.raw_headers = [(b"X-Custom", b"a"), (b"Keep-Alive", b"5"), (b"Upgrade", b"h2c")]
    action = RouteAction(name="r", clusters=("c",), cumulative_weights=(1,), rewrite_prefix=b"/v2",
                         rewrite_strip=4, rewrite_authority=b"svc.shop")
    extra = ((b"X-Forwarded-Client-Cert", b"By=x"), (b"x-forwarded-for", b"10.1.1.1"))
    headers = request_headers(_Exchange(ctx, action, "length", 12, extra=extra))
    assert headers == [
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc.shop"), (b":path", b"/v2/v1?q=1"),
        (b"x-custom", b"a"), (b"x-forwarded-client-cert", b"By=x"), (b"x-forwarded-for", b"10.1.1.1"),
        (b"te", b"trailers"), (b"x-request-id", b"test"), (b"content-length", b"12"),
    ]


def test_an_endpoint_at_the_sidecars_inbound_listener_is_the_workload(tmp_path):
    server = Workload("plain", "shop", {}, app_port=9000, inbound=(("127.0.0.1", 15006),))
    config = _compile(tmp_path, _entry("plain", "HTTP2").replace("address: 10.0.0.1", "address: 127.0.0.1, "
                                                                  "ports: {http: 15006}"), workload=server)
    assert config.app_protocol == "HTTP2"
