"""The HTTPMatchRequest fields beyond uri, method, authority and headers, through real sidecars:
``queryParams``, ``withoutHeaders``, ``ignoreUriCase``, ``port``, ``sourceLabels`` and ``sourceNamespace``.

Two sidecars read one config: ``canary`` (namespace ``default``, labels ``app=client, version=canary``)
and ``other`` (namespace ``shop``, label ``app=other``).  Each route sends its match to reviews v2; the
last sends the rest to v1.  The backends answer with their name in ``x-demo-service``.
"""

from __future__ import annotations

import pytest

from tests.integration.test_proxy_support import (
    destination_rule,
    endpoint,
    route_to,
    service_entry,
    virtual_service,
    write_config,
)

V1, V2 = "reviews-v1", "reviews-v2"
REVIEWS = "reviews.default.svc.cluster.local"


def _routes():
    to_v2 = lambda name, *matches: route_to("reviews", "v2", name=name, match=list(matches))  # noqa: E731
    return [
        to_v2("query", {"uri": {"prefix": "/q"}, "queryParams": {"user": {"exact": "jason"}}}),
        to_v2("query-regex", {"uri": {"prefix": "/q"}, "queryParams": {"id": {"regex": "[0-9]+"}}}),
        to_v2("query-flag", {"uri": {"prefix": "/q"}, "queryParams": {"debug": {"exact": ""}}}),
        to_v2("without-headers", {"uri": {"prefix": "/wh"}, "withoutHeaders": {"x-beta": {"exact": "no"}}}),
        to_v2("without-empty", {"uri": {"prefix": "/we"}, "withoutHeaders": {"x-beta": {"exact": ""}}}),
        to_v2("ignore-case", {"uri": {"prefix": "/Case/"}, "ignoreUriCase": True},
              {"uri": {"exact": "/ExactCase"}, "ignoreUriCase": True}),
        to_v2("port", {"uri": {"prefix": "/port"}, "port": 8080}),
        to_v2("source-labels", {"uri": {"prefix": "/src"}, "sourceLabels": {"version": "canary"}}),
        to_v2("source-namespace", {"uri": {"prefix": "/ns"}, "sourceNamespace": "shop"}),
        to_v2("repeated-header", {"uri": {"prefix": "/rep"}, "headers": {"x-tag": {"exact": "a,b"}}}),
        route_to("reviews", "v1", name="default"),
    ]


@pytest.fixture(scope="module")
def proxies(backend_factory, proxy_factory, tmp_path_factory):
    backends = {name: backend_factory(name) for name in (V1, V2)}
    config = write_config(
        tmp_path_factory.mktemp("match-config"),
        service_entry("reviews", [endpoint(backends[V1], version="v1"), endpoint(backends[V2], version="v2")]),
        destination_rule("reviews", "reviews", subsets=[{"name": "v1", "labels": {"version": "v1"}},
                                                        {"name": "v2", "labels": {"version": "v2"}}]),
        virtual_service("reviews", ["reviews"], _routes()),
    )
    canary = proxy_factory(config, "canary", labels={"app": "client", "version": "canary"})
    other = proxy_factory(config, "other", namespace="shop", labels={"app": "other"})
    return canary, other


def served(proxy, path, host=REVIEWS, **kwargs) -> str:
    result = proxy.curl(host, path, **kwargs)
    assert result.status == 200, (host, path, result)
    return result.headers["x-demo-service"]


@pytest.mark.parametrize("path, headers, expected", [
    ("/q?user=jason", {}, V2),
    ("/q?a=1&user=jason&b", {}, V2),
    ("/q?user=jason2", {}, V1),
    ("/q?user=jas%6Fn", {}, V1),      # values are not URL-decoded (Envoy's query_parameters matcher)
    ("/q?User=jason", {}, V1),        # parameter names are case-sensitive
    ("/q?id=42", {}, V2),
    ("/q?id=42x", {}, V1),            # a regex must match the whole value
    ("/q?debug", {}, V2),             # exact "" matches a parameter without a value
    ("/q?debug=", {}, V2),
    ("/q?debug=1", {}, V1),
    ("/q", {}, V1),
    ("/wh", {}, V2),                  # withoutHeaders: the header is absent
    ("/wh", {"x-beta": "yes"}, V2),   # ... or does not match
    ("/wh", {"x-beta": "no"}, V1),
    ("/we", {}, V1),                  # an absent header is tested as "" (treat_missing_header_as_empty)
    ("/we", {"x-beta": "1"}, V2),
    ("/case/a", {}, V2),
    ("/CASE/a", {}, V2),
    ("/exactcase", {}, V2),
    ("/EXACTCASE?x=1", {}, V2),
    ("/exactcase/more", {}, V1),
    ("/src", {}, V2),                 # this sidecar's workload has version=canary
    ("/ns", {}, V1),                  # ... but is not in namespace shop
])
def test_matches_on_the_canary_sidecar(proxies, path, headers, expected):
    canary, _ = proxies
    assert served(canary, path, headers=headers) == expected


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
@pytest.mark.parametrize("tags, expected", [
    (["a", "b"], V2),                 # repeated headers are matched joined with "," (Envoy's, not ", ")
    (["a,b"], V2),
    (["a, b"], V1),
    (["b", "a"], V1),
])
def test_repeated_headers_are_matched_joined_with_a_comma(proxies, tags, expected, http2):
    canary, _ = proxies
    extra = ["--http2-prior-knowledge"] if http2 else []
    assert served(canary, "/rep", headers=[("x-tag", tag) for tag in tags], extra_args=extra) == expected


@pytest.mark.parametrize("host, expected", [
    (f"{REVIEWS}:8080", V2),
    ("reviews:8080", V2),
    (REVIEWS, V1),                    # no port in the Host header: 80
    (f"{REVIEWS}:80", V1),
    (f"{REVIEWS}:9080", V1),
])
def test_port_is_the_port_in_the_host_header(proxies, host, expected):
    canary, _ = proxies
    assert served(canary, "/port", host=host) == expected


@pytest.mark.parametrize("path, expected", [
    ("/src", V1),                     # the sourceLabels route is not in this sidecar's table
    ("/ns", V2),                      # this sidecar is in namespace shop
    ("/q?user=jason", V2),            # the other routes apply to every sidecar
])
def test_source_routes_on_the_other_sidecar(proxies, path, expected):
    _, other = proxies
    assert served(other, path) == expected


def test_config_dump_shows_only_the_routes_of_this_sidecar(proxies):
    canary, other = proxies
    names = {proxy.workload: [route["action"]["name"].rsplit("/", 1)[1] for route in _reviews_dump(proxy)]
             for proxy in (canary, other)}
    assert "source-labels" in names["canary"] and "source-namespace" not in names["canary"]
    assert "source-labels" not in names["other"] and "source-namespace" in names["other"]


def _reviews_dump(proxy) -> list:
    vhosts = {vhost["name"]: vhost for vhost in proxy.admin("/config_dump")["config"]["routes"]}
    return vhosts["VirtualService/default/reviews"]["routes"]
