"""TCP, TLS and HTTPS ports, VirtualService tcp/tls routes and AuthorizationPolicy for TCP: validation and compiling."""

from __future__ import annotations

import ipaddress
import textwrap
from types import SimpleNamespace

import pytest

from mesh.builtin.authz import mesh_authorize
from mesh.config.compile import Workload
from mesh.config.security_tables import NO_ALLOW_MATCHED
from tests.harness.config_yaml import compile_yaml, validate_yaml

CLIENT = Workload("client", "shop", {"app": "client"}, "client")
ECHO = "echo.shop.svc.cluster.local"

SERVICES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo, namespace: shop}
spec:
  hosts: [echo]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9000, name: tcp-echo, protocol: TCP}]
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: shop}
spec:
  host: echo
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.example.com]
  addresses: [10.96.0.7]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 5432, name: pg, protocol: tcp}]
  endpoints: [{address: 192.0.2.7}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: secure, namespace: shop}
spec:
  hosts: [a.example.com, b.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 443, name: https, protocol: HTTPS}]
  endpoints: [{address: 192.0.2.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.9}]
"""


def _errors(tmp_path, text) -> list[str]:
    _, errors, path = validate_yaml(tmp_path, text)
    return [str(error).replace(f"{path}:", "") for error in errors]


def _compile(tmp_path, text, workload=CLIENT):
    return compile_yaml(tmp_path, SERVICES, text, workload=workload)


def _route(config, dst, server_name=None):
    """The name of the action a connection to ``dst`` (``"ip:port"``) with SNI ``server_name`` gets, or None."""
    ip, port = dst.rsplit(":", 1)
    listener = config.l4.lookup(ip, int(port))
    if listener is None:
        return "no listener"
    chain = listener.chain(ipaddress.ip_address(ip), server_name)
    return None if chain is None else (chain.action.name, chain.action.clusters, chain.action.cumulative_weights)


# -- validation ------------------------------------------------------------------------------------------------

def test_port_protocols(tmp_path):
    errors = _errors(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: se, namespace: shop}
        spec:
          hosts: [se]
          resolution: STATIC
          ports:
          - {number: 1, name: a, protocol: TCP}
          - {number: 2, name: b, protocol: tls}
          - {number: 3, name: c, protocol: HTTPS}
          - {number: 4, name: d, protocol: MONGO}
          - {number: 5, name: e, protocol: UDP}
          - {number: 6, name: f, protocol: SCTP}
          endpoints: [{address: 10.0.0.1}]
        """)
    assert errors == [
        "11: ServiceEntry/shop/se: spec.ports[3].protocol: protocol MONGO is not supported by txmesh; txmesh has no "
        "MongoDB protocol filter; use protocol TCP, which is how Istio proxies it unless its Mongo filter is on",
        "12: ServiceEntry/shop/se: spec.ports[4].protocol: protocol UDP is not supported by txmesh; txmesh proxies TCP "
        "only (UDP is never captured); remove the port",
        "13: ServiceEntry/shop/se: spec.ports[5].protocol: unknown protocol 'SCTP'; use one of: HTTP, HTTP2, GRPC, "
        "TCP, TLS, HTTPS",
    ]


def test_tcp_and_tls_routes_are_read(tmp_path):
    [vs], errors, _ = validate_yaml(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: vs, namespace: shop}
        spec:
          hosts: [echo, "*.example.com"]
          tcp:
          - match: [{port: 9000, destinationSubnets: [10.0.0.0/8, 192.0.2.1], sourceLabels: {app: a},
                     sourceNamespace: shop, gateways: [mesh]}]
            route: [{destination: {host: echo, subset: v1, port: {number: 9000}}}]
          tls:
          - match: [{sniHosts: [A.example.com, "*.b.example.com"], port: 443}]
            route:
            - {destination: {host: a.example.com}, weight: 90}
            - {destination: {host: b.example.com}, weight: 10}
        """)
    assert errors == [] and vs.http == ()
    [tcp] = vs.tcp
    [match] = tcp.match
    assert match.destination_subnets == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.1/32"))
    assert (match.port, match.source_labels, match.source_namespace) == (9000, (("app", "a"),), "shop")
    assert [(d.host, d.subset, d.port, d.weight) for d in tcp.route] == [(ECHO, "v1", 9000, 100)]
    [tls] = vs.tls
    assert tls.match[0].sni_hosts == ("a.example.com", "*.b.example.com")
    assert [(d.host, d.weight) for d in tls.route] == [("a.example.com", 90), ("b.example.com", 10)]


def test_tcp_and_tls_route_problems_name_their_field(tmp_path):
    errors = _errors(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: vs, namespace: shop}
        spec:
          hosts: [echo]
          tcp:
          - match: [{sourceSubnet: 10.0.0.0/8, destinationSubnets: [10.0.0.300/8], port: 0, headers: {}}]
            route: [{destination: {host: echo}, weight: 0, headers: {}}, {destination: {host: echo}, weight: 0}]
          - match: [{gateways: [istio-system/egress], sourceNamespace: Bad_NS}]
          tls:
          - route: [{destination: {host: echo}}]
          - match: [{destinationSubnets: [10.0.0.0/8]}, {sniHosts: [other.example.com, "10.0.0.1"]}]
            route: [{destination: {host: echo}}]
        """)
    assert errors == [
        "7: VirtualService/shop/vs: spec.tcp[0].match[0].sourceSubnet: 'sourceSubnet' is not supported by txmesh; "
        "it is deprecated in Istio, which ignores it; remove it (restrict callers with an AuthorizationPolicy's "
        "ipBlocks)",
        "7: VirtualService/shop/vs: spec.tcp[0].match[0].headers: unknown field 'headers'; supported: "
        "destinationSubnets, gateways, port, sourceLabels, sourceNamespace",
        "7: VirtualService/shop/vs: spec.tcp[0].match[0].destinationSubnets[0]: invalid IP address or CIDR range "
        "'10.0.0.300/8' (like 10.0.0.1 or 10.0.0.0/16)",
        "7: VirtualService/shop/vs: spec.tcp[0].match[0].port: must be >= 1 and <= 65535, not 0",
        "8: VirtualService/shop/vs: spec.tcp[0].route[0].headers: unknown field 'headers'; supported: destination, "
        "weight",
        "8: VirtualService/shop/vs: spec.tcp[0].route: the destinations' weights sum to 0, so no destination "
        "would get traffic; give at least one destination a weight (weights are relative: 1 and 3 send 25% and "
        "75%)",
        "9: VirtualService/shop/vs: spec.tcp[1].match[0].sourceNamespace: invalid namespace 'Bad_NS': use "
        "lower-case letters, digits and '-'",
        "9: VirtualService/shop/vs: spec.tcp[1].route: 'route' is required",
        "11: VirtualService/shop/vs: spec.tls[0].match: 'match' is required",
        "12: VirtualService/shop/vs: spec.tls[1].match[0].sniHosts: 'sniHosts' is required",
        "12: VirtualService/shop/vs: spec.tls[1].match[1].sniHosts[0]: SNI host 'other.example.com' is not one of "
        "the VirtualService's hosts (nor under one of its wildcard hosts): echo, echo.shop.svc.cluster.local; a tls "
        "route only sees the connections to its VirtualService's hosts",
        "12: VirtualService/shop/vs: spec.tls[1].match[1].sniHosts[1]: an IP address is not allowed here; use a "
        "host name",
    ]


def test_a_virtual_service_needs_some_routes(tmp_path):
    errors = _errors(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: vs, namespace: shop}
        spec: {hosts: [echo], tcp: []}
        """)
    assert errors == ["4: VirtualService/shop/vs: spec.tcp: 'tcp' must not be empty"]
    assert _errors(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: vs, namespace: shop}
        spec: {hosts: [echo]}
        """) == ["4: VirtualService/shop/vs: spec: set at least one of http, tcp or tls (the routes of HTTP, TCP "
                 "and TLS traffic)"]


# -- compiling: listeners and chains -------------------------------------------------------------------------

def test_without_virtual_service_each_tcp_port_goes_to_its_service(tmp_path):
    config = _compile(tmp_path, "")
    assert _route(config, "203.0.113.5:9000") == (f"{ECHO}:9000", (f"outbound|9000||{ECHO}",), (100,))
    assert _route(config, "10.96.0.7:5432") == ("db.example.com:5432", ("outbound|5432||db.example.com",), (100,))
    assert _route(config, "10.96.0.8:5432") == "no listener"  # db has an address: only it is db's
    assert _route(config, "10.0.0.9:80") == "no listener"  # an HTTP port: the HTTP path
    # HTTPS services without an address share 0.0.0.0_443 and are told apart by SNI, aliases included
    assert _route(config, "198.51.100.1:443", "b.example.com")[1] == ("outbound|443||b.example.com",)
    assert _route(config, "198.51.100.1:443", "c.example.com") is None
    assert _route(config, "198.51.100.1:443") is None


def test_weighted_tcp_routes_by_subnet_and_static_match(tmp_path):
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: echo, namespace: shop}
        spec:
          hosts: [echo]
          tcp:
          - match: [{sourceLabels: {app: other}}]
            route: [{destination: {host: echo, subset: v2}}]
          - match: [{port: 9001}]
            route: [{destination: {host: echo, subset: v2}}]
          - match: [{destinationSubnets: [10.1.0.0/16]}]
            route: [{destination: {host: echo, subset: v1}}]
          - route:
            - {destination: {host: echo, subset: v1}, weight: 25}
            - {destination: {host: echo, subset: v2}, weight: 75}
          - route: [{destination: {host: echo}}]
        """)
    assert _route(config, "10.1.2.3:9000")[0] == "VirtualService/shop/echo/tcp[2]"
    name, clusters, weights = _route(config, "10.2.0.1:9000")
    assert name == "VirtualService/shop/echo/tcp[3]"
    assert clusters == (f"outbound|9000|v1|{ECHO}", f"outbound|9000|v2|{ECHO}") and weights == (25, 100)
    # the catch-all route ends the list: no default chain, and tcp[4] is never reached
    assert [chain.action.name for chain in config.l4.lookup("10.2.0.1", 9000).chains] == [
        "VirtualService/shop/echo/tcp[2]", "VirtualService/shop/echo/tcp[3]"]
    other = Workload("other", "shop", {"app": "other"})
    assert _route(_compile(tmp_path, "", other), "1.2.3.4:9000")[0] == f"{ECHO}:9000"


def test_the_most_specific_subnet_wins_as_in_envoy(tmp_path):
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: echo, namespace: shop}
        spec:
          hosts: [echo]
          tcp:
          - match: [{destinationSubnets: [10.0.0.0/8]}]
            route: [{destination: {host: echo, subset: v1}}]
          - match: [{destinationSubnets: [10.9.0.0/16]}]
            route: [{destination: {host: echo, subset: v2}}]
        """)
    assert _route(config, "10.9.0.1:9000")[0] == "VirtualService/shop/echo/tcp[1]"
    assert _route(config, "10.8.0.1:9000")[0] == "VirtualService/shop/echo/tcp[0]"
    assert _route(config, "11.0.0.1:9000")[0] == f"{ECHO}:9000"


def test_tls_routes_by_server_name(tmp_path):
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: secure, namespace: shop}
        spec:
          hosts: [a.example.com, "*.b.example.com"]
          tls:
          - match: [{sniHosts: ["*.b.example.com"]}]
            route: [{destination: {host: b.example.com}}]
          - match: [{sniHosts: [x.b.example.com]}, {sniHosts: ["*.b.example.com"], port: 8443}]
            route: [{destination: {host: a.example.com}}]
          - match: [{sniHosts: [a.example.com]}]
            route:
            - {destination: {host: a.example.com}, weight: 50}
            - {destination: {host: b.example.com}, weight: 50}
        """)
    assert _route(config, "1.1.1.1:443", "x.b.example.com")[0] == "VirtualService/shop/secure/tls[1]"  # exact first
    assert _route(config, "1.1.1.1:443", "y.b.example.com")[0] == "VirtualService/shop/secure/tls[0]"
    assert _route(config, "1.1.1.1:443", "a.example.com")[2] == (50, 100)
    # b.example.com is its own service, not routed by this VirtualService: its default chain still serves it
    assert _route(config, "1.1.1.1:443", "b.example.com")[0] == "b.example.com:443"


def test_a_tcp_only_virtual_service_leaves_http_alone(tmp_path):
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web-tcp, namespace: shop}
        spec:
          hosts: [web]
          tcp: [{route: [{destination: {host: web}}]}]
        """)
    [route] = config.routes.lookup("web").routes
    assert route.action.name == "ServiceEntry/shop/web"


def test_unresolved_tcp_destinations_are_warnings(tmp_path):
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: echo, namespace: shop}
        spec:
          hosts: [echo]
          tcp: [{route: [{destination: {host: nowhere}}]}]
        """)
    assert [w.reason for w in config.warnings] == [
        "no ServiceEntry visible to namespace shop defines host 'nowhere.shop.svc.cluster.local'; connections routed "
        "here get (NC) until one does"]


def test_max_connections_on_a_tcp_port_is_compiled_without_a_warning(tmp_path):
    """The TCP proxy enforces it (mesh.proxy.tcp_proxy): the cluster gets the limit and no warning is given."""
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: db, namespace: shop}
        spec:
          host: db.example.com
          trafficPolicy: {connectionPool: {tcp: {maxConnections: 3}}}
        """)
    assert config.warnings == ()
    assert config.clusters["outbound|5432||db.example.com"].limits.max_connections == 3


# -- AuthorizationPolicy for TCP ------------------------------------------------------------------------------

APP = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vault, namespace: shop}
spec:
  hosts: [vault]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  endpoints: [{address: 10.0.0.3, labels: {app: vault}}]
"""
VAULT = Workload("vault", "shop", {"app": "vault"}, "vault", app_port=7000)
CLIENT_ID = "spiffe://cluster.local/ns/shop/sa/client"


def _policy(action, rule):
    return textwrap.dedent(f"""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: p, namespace: shop}}
        spec:
          action: {action}
          rules: [{rule}]
        """)


def _decision(config, port=7000, peer=CLIENT_ID):
    ctx = SimpleNamespace(direction="inbound", source_address="10.0.0.5", peer=peer, port=port, authz_dry_run=None)
    return mesh_authorize(ctx, peer, config.tcp_authz)


@pytest.mark.parametrize("action, rule, port, allowed", [
    ("ALLOW", "{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}", 7000, True),
    ("ALLOW", "{from: [{source: {namespaces: [other]}}]}", 7000, False),
    ("ALLOW", "{from: [{source: {ipBlocks: [10.0.0.0/24]}}], to: [{operation: {ports: ['7000']}}]}", 7000, True),
    ("ALLOW", "{to: [{operation: {ports: ['7000']}}]}", 7001, False),  # the port of each connection counts
    # an ALLOW rule with an HTTP-only field never matches a TCP connection
    ("ALLOW", "{to: [{operation: {methods: [GET], ports: ['7000']}}]}", 7000, False),
    # a DENY rule is applied without its HTTP-only fields
    ("DENY", "{to: [{operation: {methods: [GET], ports: ['7001']}}]}", 7000, True),
    ("DENY", "{to: [{operation: {paths: [/admin]}}], when: [{key: 'request.headers[x]', values: [y]}]}", 7000, False),
])
def test_tcp_authorization(tmp_path, action, rule, port, allowed):
    config = compile_yaml(tmp_path, APP, _policy(action, rule), workload=VAULT)
    assert config.app_protocol == "TCP"
    decision = _decision(config, port)
    assert decision.allowed is allowed
    if not allowed:
        assert decision.policy in ("shop/p", NO_ALLOW_MATCHED)
    http_only = "methods" in rule or "paths" in rule
    assert any("HTTP-only fields" in w.reason for w in config.warnings) is http_only


def test_http_only_fields_warn_only_when_the_app_port_is_tcp(tmp_path):
    http_app = APP.replace("protocol: TCP", "protocol: HTTP")
    config = compile_yaml(tmp_path, http_app, _policy("ALLOW", "{to: [{operation: {methods: [GET]}}]}"),
                          workload=VAULT)
    assert config.warnings == ()
    assert _decision(config).allowed is False  # the same rules still decide captured TCP (inbound passthrough)


# -- connectionPool.tcp.idleTimeout and maxConnectionDuration of the TCP proxy -----------------------------------

def _echo_rule(top: str, subset: str = "") -> str:
    return f"""
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: echo, namespace: shop}}
        spec:
          host: echo
          trafficPolicy: {top}
          subsets:
          - {{name: v1, labels: {{version: v1}}{subset}}}
          - {{name: v2, labels: {{version: v2}}}}
        """


def _echo_config(directory, *texts):
    """The compiled config of the echo service alone and ``texts``, written under ``directory``."""
    directory.mkdir()
    return compile_yaml(directory, SERVICES.split("---")[0], *texts, workload=CLIENT)


def _chain(config, dst):
    ip, port = dst.rsplit(":", 1)
    return config.l4.lookup(ip, int(port)).chain(ipaddress.ip_address(ip), None)


def test_tcp_idle_timeout_and_max_duration_come_from_the_top_level_policy_of_the_first_destination(tmp_path):
    rules = _echo_rule("{connectionPool: {tcp: {idleTimeout: 20s, maxConnectionDuration: 1h}}}",
                       ", trafficPolicy: {connectionPool: {tcp: {idleTimeout: 5s, maxConnectionDuration: 1m}}}")
    config = _echo_config(tmp_path / "a", rules)
    chain = _chain(config, "10.0.0.1:9000")  # the service's own route
    assert (chain.idle_timeout, chain.max_duration) == (20.0, 3600.0)
    # a weighted route takes the first destination's rule (as Istio's listener does), never a subset's own policy
    config = _echo_config(tmp_path / "b", rules, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: vs, namespace: shop}
        spec:
          hosts: [echo]
          tcp:
          - route:
            - {destination: {host: echo, subset: v1}, weight: 1}
            - {destination: {host: echo, subset: v2}, weight: 3}
        """)
    chain = _chain(config, "10.0.0.1:9000")
    assert (chain.idle_timeout, chain.max_duration) == (20.0, 3600.0)
    assert chain.action.cumulative_weights == (1, 4)  # weights are relative
    # the subset's connectionPool is its cluster's, for the pools (HTTP idle timeout falls back on tcp's)
    assert config.clusters[f"outbound|9000|v1|{ECHO}"].idle_timeout == 5.0
    assert config.clusters[f"outbound|9000|v2|{ECHO}"].idle_timeout == 20.0


def test_tcp_idle_timeout_zero_means_none_and_http_idle_timeout_comes_first(tmp_path):
    config = _echo_config(tmp_path / "a", _echo_rule("{connectionPool: {tcp: {idleTimeout: 0s}, http: "
                                                     "{idleTimeout: 30s}}}"))
    chain = _chain(config, "10.0.0.1:9000")
    assert (chain.idle_timeout, chain.max_duration) == (0.0, 0.0)
    assert config.clusters[f"outbound|9000||{ECHO}"].idle_timeout == 30.0
    config = _echo_config(tmp_path / "b")
    chain = _chain(config, "10.0.0.1:9000")  # no DestinationRule: the listener's --idle-timeout, no maximum
    assert (chain.idle_timeout, chain.max_duration) == (None, 0.0)
    assert config.clusters[f"outbound|9000||{ECHO}"].idle_timeout == 3600.0


def test_tcp_idle_timeout_is_a_duration(tmp_path):
    errors = _errors(tmp_path, _echo_rule("{connectionPool: {tcp: {idleTimeout: 10}}}"))
    assert errors == ["6: DestinationRule/shop/echo: spec.trafficPolicy.connectionPool.tcp.idleTimeout: invalid "
                      'duration 10 (a number without a unit); use a number and a unit, like "1s", "0.5s", "100ms", '
                      '"1m" or "1h"']
