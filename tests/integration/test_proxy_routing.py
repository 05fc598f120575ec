"""Outbound routing through a real sidecar: VirtualService matches, host forms, weights, subsets, admin pages.

One proxy (workload ``client`` in namespace ``default``) and five demo backends serve most of the module;
another (``rules-client``, three backends) shows which DestinationRules apply (merged, never another namespace's).
Every backend answers with its own name in ``x-demo-service``, which tells where a request went.
"""

from __future__ import annotations

import math
import socket
import struct

import pytest

from tests.harness import RawConnection, wait_for
from tests.integration.test_proxy_support import (
    cluster_endpoints,
    cluster_name,
    curl_many,
    destination_rule,
    endpoint,
    route_to,
    served_by,
    service_entry,
    virtual_service,
    write_config,
)

V1, V2 = "reviews-v1", "reviews-v2"


def _reviews_routes():
    """The reviews VirtualService: each route sends its match to subset v2; the last route sends the rest to v1."""
    to_v2 = lambda name, *matches: route_to("reviews", "v2", name=name, match=list(matches))  # noqa: E731
    return [
        to_v2("uri-exact", {"uri": {"exact": "/exact"}}),
        to_v2("uri-prefix", {"uri": {"prefix": "/v2/"}}),
        to_v2("uri-regex", {"uri": {"regex": "/items/[0-9]+"}}),
        to_v2("header-exact", {"headers": {"x-group": {"exact": "beta"}}}),
        to_v2("header-prefix", {"headers": {"x-user": {"prefix": "vip-"}}}),
        to_v2("header-regex", {"headers": {"x-trace": {"regex": "[a-f0-9]{8}"}}}),
        to_v2("method", {"method": {"exact": "DELETE"}}),
        to_v2("two-conditions", {"uri": {"prefix": "/both"}, "headers": {"x-env": {"exact": "prod"}}}),
        # First match wins: /order/special matches this broader route first, so never reaches the next one.
        to_v2("order-broad", {"uri": {"prefix": "/order"}}),
        route_to("reviews", "v1", name="order-specific", match=[{"uri": {"prefix": "/order/special"}}]),
        {"name": "split", "match": [{"uri": {"prefix": "/split"}}],
         "route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
                   {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20}]},
        route_to("reviews", "v1", name="default"),
    ]


@pytest.fixture(scope="module")
def mesh(backend_factory, proxy_factory, tmp_path_factory):
    backends = {name: backend_factory(name) for name in (V1, V2, "ratings", "cdn", "catalog")}
    config = write_config(
        tmp_path_factory.mktemp("routing-config"),
        service_entry("reviews", [endpoint(backends[V1], version="v1"), endpoint(backends[V2], version="v2")],
                      addresses=["10.96.0.20"]),
        destination_rule("reviews", "reviews", subsets=[{"name": "v1", "labels": {"version": "v1"}},
                                                        {"name": "v2", "labels": {"version": "v2"}}]),
        virtual_service("reviews", ["reviews"], _reviews_routes()),
        service_entry("ratings", [endpoint(backends["ratings"])], namespace="shop"),
        service_entry("catalog", [endpoint(backends["catalog"])], namespace="shop"),
        service_entry("cdn", [endpoint(backends["cdn"])], hosts=["*.cdn.example.com"]),
        virtual_service("internal", ["*.internal.example"], [route_to("catalog.shop.svc.cluster.local")]),
    )
    proxy = proxy_factory(config, "client", extra_args=["--disable-plugin", "peak_ewma"])
    return proxy, backends


def served(proxy, host, path="/", **kwargs) -> str:
    result = proxy.curl(host, path, **kwargs)
    assert result.status == 200, (host, path, result)
    return result.headers["x-demo-service"]


@pytest.mark.parametrize("path, method, headers, expected", [
    ("/exact", None, {}, V2),
    ("/exact?q=1", None, {}, V2),            # exact compares the path without the query
    ("/exact/more", None, {}, V1),
    ("/v2/anything", None, {}, V2),
    ("/v2", None, {}, V1),                    # the prefix is "/v2/"
    ("/items/42", None, {}, V2),
    ("/items/42a", None, {}, V1),             # a regex must match the whole path
    ("/h", None, {"X-Group": "beta"}, V2),
    ("/h", None, {"x-group": "beta2"}, V1),
    ("/h", None, {"x-user": "vip-anna"}, V2),
    ("/h", None, {"x-user": "anna-vip-"}, V1),
    ("/h", None, {"x-trace": "deadbeef"}, V2),
    ("/h", None, {"x-trace": "deadbeef0"}, V1),
    ("/h", "DELETE", {}, V2),
    ("/h", "GET", {}, V1),
    ("/both", None, {"x-env": "prod"}, V2),
    ("/both", None, {}, V1),                  # every condition of a match entry must hold
    ("/order/special", None, {}, V2),         # first match wins over the more specific later route
])
def test_route_matches(mesh, path, method, headers, expected):
    proxy, _ = mesh
    assert served(proxy, "reviews", path, method=method, headers=headers) == expected


def test_request_reaches_the_backend_unchanged(mesh):
    proxy, _ = mesh
    result = proxy.curl("reviews", "/exact?q=1&r=2", method="DELETE", data=b"payload")
    doc = result.json()
    assert (doc["method"], doc["path"], doc["body_bytes"]) == ("DELETE", "/exact?q=1&r=2", 7)
    assert doc["headers"]["host"] == "reviews"


@pytest.mark.parametrize("host, expected", [
    ("reviews", V1),                                   # short name, own namespace
    ("reviews.default", V1),
    ("reviews.default.svc", V1),
    ("reviews.default.svc.cluster.local", V1),
    ("reviews:80", V1),
    ("reviews.default.svc.cluster.local:8080", V1),   # the port never takes part in host matching
    ("REVIEWS.Default", V1),                          # host names compare case-insensitively
    ("10.96.0.20", V1),                               # a ServiceEntry address (VIP)
    ("10.96.0.20:80", V1),
    ("ratings.shop", "ratings"),                      # another namespace: svc.ns and longer
    ("ratings.shop.svc.cluster.local:80", "ratings"),
    ("img.cdn.example.com", "cdn"),                   # wildcard ServiceEntry host
    ("a.b.cdn.example.com:443", "cdn"),
    ("api.internal.example", "catalog"),              # wildcard VirtualService host
])
def test_host_forms(mesh, host, expected):
    proxy, _ = mesh
    assert served(proxy, host, "/", headers={"x-user": "nobody"}) == expected


@pytest.mark.parametrize("host", [
    "ratings",                # a bare name resolves only in the workload's own namespace (default)
    "cdn.example.com",        # *.cdn.example.com does not cover the bare domain
    "reviews.other",
    "unknown.example.com",
])
def test_no_route_is_404_nr_with_a_helpful_body(mesh, host):
    proxy, _ = mesh
    result = proxy.curl(host, "/some/path")
    assert result.status == 404, result
    assert result.headers.get("x-mesh-flags") == "NR"
    assert "x-demo-service" not in result.headers
    body = result.body.decode()
    assert f"'{host.split(':')[0]}'" in body and "Host header" in body, body
    assert result.headers.get("x-request-id"), "the error should carry the request id to quote in a report"


def test_weighted_split_80_20(mesh):
    proxy, _ = mesh
    requests = 1000
    counts = served_by(curl_many(proxy.outbound_url + "/split", requests, host="reviews"))
    expected = requests * 0.8
    tolerance = 5 * math.sqrt(requests * 0.8 * 0.2)   # five standard deviations of the binomial: ~63
    assert set(counts) == {V1, V2}
    assert abs(counts[V1] - expected) <= tolerance, counts


def test_subset_selects_endpoints_by_label(mesh):
    proxy, backends = mesh
    assert served_by(curl_many(proxy.outbound_url + "/v2/x", 40, host="reviews")) == {V2: 40}
    assert served_by(curl_many(proxy.outbound_url + "/plain", 40, host="reviews")) == {V1: 40}
    subset_v2 = cluster_endpoints(proxy, cluster_name("reviews", subset="v2"))
    assert list(subset_v2) == [f"127.0.0.1:{backends[V2].port}"]
    assert subset_v2[f"127.0.0.1:{backends[V2].port}"]["labels"] == {"version": "v2"}
    assert len(cluster_endpoints(proxy, cluster_name("reviews"))) == 2


# -- which DestinationRules apply ----------------------------------------------------------------------------

CATALOG = "catalog.shop.svc.cluster.local"


@pytest.fixture(scope="module")
def rules_mesh(backend_factory, proxy_factory, tmp_path_factory):
    """A client in ``default``, services in ``shop``: catalog's subsets come from two DestinationRules of
    shop (Istio merges them); the only rule for ratings is in ``ops``, neither namespace (nor the root):
    its tls SIMPLE to a plaintext app would fail every request if it applied."""
    backends = {name: backend_factory(name) for name in ("catalog-v1", "catalog-v2", "ratings-plain")}
    config = write_config(
        tmp_path_factory.mktemp("rules-config"),
        service_entry("catalog", [endpoint(backends["catalog-v1"], version="v1"),
                                  endpoint(backends["catalog-v2"], version="v2")], namespace="shop"),
        destination_rule("catalog-a", "catalog", namespace="shop",
                         subsets=[{"name": "v1", "labels": {"version": "v1"}}]),
        destination_rule("catalog-b", "catalog", namespace="shop",
                         subsets=[{"name": "v2", "labels": {"version": "v2"}}]),
        virtual_service("catalog", [CATALOG], [route_to(CATALOG, "v2", match=[{"uri": {"prefix": "/v2"}}]),
                                               route_to(CATALOG, "v1")]),
        service_entry("ratings", [endpoint(backends["ratings-plain"])], namespace="shop"),
        destination_rule("ratings-tls", "ratings.shop.svc.cluster.local", namespace="ops",
                         traffic_policy={"tls": {"mode": "SIMPLE"}}),
    )
    return proxy_factory(config, "rules-client")


def test_destination_rules_of_one_host_and_namespace_are_merged(rules_mesh):
    assert served_by(curl_many(rules_mesh.outbound_url + "/v2/x", 5, host=CATALOG)) == {"catalog-v2": 5}
    assert served_by(curl_many(rules_mesh.outbound_url + "/x", 5, host=CATALOG)) == {"catalog-v1": 5}


def test_a_destination_rule_of_an_unrelated_namespace_does_not_apply(rules_mesh):
    assert served(rules_mesh, "ratings.shop", "/") == "ratings-plain"  # plaintext, as without any rule


# -- admin ---------------------------------------------------------------------------------------------


def test_admin_ready(mesh):
    proxy, _ = mesh
    ready = proxy.admin("/ready")
    assert ready["ready"] is True
    assert ready["version"] == proxy.admin("/config_dump")["version"]


def test_admin_config_dump(mesh):
    proxy, _ = mesh
    dump = proxy.admin("/config_dump")
    assert isinstance(dump["version"], str) and len(dump["version"]) == 12
    assert dump["workload"] == {"name": "client", "namespace": "default", "labels": {}}
    assert "peak_ewma" not in dump["plugins"] and "builtin.balancing" in dump["plugins"]
    vhosts = {vhost["name"]: vhost for vhost in dump["config"]["routes"]}
    reviews = vhosts["VirtualService/default/reviews"]
    assert {"reviews", "reviews.default", "reviews.default.svc.cluster.local", "10.96.0.20"} <= set(reviews["domains"])
    assert "ratings" not in vhosts.get("ratings.shop.svc.cluster.local", {}).get("domains", ["ratings"])
    assert len(reviews["routes"]) == len(_reviews_routes())
    assert "/items/[0-9]+" in reviews["routes"][2]["match"]
    clusters = {cluster["name"] for cluster in dump["config"]["clusters"]}
    assert {cluster_name("reviews"), cluster_name("reviews", subset="v1"), cluster_name("reviews", subset="v2"),
            cluster_name("ratings", namespace="shop")} <= clusters


def test_admin_clusters_shows_active_requests(mesh):
    proxy, backends = mesh
    cluster = cluster_name("reviews", subset="v2")
    address = f"127.0.0.1:{backends[V2].port}"
    before = cluster_endpoints(proxy, cluster)[address]
    assert before["healthy"] is True and before["active_requests"] == 0
    # x-group: beta pins the request to subset v2; the app would answer /delay/5000 after 5 s.
    with RawConnection("127.0.0.1", proxy.outbound_port) as held:
        held.send(b"GET /delay/5000 HTTP/1.1\r\nHost: reviews\r\nx-group: beta\r\n\r\n")
        row = wait_for(lambda: (r := cluster_endpoints(proxy, cluster)[address])["active_requests"] == 1 and r,
                       5, what="the delayed request to show as active")
        assert row["open_connections"] >= 1 and row["total_requests"] > before["total_requests"]
        # Reset the connection (not a FIN, which the proxy reads as a half-close and still answers).
        held.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_for(lambda: cluster_endpoints(proxy, cluster)[address]["active_requests"] == 0, 2,
             what="the reset request to stop counting as active")
