"""Validation of each kind: supported fields, defaults, and every rejection naming its line."""

import textwrap

import pytest

from mesh.config.fields import parse_duration
from mesh.config.resources import (
    DEFAULT_RETRY,
    ConnectionPool,
    HTTPMatch,
    LoadBalancer,
    RouteDestination,
    ServicePort,
    StringMatch,
    WorkloadEndpoint,
)
from mesh.config.tables import HeaderOps, OutlierPolicy, RetryPolicy, TcpKeepalive
from tests.harness.config_yaml import validate_yaml


def _validate(tmp_path, text):
    """Validate the YAML ``text``; ``(objects, error strings, file path)``."""
    objects, errors, path = validate_yaml(tmp_path, text)
    return objects, [str(error) for error in errors], path


def _valid(tmp_path, text):
    objects, errors, _ = _validate(tmp_path, text)
    assert errors == []
    return objects


def _expected(prefix, pairs):
    """Error strings for ``(line, message)`` pairs, in line order (as validate reports them)."""
    return [prefix.format(line) + message for line, message in sorted(pairs, key=lambda pair: pair[0])]


def _vs(http):
    """A VirtualService document (namespace shop) whose spec.http is ``http``, indented to fit."""
    body = textwrap.indent(textwrap.dedent(http).strip("\n"), "  ")
    return ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: shop}\n"
            f"spec:\n  hosts: [web]\n  http:\n{body}\n")


# -- ServiceEntry / WorkloadEntry ------------------------------------------------------

def test_service_entry_fields(tmp_path):
    [entry] = _valid(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: web, namespace: shop}
        spec:
          hosts: [web, Web.Example.COM]
          addresses: [10.96.0.1]
          location: MESH_INTERNAL
          resolution: STATIC
          ports:
          - {number: 80, name: http, protocol: http, targetPort: 8080}
          - {number: 81, name: grpc, protocol: GRPC}
          endpoints:
          - address: 10.0.0.1
            ports: {grpc: 9091}
            labels: {app: web, version: v1}
            weight: 5
            serviceAccount: web-sa
          subjectAltNames: ["spiffe://cluster.local/ns/shop/sa/web"]
          exportTo: [".", other]
        """)
    assert entry.hosts == ("web.shop.svc.cluster.local", "web.example.com")
    assert entry.addresses == ("10.96.0.1",)
    assert entry.ports == (ServicePort(80, "http", "HTTP", 8080), ServicePort(81, "grpc", "GRPC", None))
    assert entry.endpoints == (WorkloadEndpoint("10.0.0.1", (("grpc", 9091),), (("app", "web"), ("version", "v1")),
                                                5, "web-sa"),)
    assert (entry.location, entry.resolution, entry.export_to) == ("MESH_INTERNAL", "STATIC", (".", "other"))
    assert entry.subject_alt_names == ("spiffe://cluster.local/ns/shop/sa/web",)
    assert entry.workload_selector is None and entry.source.name == "web"


def test_service_entry_rejections(tmp_path):
    _, errors, path = _validate(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: se, namespace: shop}
        spec:
          hosts: ["*", "a:80"]
          addresses: [10.0.0.0/24]
          ports:
          - {number: 80, name: http, protocol: Mongo}
          - {number: 80, name: http}
          endpoints:
          - {address: db.example.com, network: n1, ports: {https: 443}}
          workloadSelector: {labels: {app: db}}
          subjectAltNames: [web.example.com]
        """)
    prefix = f"{path}:{{}}: ServiceEntry/shop/se: "
    assert errors == _expected(prefix, [
        (5, "spec.hosts[0]: the catch-all host '*' is not allowed here; name the hosts (wildcards like "
            "'*.example.com' are)"),
        (5, "spec.hosts[1]: hosts must not include a port; txmesh matches the Host header without its port"),
        (6, "spec.addresses[0]: '10.0.0.0/24' is not an IP address (CIDR ranges are not supported); list "
            "single IP addresses"),
        (8, "spec.ports[0].protocol: protocol MONGO is not supported by txmesh; txmesh has no MongoDB protocol "
            "filter; use protocol TCP, which is how Istio proxies it unless its Mongo filter is on"),
        (9, "spec.ports[1].name: duplicate port name 'http'"),
        (9, "spec.ports[1].number: duplicate port number 80"),
        (11, "spec.endpoints[0].network: 'network' is not supported by txmesh; multi-network meshes are not "
             "supported; remove it"),
        (11, "spec.endpoints[0].address: 'db.example.com' is not an IP address; txmesh resolves host names "
             "only in the endpoints of a ServiceEntry with resolution DNS or DNS_ROUND_ROBIN; use an IP "
             "address, or set that resolution"),
        (11, "spec.endpoints[0].ports.https: 'https' is not a port name of this ServiceEntry; use one of: http"),
        (12, "spec.workloadSelector: set only one of endpoints or workloadSelector"),
        (4, "spec.resolution: resolution NONE is not supported by txmesh; it forwards to the caller's original "
            "destination address, which the txmesh proxy cannot do yet (NONE is also the default when "
            "resolution is omitted); set resolution: STATIC and list endpoints or a workloadSelector"),
        (13, "spec.subjectAltNames[0]: 'web.example.com' is not a SPIFFE id; txmesh verifies mesh identities "
             "(spiffe://<trust-domain>/ns/<ns>/sa/<sa>)"),
    ])


def test_resolution_none_is_rejected(tmp_path):
    _, errors, _ = _validate(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: se}
        spec:
          hosts: [a.example.com]
          ports: [{number: 80, name: http}]
          resolution: NONE
        """)
    [error] = errors
    assert ":7: ServiceEntry/default/se: spec.resolution: resolution NONE is not supported by txmesh" in error


@pytest.mark.parametrize("resolution", ["DNS", "DNS_ROUND_ROBIN"])
def test_dns_resolution_takes_host_names(tmp_path, resolution):
    [entry] = _valid(tmp_path, f"""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: se}}
        spec:
          hosts: [api.example.com]
          ports: [{{number: 80, name: http}}]
          resolution: {resolution}
          endpoints: [{{address: Backend.Example.COM., ports: {{http: 8080}}}}]
        """)
    assert entry.resolution == resolution
    assert entry.endpoints[0].address == "backend.example.com"


def test_dns_resolution_errors(tmp_path):
    _, errors, path = _validate(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: wild}
        spec:
          hosts: ["*.example.com"]
          ports: [{number: 80, name: http}]
          resolution: DNS
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: rr}
        spec:
          hosts: [api.example.com]
          ports: [{number: 80, name: http}]
          resolution: DNS_ROUND_ROBIN
          endpoints: [{address: a.example.com}, {address: b_c.example.com}]
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: tcp}
        spec:
          hosts: [db1.example.com, db2.example.com]
          ports: [{number: 5432, name: pg, protocol: TCP}]
          resolution: DNS
        """)
    assert errors == [
        f"{path}:5: ServiceEntry/default/wild: spec.hosts: hosts must be fully qualified names, not wildcards, "
        "when resolution DNS has no endpoints to resolve (the sidecar resolves the hosts themselves); list "
        "endpoints, or use resolution: STATIC",
        f"{path}:16: ServiceEntry/default/rr: spec.endpoints[1].address: endpoint address 'b_c.example.com' is "
        "not a valid host name or IP address",
        f"{path}:16: ServiceEntry/default/rr: spec.endpoints: resolution DNS_ROUND_ROBIN takes 0 or 1 endpoint "
        "(as Istio); use resolution: DNS to balance over several endpoints",
        f"{path}:22: ServiceEntry/default/tcp: spec.hosts: resolution DNS with several hosts needs HTTP, TLS or "
        "HTTPS ports (as Istio): a TCP connection cannot tell which host it is for; write one ServiceEntry per "
        "host",
    ]


def test_workload_entry(tmp_path):
    [entry] = _valid(tmp_path, """
        apiVersion: networking.istio.io/v1beta1
        kind: WorkloadEntry
        metadata: {name: vm1, namespace: shop}
        spec:
          address: 2001:db8::5
          ports: {http: 8080}
          labels: {app: web}
          serviceAccount: web
          weight: 0
        """)
    assert entry.endpoint == WorkloadEndpoint("2001:db8::5", (("http", 8080),), (("app", "web"),), 1, "web")


def test_labels_must_be_strings(tmp_path):
    _, errors, path = _validate(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: vm1}
        spec:
          address: 10.0.0.1
          labels: {version: 1.0, "bad key!": x}
          locality: us-east
        """)
    assert errors == [
        f"{path}:6: WorkloadEntry/default/vm1: spec.labels.version: label values must be strings; quote 1.0",
        f'{path}:6: WorkloadEntry/default/vm1: spec.labels["bad key!"]: invalid label name \'bad key!\': use '
        "[prefix/]name with letters, digits, '-', '_' and '.'",
        f"{path}:7: WorkloadEntry/default/vm1: spec.locality: 'locality' is not supported by txmesh; "
        "locality-aware load balancing is not supported; remove it",
    ]


# -- DestinationRule ------------------------------------------------------------------

def test_destination_rule_fields_and_defaults(tmp_path):
    [rule] = _valid(tmp_path, """
        apiVersion: networking.istio.io/v1alpha3
        kind: DestinationRule
        metadata: {name: web, namespace: shop}
        spec:
          host: web
          trafficPolicy:
            connectionPool:
              http: {idleTimeout: 90s}
            outlierDetection:
              consecutive5xxErrors: 2
              consecutiveGatewayErrors: 1
            tls: {mode: ISTIO_MUTUAL}
            portLevelSettings:
            - port: {number: 81}
              loadBalancer: {simple: LEAST_CONN}
          subsets:
          - name: v1
            labels: {version: v1}
            trafficPolicy:
              loadBalancer:
                consistentHash: {httpCookie: {name: session}}
          - name: v2
            labels: {version: v2}
          exportTo: ["*"]
        """)
    assert rule.host == "web.shop.svc.cluster.local"
    policy = rule.traffic_policy
    assert policy.load_balancer is None
    assert policy.connection_pool == ConnectionPool(connect_timeout=10.0, max_requests_per_connection=0,
                                                    idle_timeout=90.0)
    assert policy.outlier_detection == OutlierPolicy(consecutive_5xx=2, consecutive_gateway_errors=1,
                                                     interval=10.0, base_ejection_time=30.0,
                                                     max_ejection_percent=10)
    assert policy.tls_mode == "ISTIO_MUTUAL"
    [(port, port_policy)] = policy.port_level
    assert (port, port_policy.load_balancer, port_policy.tls_mode) == (81, LoadBalancer("LEAST_REQUEST"), None)
    assert [subset.name for subset in rule.subsets] == ["v1", "v2"]
    assert rule.subsets[0].traffic_policy.load_balancer == LoadBalancer("CONSISTENT_HASH", ("cookie", "session"))
    assert rule.subsets[1].traffic_policy is None


@pytest.mark.parametrize("yaml_text,expected", [
    ("simple: UNSPECIFIED", LoadBalancer("LEAST_REQUEST")),
    ("simple: RANDOM", LoadBalancer("RANDOM")),
    ("consistentHash: {httpHeaderName: X-User}", LoadBalancer("CONSISTENT_HASH", ("header", "x-user"))),
    ("consistentHash: {useSourceIp: true}", LoadBalancer("CONSISTENT_HASH", ("source_ip", None))),
    ("consistentHash: {httpQueryParameterName: user}", LoadBalancer("CONSISTENT_HASH", ("query", "user"))),
])
def test_load_balancers(tmp_path, yaml_text, expected):
    assert _traffic_policy(tmp_path, f"{{loadBalancer: {{{yaml_text}}}}}").load_balancer == expected


def _traffic_policy(tmp_path, policy: str):
    """The trafficPolicy of a DestinationRule for a.example.com whose ``trafficPolicy`` is ``policy`` (YAML
    flow mapping)."""
    [rule] = _valid(tmp_path, f"""
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: r}}
        spec:
          host: a.example.com
          trafficPolicy: {policy}
        """)
    return rule.traffic_policy


def test_destination_rule_rejections(tmp_path):
    _, errors, path = _validate(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: r, namespace: shop}
        spec:
          host: web
          workloadSelector: {matchLabels: {app: a}}
          trafficPolicy:
            loadBalancer:
              simple: PASSTHROUGH
            connectionPool:
              tcp: {maxConnections: -1, connectTimeout: 1.5}
              http: {http1MaxPendingRequests: many}
            outlierDetection: {consecutiveErrors: 5, maxEjectionPercent: 101}
            tls: {mode: MUTUAL, clientCertificate: /c.pem}
          subsets:
          - name: v1
            trafficPolicy:
              loadBalancer:
                consistentHash: {httpCookie: {name: s, ttl: 0s}, useSourceIp: true}
          - {name: v1}
        """)
    prefix = f"{path}:{{}}: DestinationRule/shop/r: "
    assert errors == _expected(prefix, [
        (6, "spec.workloadSelector: 'workloadSelector' is not supported by txmesh; per-workload "
            "DestinationRules are not supported yet; remove it (the rule then applies to every client)"),
        (19, "spec.subsets[0].trafficPolicy.loadBalancer.consistentHash: set exactly one of httpHeaderName, "
             "httpCookie, useSourceIp, httpQueryParameterName"),
        (20, "spec.subsets[1].name: duplicate subset name 'v1'"),
        (9, "spec.trafficPolicy.loadBalancer.simple: simple PASSTHROUGH is not supported by txmesh; it "
            "forwards to the caller's original destination address, which the txmesh proxy cannot do; use "
            "LEAST_REQUEST, ROUND_ROBIN or RANDOM"),
        (11, "spec.trafficPolicy.connectionPool.tcp.connectTimeout: invalid duration 1.5 (a number without a "
             'unit); use a number and a unit, like "1s", "0.5s", "100ms", "1m" or "1h"'),
        (11, "spec.trafficPolicy.connectionPool.tcp.maxConnections: must be >= 0, not -1"),
        (12, "spec.trafficPolicy.connectionPool.http.http1MaxPendingRequests: must be an integer, not a string"),
        (13, "spec.trafficPolicy.outlierDetection.consecutiveErrors: 'consecutiveErrors' is not supported by "
             "txmesh; it is deprecated in Istio; use consecutive5xxErrors"),
        (13, "spec.trafficPolicy.outlierDetection.maxEjectionPercent: must be >= 0 and <= 100, not 101"),
        (14, "spec.trafficPolicy.tls.privateKey: 'privateKey' is required with mode MUTUAL: the path of the PEM "
             "file of the client certificate's key that the sidecar presents to the server"),
    ])


def _tcp_pool(tmp_path, tcp: str):
    """The ConnectionPool of a DestinationRule whose ``connectionPool.tcp`` is ``tcp`` (YAML flow mapping)."""
    return _traffic_policy(tmp_path, f"{{connectionPool: {{tcp: {tcp}}}}}").connection_pool


@pytest.mark.parametrize("yaml_text,expected", [
    ("{}", TcpKeepalive()),  # on, every setting the system's (as Istio with an empty tcpKeepalive)
    ("{time: 7s, interval: 3s, probes: 4}", TcpKeepalive(time=7, interval=3, probes=4)),
    ("{time: 2m}", TcpKeepalive(time=120)),
])
def test_tcp_keepalive(tmp_path, yaml_text, expected):
    assert _tcp_pool(tmp_path, f"{{tcpKeepalive: {yaml_text}}}").tcp_keepalive == expected


@pytest.mark.parametrize("yaml_text,expected", [("{connectTimeout: 2s}", 0.0),
                                                ("{maxConnectionDuration: 30m}", 1800.0),
                                                ("{maxConnectionDuration: 1ms}", 0.001)])
def test_max_connection_duration(tmp_path, yaml_text, expected):
    assert _tcp_pool(tmp_path, yaml_text).max_connection_duration == expected


def test_tcp_keepalive_is_off_unless_given(tmp_path):
    assert _tcp_pool(tmp_path, "{connectTimeout: 2s}").tcp_keepalive is None


def test_tcp_pool_rejections(tmp_path):
    _, errors, path = _validate(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: r, namespace: shop}
        spec:
          host: web
          trafficPolicy:
            connectionPool:
              tcp:
                maxConnectionDuration: 0s
                tcpKeepalive: {time: 500ms, interval: 1.5s, probes: 0, count: 3}
          subsets:
          - name: v1
            trafficPolicy:
              connectionPool:
                tcp:
                  tcpKeepalive: {time: 10h, probes: 128}
        """)
    prefix = f"{path}:{{}}: DestinationRule/shop/r: "
    keepalive = "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive"
    subset_keepalive = "spec.subsets[0].trafficPolicy.connectionPool.tcp.tcpKeepalive"
    assert errors == _expected(prefix, [
        (10, f"{keepalive}.count: unknown field 'count'; supported: interval, probes, time"),
        (10, f"{keepalive}.time: must be whole seconds from 1s to 32767s (the kernel counts TCP keepalive "
             "times in seconds), not 500ms"),
        (10, f"{keepalive}.interval: must be whole seconds from 1s to 32767s (the kernel counts TCP keepalive "
             "times in seconds), not 1.5s"),
        (10, f"{keepalive}.probes: must be >= 1 and <= 127, not 0"),
        (9, "spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration: duration '0s' is too short; it must be "
            "at least 1ms"),
        (16, f"{subset_keepalive}.time: must be whole seconds from 1s to 32767s (the kernel counts TCP keepalive "
             "times in seconds), not 10h"),
        (16, f"{subset_keepalive}.probes: must be >= 1 and <= 127, not 128"),
    ])


def test_cookie_generation_is_rejected(tmp_path):
    _, errors, _ = _validate(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: r}
        spec:
          host: a.example.com
          trafficPolicy:
            loadBalancer:
              consistentHash:
                httpCookie: {name: user, ttl: 0s}
        """)
    [error] = errors
    assert error.endswith(":9: DestinationRule/default/r: spec.trafficPolicy.loadBalancer.consistentHash."
                          "httpCookie.ttl: 'ttl' is not supported by txmesh; txmesh hashes on an existing "
                          "cookie and never generates one; remove it (keep httpCookie.name)")


# -- durations --------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [
    ("1s", 1.0), ("0.5s", 0.5), ("100ms", 0.1), ("1m", 60.0), ("1h", 3600.0), ("2.5s", 2.5),
    ("1h30m", 5400.0), ("2000us", 0.002), (".25s", 0.25), ("1ms", 0.001),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("value,reason", [
    ("10", "invalid duration '10'"), (10, "invalid duration 10 (a number without a unit)"),
    ("1 s", "invalid duration '1 s'"), ("-1s", "invalid duration '-1s'"), ("1d", "invalid duration '1d'"),
    ("s", "invalid duration 's'"), ("", "invalid duration ''"), ("0s", "is too short"),
    ("100us", "is too short"), ("1.0005s", "only millisecond precision"),
])
def test_bad_durations(value, reason):
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_duration(value)


# -- VirtualService -------------------------------------------------------------------

def test_virtual_service_fields(tmp_path):
    [vs] = _valid(tmp_path, """
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: web, namespace: shop}
        spec:
          hosts: [web, "*.web.example.com", 10.96.0.7]
          gateways: [mesh]
          exportTo: ["."]
          http:
          - name: canary
            match:
            - name: beta-users
              uri: {prefix: /api}
              ignoreUriCase: true
              method: {regex: "GET|HEAD"}
              authority: {exact: web}
              headers:
                X-User: {exact: bob}
                x-trace: {}
                x-any: {prefix: ""}
              withoutHeaders: {x-debug: {regex: "*"}}
              queryParams: {beta: {exact: "1"}}
            rewrite: {uri: /v2, authority: web-v2}
            timeout: 1.5s
            retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "gateway-error, 409"}
            headers:
              request:
                set: {X-Canary: "true"}
                add: {x-via: txmesh}
                remove: [X-Secret]
              response:
                remove: [server]
            route:
            - destination: {host: web, subset: v2, port: {number: 8080}}
              weight: 90
            - destination: {host: web.other.svc.cluster.local}
              weight: 10
          - route:
            - destination: {host: web}
              weight: 30
        """)
    assert vs.hosts == ("web.shop.svc.cluster.local", "*.web.example.com", "10.96.0.7")
    assert vs.export_to == (".",)
    first, second = vs.http
    assert (first.index, first.name, second.index, second.name) == (0, "canary", 1, None)
    assert first.match == (HTTPMatch(
        name="beta-users", uri=StringMatch("prefix", "/api"), ignore_uri_case=True,
        method=StringMatch("regex", "GET|HEAD"), authority=StringMatch("exact", "web"),
        headers=(("x-any", StringMatch("present")), ("x-trace", StringMatch("present")),
                 ("x-user", StringMatch("exact", "bob"))),
        without_headers=(("x-debug", StringMatch("present")),),
        query_params=(("beta", StringMatch("exact", "1")),)),)
    assert first.route == (RouteDestination("web.shop.svc.cluster.local", "v2", 8080, 90),
                           RouteDestination("web.other.svc.cluster.local", None, None, 10))
    assert (first.rewrite_uri, first.rewrite_authority, first.timeout) == ("/v2", "web-v2", 1.5)
    assert first.retry == RetryPolicy(attempts=3, per_try_timeout=0.5,
                                      retry_on=frozenset({"gateway-error", "retriable-status-codes"}),
                                      retry_status_codes=frozenset({409}))
    assert first.request_headers == HeaderOps(set=((b"x-canary", b"true"),), add=((b"x-via", b"txmesh"),),
                                              remove=(b"x-secret",))
    assert first.response_headers == HeaderOps(remove=(b"server",))
    # a lone destination gets all the traffic whatever its weight; no retries field: Istio's default
    assert second.route == (RouteDestination("web.shop.svc.cluster.local", None, None, 100),)
    assert second.retry == DEFAULT_RETRY and second.timeout is None


def test_retries_disabled_and_host_header_as_authority_rewrite(tmp_path):
    [vs] = _valid(tmp_path, _vs("""
        - retries: {attempts: 0}
          headers:
            request:
              set: {host: web.internal}
          route:
          - destination: {host: web}
        """))
    [route] = vs.http
    assert route.retry is None
    assert route.rewrite_authority == "web.internal" and route.request_headers is None


def test_weights_must_not_all_be_zero(tmp_path):
    _, errors, path = _validate(tmp_path, _vs("""
        - route:
          - destination: {host: web, subset: v1}
          - destination: {host: web, subset: v2}
            weight: 0
        """))
    assert errors == [f"{path}:7: VirtualService/shop/vs: spec.http[0].route: the destinations' weights sum to 0, "
                      "so no destination would get traffic; give at least one destination a weight (weights are "
                      "relative: 1 and 3 send 25% and 75%)"]


def test_weights_are_relative(tmp_path):
    [vs] = _valid(tmp_path, _vs("""
        - route:
          - destination: {host: web, subset: v1}
            weight: 1
          - destination: {host: web, subset: v2}
            weight: 3
          - destination: {host: web, subset: v3}
            weight: 1000
        """))
    assert [destination.weight for destination in vs.http[0].route] == [1, 3, 1000]


def test_zero_weights_are_allowed(tmp_path):
    [vs] = _valid(tmp_path, _vs("""
        - route:
          - destination: {host: web, subset: v1}
            weight: 100
          - destination: {host: web, subset: v2}
            weight: 0
        """))
    assert [destination.weight for destination in vs.http[0].route] == [100, 0]


def test_unknown_and_unsupported_fields(tmp_path):
    _, errors, path = _validate(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: vs, namespace: shop}
        spec:
          hostz: [web]
          gateways: [Istio-System/ingress]
          tcp: [{route: [{destination: {host: db}}], retries: {attempts: 1}}]
          http:
          - match:
            - uri: /exact-path
              scheme: {exact: http}
            route:
            - destination: {host: web}
            mirrorPercent: 50
            delegate: {name: other}
            rewrite: {}
        """)
    prefix = f"{path}:{{}}: VirtualService/shop/vs: "
    assert errors == _expected(prefix, [
        (5, "spec.hostz: unknown field 'hostz' (did you mean 'hosts'?); supported: exportTo, gateways, hosts, "
            "http, tcp, tls"),
        (7, "spec.tcp[0].retries: unknown field 'retries'; supported: match, route"),
        (4, "spec.hosts: 'hosts' is required (delegate VirtualServices without hosts are not supported)"),
        (6, "spec.gateways[0]: invalid gateway reference 'Istio-System/ingress': use NAME or NAMESPACE/NAME of a "
            "Gateway, or 'mesh' for the sidecars"),
        (14, "spec.http[0].mirrorPercent: 'mirrorPercent' is not supported by txmesh; it is deprecated in "
             "Istio; use mirrorPercentage: {value: N}"),
        (15, "spec.http[0].delegate: 'delegate' is not supported by txmesh; VirtualService delegation is not "
             "supported; put the routes in this VirtualService"),
        (11, "spec.http[0].match[0].scheme: 'scheme' is not supported by txmesh; the scheme is always http "
             "between an app and its sidecar; remove it"),
        (10, "spec.http[0].match[0].uri: must be a mapping with one of exact, prefix or regex (like "
             "{prefix: '/exact-path'})"),
        (16, "spec.http[0].rewrite: rewrite must set uri, uriRegexRewrite or authority"),
    ])


def test_http_match_port_and_source_fields(tmp_path):
    [vs] = _valid(tmp_path, _vs("""
        - match:
          - {port: 8080, sourceLabels: {version: v1, app: web}, sourceNamespace: shop}
          - {uri: {prefix: /a}}
          route: [{destination: {host: web}}]
        """))
    first, second = vs.http[0].match
    assert (first.port, first.source_labels, first.source_namespace) == (
        8080, (("app", "web"), ("version", "v1")), "shop")
    assert (second.port, second.source_labels, second.source_namespace) == (None, (), None)


def test_http_match_port_and_source_fields_bad_values(tmp_path):
    _, errors, path = _validate(tmp_path, _vs("""
        - match:
          - port: 70000
            sourceLabels: {app: [a]}
            sourceNamespace: Shop_1
          - {port: http, sourceLabels: web}
          route: [{destination: {host: web}}]
        """))
    prefix = f"{path}:{{}}: VirtualService/shop/vs: spec.http[0].match"
    assert errors == _expected(prefix, [
        (8, "[0].port: must be >= 1 and <= 65535, not 70000"),
        (9, "[0].sourceLabels.app: label values must be strings; quote ['a']"),
        (10, "[0].sourceNamespace: invalid namespace 'Shop_1': use lower-case letters, digits and '-'"),
        (11, "[1].port: must be an integer, not a string"),
        (11, "[1].sourceLabels: must be a mapping, not a string"),
    ])


@pytest.mark.parametrize("regex,reason", [
    ("(?=/api)/.*", "invalid regex: invalid perl operator: (?=; Istio uses RE2 syntax "
                    "(https://github.com/google/re2/wiki/Syntax)"),
    (r"(a)\1", "invalid regex: invalid escape sequence: \\1; Istio uses RE2 syntax"),
    ("/api/[", "invalid regex: missing ]: [; Istio uses RE2 syntax"),
    ("", "regex must not be empty"),
])
def test_bad_regex(tmp_path, regex, reason):
    _, errors, path = _validate(tmp_path, _vs(f"""
        - match:
          - uri: {{regex: '{regex}'}}
          route:
          - destination: {{host: web}}
        """))
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:8: VirtualService/shop/vs: spec.http[0].match[0].uri.regex: {reason}")


def test_match_rejections(tmp_path):
    _, errors, path = _validate(tmp_path, _vs("""
        - match:
          - headers:
              ":authority": {exact: a}
              bad header: {exact: a}
              x-a: {exact: a, prefix: b}
            queryParams: {q: {prefix: a}}
            method: {}
          rewrite: {uri: /new}
          route:
          - destination: {host: "*.web"}
        """))
    prefix = f"{path}:{{}}: VirtualService/shop/vs: "
    assert errors == _expected(prefix, [
        (9, "spec.http[0].match[0].headers[\":authority\"]: match on ':authority' with match.authority, not "
            "headers"),
        (10, "spec.http[0].match[0].headers[\"bad header\"]: invalid header name 'bad header'"),
        (11, "spec.http[0].match[0].headers.x-a: set exactly one of exact, prefix or regex"),
        (13, "spec.http[0].match[0].method: set exactly one of exact, prefix or regex"),
        (12, "spec.http[0].match[0].queryParams.q.prefix: prefix matching of query parameters is not "
             "supported (by Istio either); use exact or regex"),
        (16, "spec.http[0].route[0].destination.host: wildcard hosts are not allowed here"),
    ])


@pytest.mark.parametrize("retries,reason", [
    ("{attempts: 2, retryOn: '5xx,envoy-ratelimited'}",
     "spec.http[0].retries.retryOn: retryOn condition 'envoy-ratelimited' is not supported by txmesh; use 5xx, "
     "cancelled, connect-failure, deadline-exceeded, gateway-error, internal, refused-stream, reset, "
     "resource-exhausted, retriable-4xx, retriable-status-codes, unavailable or HTTP status codes"),
    ("{attempts: 2, retryOn: '5xx,bogus'}",
     "spec.http[0].retries.retryOn: unknown retryOn condition 'bogus'; use 5xx, cancelled, connect-failure, "
     "deadline-exceeded, gateway-error, internal, refused-stream, reset, resource-exhausted, retriable-4xx, "
     "retriable-status-codes, unavailable or HTTP status codes (100-599), separated by commas"),
    ("{retryOn: 5xx}",
     "spec.http[0].retries.attempts: retries are disabled (attempts is 0 or missing) but perTryTimeout or "
     "retryOn is set; set attempts >= 1 or remove them"),
    ("{attempts: -1}", "spec.http[0].retries.attempts: must be >= 0, not -1"),
    ("{attempts: 2, perTryTimeout: 2}",
     'spec.http[0].retries.perTryTimeout: invalid duration 2 (a number without a unit); use a number and a '
     'unit, like "1s", "0.5s", "100ms", "1m" or "1h"'),
])
def test_bad_retries(tmp_path, retries, reason):
    _, errors, path = _validate(tmp_path, _vs(f"""
        - retries: {retries}
          route:
          - destination: {{host: web}}
        """))
    assert errors == [f"{path}:7: VirtualService/shop/vs: {reason}"]


def test_header_operation_rejections(tmp_path):
    _, errors, path = _validate(tmp_path, _vs("""
        - rewrite: {authority: a}
          headers:
            request:
              set: {":path": /x, x-n: 5, host: b, x-crlf: "a\\r\\nb"}
            response:
              remove: [host]
          route:
          - destination: {host: web}
        """))
    prefix = f"{path}:{{}}: VirtualService/shop/vs: "
    assert errors == _expected(prefix, [
        (10, 'spec.http[0].headers.request.set[":path"]: the Host header and pseudo-headers cannot be changed '
             'here'),
        (10, "spec.http[0].headers.request.set.x-n: header values must be strings, not 5; quote it"),
        (10, "spec.http[0].headers.request.set.x-crlf: header values must be ASCII without line breaks"),
        (8, "spec.http[0].headers: the authority is set both by rewrite.authority and by a host header; keep "
            "one of them"),
        (12, "spec.http[0].headers.response.remove[0]: the Host header and pseudo-headers cannot be removed"),
    ])


def test_every_resource_is_validated_independently(tmp_path):
    objects, errors, path = _validate(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: bad}
        spec: {host: a.example.com, trafficPolicy: {loadBalancer: {simple: FASTEST}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: good}
        spec: {host: a.example.com}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: also-bad}
        spec: {}
        """)
    assert [obj.name for obj in objects] == ["good"]
    assert errors == [
        f"{path}:4: DestinationRule/default/bad: spec.trafficPolicy.loadBalancer.simple: invalid simple "
        "'FASTEST'; use one of: ROUND_ROBIN, LEAST_REQUEST, RANDOM, LEAST_CONN, UNSPECIFIED",
        f"{path}:14: DestinationRule/default/also-bad: spec.host: 'host' is required",
    ]


def test_export_to_values(tmp_path):
    _, errors, path = _validate(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: r}
        spec:
          host: a.example.com
          exportTo: ["*", "Bad_NS"]
        """)
    assert errors == [
        f"{path}:6: DestinationRule/default/r: spec.exportTo[1]: invalid exportTo entry 'Bad_NS'; use '*', "
        "'.', '~' or a namespace name",
    ]


# -- regexes: RE2 compiles them, as Envoy; Istio's own checks on top ------------------------------

def test_regexes_are_checked_by_re2_in_every_field(tmp_path):
    _, errors, path = _validate(tmp_path, _vs(r"""
        - match:
          - uri: {regex: '(a)\1'}
            method: {regex: '(?P<méthode>GET)'}
            authority: {regex: 'web\C'}
            headers: {x-a: {regex: '(?=x)y'}}
            queryParams: {q: {regex: '[[:nope:]]'}}
          rewrite: {uriRegexRewrite: {match: '(?<=/)a', rewrite: b}}
          corsPolicy: {allowOrigins: [{regex: 'https://a(?!b)'}]}
          route: [{destination: {host: web}}]
        """))
    syntax = "; Istio uses RE2 syntax (https://github.com/google/re2/wiki/Syntax)"
    assert errors == _expected(f"{path}:{{}}: VirtualService/shop/vs: spec.http[0].", [
        (8, r"match[0].uri.regex: invalid regex: invalid escape sequence: \1" + syntax),
        (9, "match[0].method.regex: invalid regex: invalid named capture group: 'méthode' (Istio accepts ASCII "
            "letters, digits and _)" + syntax),
        (10, r"match[0].authority.regex: invalid regex: invalid escape sequence: \C (RE2's any-byte escape, "
             "which Istio does not accept)" + syntax),
        (11, "match[0].headers.x-a.regex: invalid regex: invalid perl operator: (?=" + syntax),
        (12, "match[0].queryParams.q.regex: invalid regex: invalid character class range: [:nope:]" + syntax),
        (13, "rewrite.uriRegexRewrite.match: invalid regex: invalid perl operator: (?<=" + syntax),
        (14, "corsPolicy.allowOrigins[0].regex: invalid regex: invalid perl operator: (?!" + syntax),
    ])


@pytest.mark.parametrize("regex", [
    r"/\pN+", r"/\p{Greek}", "(?U)/a+", r"/\Q.*\E", r"/(?<id>\d+)", r"/x\z",
    r"/\\C\Q\C\E",  # a backslash and C, then a quoted \C: no \C escape
])
def test_re2_regexes_that_python_rejects_are_valid(tmp_path, regex):
    [vs] = _valid(tmp_path, _vs(f"""
        - match: [{{uri: {{regex: '{regex}'}}}}]
          route: [{{destination: {{host: web}}}}]
        """))
    assert vs.http[0].match[0].uri == StringMatch("regex", regex)


def test_the_regex_limit_is_1024_bytes_as_in_istio(tmp_path):
    _, errors, _ = _validate(tmp_path, _vs(f"""
        - match: [{{uri: {{regex: '/{"é" * 512}'}}}}]
          route: [{{destination: {{host: web}}}}]
        """))
    assert [error.split(": ", 3)[-1] for error in errors] == ["regex is too large (at most 1024 bytes)"]
    _valid(tmp_path, _vs(f"""
        - match: [{{uri: {{regex: '{"é" * 512}'}}}}]
          route: [{{destination: {{host: web}}}}]
        """))
