"""Compiling resources into clusters, route tables and predicates for one workload."""

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from mesh.builtin.routing import mesh_route
from mesh.config.compile import Workload, load_and_compile
from mesh.config.errors import ConfigErrors, ConfigWarning
from mesh.proxy.context import RequestContext
from tests.harness.config_yaml import compile_yaml

BOOKINFO = Path(__file__).parent.parent / "data" / "config" / "bookinfo"
PRODUCTPAGE = Workload("productpage", "bookinfo", {"app": "productpage"}, "bookinfo-productpage")
REVIEWS = "reviews.bookinfo.svc.cluster.local"
RATINGS = "ratings.bookinfo.svc.cluster.local"


@pytest.fixture(scope="module")
def bookinfo():
    config, warnings = load_and_compile(BOOKINFO, PRODUCTPAGE)
    assert warnings == []
    return config


def _compile(tmp_path, text, workload=PRODUCTPAGE):
    return compile_yaml(tmp_path, text, workload=workload)


def _route(config, host, path="/", method="GET", headers=None, port=None):
    """The RouteAction the proxy would choose for a request sent to ``port`` (None: no port in the Host
    header), by the built-in routing plugin."""
    authority = host.encode() if port is None else f"{host}:{port}".encode()
    ctx = RequestContext.for_test(method=method, path=path, host=host, headers=headers, authority=authority)
    return mesh_route(ctx=ctx, table=config.routes)


def _endpoints(config, name):
    return [(e.address, e.port, e.weight, e.identity) for e in config.clusters[name].endpoints]


# -- clusters ----------------------------------------------------------------------------

def test_one_cluster_per_host_and_port_plus_one_per_subset(bookinfo):
    assert sorted(bookinfo.clusters) == sorted([
        "outbound|80||api.example.com", "outbound|80||*.cdn.example.com",
        f"outbound|9080||{REVIEWS}", f"outbound|9080|v1|{REVIEWS}", f"outbound|9080|v2|{REVIEWS}",
        f"outbound|9080|v3|{REVIEWS}",
        f"outbound|9080||{RATINGS}", f"outbound|9080|v1|{RATINGS}", f"outbound|9080|v2|{RATINGS}",
        f"outbound|9443||{RATINGS}", f"outbound|9443|v1|{RATINGS}", f"outbound|9443|v2|{RATINGS}",
    ])
    spec = bookinfo.clusters[f"outbound|9080|v2|{REVIEWS}"]
    assert (spec.service, spec.port, spec.subset) == (REVIEWS, 9080, "v2")


def test_endpoint_ports_identities_and_subset_selection(bookinfo):
    assert _endpoints(bookinfo, f"outbound|9080||{REVIEWS}") == [
        ("10.0.0.1", 9080, 1, "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"),  # tlsMode: istio
        ("10.0.0.2", 9080, 1, None),  # no tlsMode label: plaintext
        ("10.0.0.3", 19080, 3, None),  # endpoint port map wins over the service port
    ]
    assert _endpoints(bookinfo, f"outbound|9080|v1|{REVIEWS}") == [
        ("10.0.0.1", 9080, 1, "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews")]
    # subset v3 sets tls ISTIO_MUTUAL: mTLS even without the label, as the "default" service account
    assert _endpoints(bookinfo, f"outbound|9080|v3|{REVIEWS}") == [
        ("10.0.0.3", 19080, 3, "spiffe://cluster.local/ns/bookinfo/sa/default")]
    assert bookinfo.clusters[f"outbound|9080|v1|{REVIEWS}"].endpoints[0].labels == (
        ("app", "reviews"), ("security.istio.io/tlsMode", "istio"), ("version", "v1"))


def test_workload_entries_selected_by_labels(bookinfo):
    # targetPort 8080 unless the WorkloadEntry maps the port name; app=details is not selected
    assert _endpoints(bookinfo, f"outbound|9080||{RATINGS}") == [
        ("10.0.1.1", 8080, 1, "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings"),
        ("10.0.1.2", 18080, 2, None)]
    assert _endpoints(bookinfo, f"outbound|9443||{RATINGS}") == [
        ("10.0.1.1", 9443, 1, "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings"),
        ("10.0.1.2", 9443, 2, None)]
    # subset v2 sets tls DISABLE: plaintext whatever the labels say
    assert _endpoints(bookinfo, f"outbound|9080|v2|{RATINGS}") == [("10.0.1.2", 18080, 2, None)]


def test_traffic_policy_subset_overrides_and_port_level_replaces(bookinfo):
    top = bookinfo.clusters[f"outbound|9080||{REVIEWS}"]
    assert (top.lb_policy, top.hash_on, top.connect_timeout, top.max_requests_per_connection,
            top.idle_timeout) == ("ROUND_ROBIN", None, 0.25, 100, 30.0)
    assert (top.outlier.consecutive_5xx, top.outlier.interval, top.outlier.base_ejection_time,
            top.outlier.max_ejection_percent) == (3, 5.0, 60.0, 50)
    v2 = bookinfo.clusters[f"outbound|9080|v2|{REVIEWS}"]
    # the subset replaces the load balancer and inherits the rest
    assert (v2.lb_policy, v2.hash_on, v2.connect_timeout, v2.outlier) == (
        "CONSISTENT_HASH", ("header", "x-user"), 0.25, top.outlier)
    ratings = bookinfo.clusters[f"outbound|9080||{RATINGS}"]
    admin = bookinfo.clusters[f"outbound|9443||{RATINGS}"]
    assert (ratings.lb_policy, ratings.connect_timeout) == ("RANDOM", 10.0)
    # the port-level entry replaces every setting: RANDOM is not inherited on port 9443
    assert (admin.lb_policy, admin.connect_timeout) == ("LEAST_REQUEST", 2.0)
    default = bookinfo.clusters["outbound|80||api.example.com"]
    assert (default.lb_policy, default.connect_timeout, default.idle_timeout, default.outlier.consecutive_5xx) == (
        "LEAST_REQUEST", 10.0, 3600.0, 5)


def test_destination_rule_of_the_client_namespace_wins(tmp_path):
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: api, namespace: shop}
        spec:
          hosts: [api]
          resolution: STATIC
          ports: [{number: 80, name: http}]
          endpoints: [{address: 10.0.0.1}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: api, namespace: shop}
        spec:
          host: api.shop.svc.cluster.local
          trafficPolicy: {loadBalancer: {simple: RANDOM}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: api-from-web, namespace: web}
        spec:
          host: "*.shop.svc.cluster.local"
          trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
        """, Workload("frontend", "web"))
    assert config.clusters["outbound|80||api.shop.svc.cluster.local"].lb_policy == "ROUND_ROBIN"


def test_subject_alt_name_is_the_identity_of_endpoints_without_service_account(tmp_path):
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: vm, namespace: shop}
        spec:
          hosts: [vm.example.com]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{number: 80, name: http}]
          subjectAltNames: ["spiffe://cluster.local/ns/legacy/sa/vm"]
          endpoints:
          - {address: 10.0.0.1, labels: {security.istio.io/tlsMode: istio}}
          - {address: 10.0.0.2, labels: {security.istio.io/tlsMode: istio}, serviceAccount: api}
        """)
    assert [e.identity for e in config.clusters["outbound|80||vm.example.com"].endpoints] == [
        "spiffe://cluster.local/ns/legacy/sa/vm", "spiffe://cluster.local/ns/shop/sa/api"]


# -- host lookup ---------------------------------------------------------------------------

@pytest.mark.parametrize("host,vhost", [
    (REVIEWS, "VirtualService/bookinfo/reviews"),
    ("reviews.bookinfo.svc", "VirtualService/bookinfo/reviews"),
    ("reviews.bookinfo", "VirtualService/bookinfo/reviews"),
    ("reviews", "VirtualService/bookinfo/reviews"),
    ("10.96.0.20", "VirtualService/bookinfo/reviews"),  # the ServiceEntry's address
    ("ratings", "VirtualService/bookinfo/ratings"),
    ("api.example.com", "api.example.com"),  # no VirtualService: the default virtual host
    ("img.cdn.example.com", "*.cdn.example.com"),
    ("a.b.cdn.example.com", "*.cdn.example.com"),
    ("cdn.example.com", None),
    ("details", None),
])
def test_lookup_from_the_same_namespace(bookinfo, host, vhost):
    found = bookinfo.routes.lookup(host)
    assert (found.name if found else None) == vhost


def test_short_names_only_resolve_in_the_clients_namespace():
    config, _ = load_and_compile(BOOKINFO, Workload("web", "frontend"))
    assert config.routes.lookup("reviews") is None
    assert config.routes.lookup("reviews.bookinfo").name == "VirtualService/bookinfo/reviews"
    assert config.routes.lookup(REVIEWS).name == "VirtualService/bookinfo/reviews"


def test_wildcards_longest_suffix_first_and_virtual_service_wildcards_bind_services(tmp_path):
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: ext, namespace: bookinfo}
        spec:
          hosts: ["*.example.com", "*.eu.example.com", "pay.example.com"]
          resolution: STATIC
          ports: [{number: 80, name: http}]
          endpoints: [{address: 192.0.2.1}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: eu, namespace: bookinfo}
        spec:
          hosts: ["*.eu.example.com"]
          http: [{route: [{destination: {host: pay.example.com}}], timeout: 3s}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: all, namespace: bookinfo}
        spec:
          hosts: ["*.example.com"]
          http: [{route: [{destination: {host: pay.example.com}}], timeout: 7s}]
        """)
    assert [suffix for suffix, _ in config.routes.wildcards] == [".eu.example.com", ".example.com"]
    assert config.routes.lookup("a.eu.example.com").name == "VirtualService/bookinfo/eu"
    assert config.routes.lookup("a.example.com").name == "VirtualService/bookinfo/all"
    # the exact ServiceEntry host is routed by the VirtualService whose wildcard covers it
    assert _route(config, "pay.example.com").timeout == 7.0


# -- routes -------------------------------------------------------------------------------

def test_routes_in_order_with_their_matches(bookinfo):
    assert _route(bookinfo, "reviews", headers={"end-user": "jason"}).clusters == (f"outbound|9080|v2|{REVIEWS}",)
    v3 = _route(bookinfo, "reviews", "/api/v3/books")
    assert v3.name == "VirtualService/bookinfo/reviews/api-v3"
    assert (v3.clusters, v3.timeout, v3.retry.attempts, v3.retry.per_try_timeout) == (
        (f"outbound|9080|v3|{REVIEWS}",), 2.5, 3, 0.5)
    assert _route(bookinfo, "reviews", "/api/v3/books", method="POST").name.endswith("http[2]")
    assert _route(bookinfo, "reviews", "/v3/42?full=1").name.endswith("api-v3")
    fallback = _route(bookinfo, "reviews", "/")
    assert fallback.name == "VirtualService/bookinfo/reviews/http[2]"
    assert fallback.request_headers.set == ((b"x-mesh", b"txmesh"),)
    assert fallback.response_headers.add == ((b"x-served-by", b"reviews"),)


def test_weights_are_cumulative_and_zero_weights_are_never_picked(bookinfo):
    action = _route(bookinfo, "reviews", "/")
    assert action.clusters == (f"outbound|9080|v1|{REVIEWS}", f"outbound|9080|v2|{REVIEWS}")
    assert action.cumulative_weights == (75, 100)
    rng = random.Random(7)
    picks = Counter(action.pick_cluster(_random=rng.random) for _ in range(20000))
    assert set(picks) == set(action.clusters)
    assert picks[f"outbound|9080|v1|{REVIEWS}"] / 20000 == pytest.approx(0.75, abs=0.02)


def test_default_routes_and_retry_policies(bookinfo):
    action = _route(bookinfo, "api.example.com", "/anything")
    assert action.name == "ServiceEntry/bookinfo/external-api"
    assert action.clusters == ("outbound|80||api.example.com",) and action.timeout is None
    assert (action.retry.attempts, action.retry.retry_on, action.retry.retry_status_codes) == (
        2, frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}),
        frozenset({503}))
    assert _route(bookinfo, "ratings", "/other").retry is None  # attempts: 0


def test_prefix_rewrites_strip_each_matched_prefix(bookinfo):
    short = _route(bookinfo, "ratings", "/v1/5")
    long = _route(bookinfo, "ratings", "/legacy/ratings/5?x=1")
    assert (short.rewrite_prefix, short.rewrite_strip) == (b"/api/", 4)
    assert (long.rewrite_prefix, long.rewrite_strip) == (b"/api/", 16)
    assert long.rewrite_authority == b"ratings.internal"
    path = b"/legacy/ratings/5?x=1"
    assert long.rewrite_prefix + path[long.rewrite_strip:] == b"/api/5?x=1"


def test_exact_and_match_all_rewrites(tmp_path):
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: bookinfo}
        spec:
          hosts: [web.example.com]
          http:
          - match: [{uri: {exact: /old}}]
            rewrite: {uri: /new}
            route: [{destination: {host: web.example.com}}]
          - rewrite: {uri: /v2}
            route: [{destination: {host: web.example.com}}]
        """)
    exact = _route(config, "web.example.com", "/old?q")
    assert exact.rewrite_prefix + b"/old?q"[exact.rewrite_strip:] == b"/new?q"
    # without a uri match Envoy matches the prefix "/", so only "/" is replaced
    other = _route(config, "web.example.com", "/page")
    assert other.rewrite_prefix + b"/page"[other.rewrite_strip:] == b"/v2page"


_SOURCE_ROUTES = """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: web, namespace: bookinfo}
    spec:
      hosts: [web.example.com]
      http:
      - name: from-productpage-v1
        match: [{sourceLabels: {app: productpage, version: v1}}]
        route: [{destination: {host: web.example.com}}]
      - name: from-other-namespace
        match: [{sourceNamespace: other, uri: {prefix: /a}}, {sourceNamespace: bookinfo, uri: {prefix: /b}}]
        route: [{destination: {host: web.example.com}}]
      - name: on-8080
        match: [{port: 8080}]
        route: [{destination: {host: web.example.com}}]
      - name: rest
        route: [{destination: {host: web.example.com}}]
    """


def test_source_labels_and_namespace_keep_or_drop_matches_per_workload(tmp_path):
    v1 = Workload("productpage", "bookinfo", {"app": "productpage", "version": "v1"}, "bookinfo-productpage")
    routes = _compile(tmp_path, _SOURCE_ROUTES, workload=v1).routes.lookup("web.example.com").routes
    assert [route.action.name.rsplit("/", 1)[1] for route in routes] == [
        "from-productpage-v1", "from-other-namespace", "on-8080", "rest"]
    assert routes[0].match is None  # its only condition held at compile time
    # productpage without version: the first route is not in its table; of the second, only /b is left
    config = _compile(tmp_path, _SOURCE_ROUTES)
    assert [route.action.name.rsplit("/", 1)[1] for route in config.routes.lookup("web.example.com").routes] == [
        "from-other-namespace", "on-8080", "rest"]
    assert _route(config, "web.example.com", "/a").name.endswith("/rest")
    assert _route(config, "web.example.com", "/b").name.endswith("/from-other-namespace")
    assert config.dump["routes"][0]["routes"][0]["match"] == "uri prefix '/b'"


@pytest.mark.parametrize("authority,original_dst,route", [
    ("web.example.com:8080", None, "on-8080"),
    ("web.example.com", None, "rest"),  # no port: 80
    ("web.example.com:80", ("10.0.0.1", 8080), "on-8080"),  # a captured request: the port it was sent to
    ("[::1]:8080", None, "on-8080"),
    ("[::1]", None, "rest"),
])
def test_port_is_the_port_the_request_was_sent_to(tmp_path, authority, original_dst, route):
    config = _compile(tmp_path, _SOURCE_ROUTES)
    ctx = RequestContext.for_test(path="/", host="web.example.com", authority=authority.encode())
    if original_dst is not None:
        ctx.extra["original_dst"] = original_dst
    action = next(r.action for r in config.routes.lookup("web.example.com").routes if r.match is None or r.match(ctx))
    assert action.name.endswith("/" + route)


# -- visibility, conflicts and warnings ----------------------------------------------------------

def test_export_to_hides_resources_from_other_namespaces(tmp_path):
    text = """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: private, namespace: team}
        spec:
          hosts: [private]
          exportTo: ["."]
          resolution: STATIC
          ports: [{number: 80, name: http}]
          endpoints: [{address: 10.0.0.9}]
        """
    inside = _compile(tmp_path, text, Workload("a", "team"))
    outside = _compile(tmp_path, text, Workload("b", "elsewhere"))
    assert "outbound|80||private.team.svc.cluster.local" in inside.clusters
    assert outside.clusters == {} and outside.routes.lookup("private.team") is None


def test_broken_references_compile_with_warnings(tmp_path):
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: web, namespace: bookinfo}
        spec:
          hosts: [web]
          resolution: STATIC
          ports: [{number: 80, name: http}, {number: 81, name: http-alt}]
          endpoints: [{address: 10.0.0.1}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: bookinfo}
        spec:
          hosts: [web, web.bookinfo]
          http:
          - route:
            - destination: {host: web, subset: canary}
              weight: 50
            - destination: {host: missing}
              weight: 50
          - route:
            - destination: {host: web, port: {number: 90}}
          - route:
            - destination: {host: web}
        """)
    path = str(tmp_path / "config.yaml")
    assert all(isinstance(warning, ConfigWarning) for warning in config.warnings)
    assert [str(warning) for warning in config.warnings] == [
        f"{path}:14: VirtualService/bookinfo/web: spec.hosts[1]: no ServiceEntry visible to namespace bookinfo "
        "defines host 'web.bookinfo'; did you mean 'web.bookinfo.svc.cluster.local'?",
        f"{path}:17: VirtualService/bookinfo/web: spec.http[0].route[0].destination.subset: no DestinationRule "
        "visible to namespace bookinfo defines subset 'canary' of 'web.bookinfo.svc.cluster.local'; requests "
        "routed here get 503 (NC)",
        f"{path}:19: VirtualService/bookinfo/web: spec.http[0].route[1].destination.host: no ServiceEntry "
        "visible to namespace bookinfo defines host 'missing.bookinfo.svc.cluster.local'; requests routed here "
        "get 503 (NC) until one does",
        f"{path}:22: VirtualService/bookinfo/web: spec.http[1].route[0].destination.port.number: "
        "'web.bookinfo.svc.cluster.local' has no port 90; its ports are 80, 81",
    ]
    # the routes still exist; their clusters do not, so the proxy answers 503 NC for them
    action = _route(config, "web", "/")
    assert action.clusters == ("outbound|80|canary|web.bookinfo.svc.cluster.local",
                               "outbound|80||missing.bookinfo.svc.cluster.local")
    assert not set(action.clusters) & set(config.clusters)


def test_first_virtual_service_of_a_host_wins_own_namespace_first(tmp_path):
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: a-other, namespace: aaa}
        spec:
          hosts: [web.example.com]
          http: [{route: [{destination: {host: web.example.com}}], timeout: 1s}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: mine, namespace: bookinfo}
        spec:
          hosts: [web.example.com]
          http: [{route: [{destination: {host: web.example.com}}], timeout: 2s}]
        """)
    assert _route(config, "web.example.com").timeout == 2.0
    assert any("VirtualService/aaa/a-other: spec.hosts[0]: host 'web.example.com' is already routed by "
               "VirtualService/bookinfo/mine" in str(warning) for warning in config.warnings)


# -- version, dump, errors -----------------------------------------------------------------------

def test_version_depends_on_content_only(tmp_path, bookinfo):
    copy = tmp_path / "copy"
    shutil.copytree(BOOKINFO, copy)
    (copy / "00-services.yaml").rename(copy / "99-services.yaml")
    again, _ = load_and_compile(copy, PRODUCTPAGE)
    assert again.version == bookinfo.version and len(bookinfo.version) == 12
    text = (copy / "03-virtualservices.yaml").read_text().replace("timeout: 2.5s", "timeout: 3s")
    (copy / "03-virtualservices.yaml").write_text(text)
    changed, _ = load_and_compile(copy, PRODUCTPAGE)
    assert changed.version != bookinfo.version


def test_dump_is_json_with_matches_as_text(bookinfo):
    dump = json.loads(json.dumps(bookinfo.dump))
    reviews = next(vhost for vhost in dump["routes"] if vhost["name"] == "VirtualService/bookinfo/reviews")
    assert reviews["domains"] == ["10.96.0.20", "reviews", "reviews.bookinfo", "reviews.bookinfo.svc", REVIEWS]
    assert [route["match"] for route in reviews["routes"]] == [
        "header end-user exact 'jason'",
        "(uri prefix '/api/v3/' && method exact 'GET') || (uri regex '/v3/[0-9]+')",
        "*"]
    assert reviews["routes"][2]["action"]["clusters"] == [
        {"name": f"outbound|9080|v1|{REVIEWS}", "weight": 75},
        {"name": f"outbound|9080|v2|{REVIEWS}", "weight": 25}]
    cluster = next(c for c in dump["clusters"] if c["name"] == f"outbound|9080|v2|{REVIEWS}")
    assert cluster["hash_on"] == ["header", "x-user"]
    assert cluster["endpoints"] == [{"address": "10.0.0.2", "port": 9080, "weight": 1,
                                     "labels": {"app": "reviews", "version": "v2"}, "identity": None}]
    assert bookinfo.sources == tuple(sorted(str(path) for path in BOOKINFO.glob("*.yaml")))


def test_load_and_compile_reports_all_errors_of_all_files(tmp_path):
    (tmp_path / "a.yaml").write_text("apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
                                     "metadata: {name: a}\nspec:\n  hosts: [a]\n  http: [{route: []}]\n")
    (tmp_path / "b.yaml").write_text("kind: [\n")
    with pytest.raises(ConfigErrors) as raised:
        load_and_compile(tmp_path, PRODUCTPAGE)
    assert [str(error) for error in raised.value.errors] == [
        f"{tmp_path}/a.yaml:6: VirtualService/default/a: spec.http[0].route: 'route' must not be empty",
        f"{tmp_path}/b.yaml:2: yaml: while parsing a flow node did not find expected node content",
    ]


def test_a_destination_without_a_port_goes_to_the_port_the_request_was_sent_to(tmp_path):
    """Istio builds the routes of each port: a destination without a port goes to the request's port when the
    service has it (the first port for any other), with or without a VirtualService; mirrors too."""
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: api, namespace: bookinfo}
        spec:
          hosts: [api]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{number: 9080, name: http}, {number: 9090, name: http-admin}, {number: 5432, name: db, protocol: TCP}]
          endpoints: [{address: 10.0.0.1, labels: {version: v1}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: plain, namespace: bookinfo}
        spec:
          hosts: [plain]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{number: 8080, name: http}, {number: 8081, name: http-alt}]
          endpoints: [{address: 10.0.0.2}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: api, namespace: bookinfo}
        spec:
          host: api
          subsets: [{name: v1, labels: {version: v1}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: api, namespace: bookinfo}
        spec:
          hosts: [api]
          http:
          - match: [{uri: {prefix: /pinned}}]
            route: [{destination: {host: api, subset: v1, port: {number: 9080}}}]
          - route: [{destination: {host: api, subset: v1}}]
            mirror: {host: plain}
        """)
    api, plain = "api.bookinfo.svc.cluster.local", "plain.bookinfo.svc.cluster.local"
    assert config.warnings == ()
    assert _route(config, "api", port=9090).clusters == (f"outbound|9090|v1|{api}",)
    assert _route(config, "api", port=9080).clusters == (f"outbound|9080|v1|{api}",)
    assert _route(config, "api").clusters == (f"outbound|9080|v1|{api}",)  # port 80: none of its ports
    assert _route(config, "api", "/pinned", port=9090).clusters == (f"outbound|9080|v1|{api}",)
    assert _route(config, "api", port=8081).extras.mirrors == ((f"outbound|8081||{plain}", 1.0),)
    assert _route(config, "plain", port=8081).clusters == (f"outbound|8081||{plain}",)
    assert _route(config, "plain", port=8080).clusters == (f"outbound|8080||{plain}",)
    assert _route(config, "plain").clusters == (f"outbound|8080||{plain}",)
    routes = {vhost["name"]: vhost for vhost in config.dump["routes"]}
    assert sorted(routes["VirtualService/bookinfo/api"]["ports"]) == ["8080", "8081", "9080", "9090"]
    assert [cluster["name"] for cluster in routes[plain]["ports"]["8081"][0]["action"]["clusters"]] == [
        f"outbound|8081||{plain}"]


def test_a_match_with_gateways_ignores_its_source_labels_and_namespace_as_istio(tmp_path):
    """Istio's sourceMatchHTTP: when a match names gateways, only they decide whether it applies."""
    config = _compile(tmp_path, """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: web, namespace: bookinfo}
        spec:
          hosts: [web]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{number: 80, name: http}]
          endpoints: [{address: 10.0.0.1}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: bookinfo}
        spec:
          hosts: [web]
          http:
          - name: mesh-tester
            match: [{uri: {prefix: /a}, sourceLabels: {app: tester}, sourceNamespace: other, gateways: [mesh]}]
            route: [{destination: {host: web}}]
          - name: tester-only
            match: [{uri: {prefix: /b}, sourceLabels: {app: tester}}]
            route: [{destination: {host: web}}]
          - name: other-gateway
            match: [{uri: {prefix: /c}, gateways: [bookinfo/ingress]}]
            route: [{destination: {host: web}}]
          - name: rest
            route: [{destination: {host: web}}]
        """)
    assert _route(config, "web", "/a").name.endswith("/mesh-tester")
    assert _route(config, "web", "/b").name.endswith("/rest")
    assert _route(config, "web", "/c").name.endswith("/rest")
