"""What a route does besides forwarding, through a real sidecar: Istio's fault injection task (with short
delays), redirects, direct responses, regex rewrites, headers on the route and on each destination, and
CORS; over HTTP/1.1 and HTTP/2, and bad config rejected with the old config kept.

One proxy (workload ``client`` in namespace ``default``, with an access log) serves the module, in front of
demo apps that answer with their name in ``x-demo-service`` and echo the request they got.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import free_port, wait_for
from tests.integration.test_proxy_support import (
    curl_many,
    destination_rule,
    endpoint,
    route_to,
    service_entry,
    virtual_service,
    write_config,
)
from tests.integration.test_telemetry_support import access_log, scrape

V1, V2 = "reviews-v1", "reviews-v2"
DELAY = 0.3  # seconds: Istio's task uses 7 s


def _fault(delay=None, abort=None, percent=100.0) -> dict:
    fault = {}
    if delay:
        fault["delay"] = {"fixedDelay": delay, "percentage": {"value": percent}}
    if abort:
        fault["abort"] = {**abort, "percentage": {"value": percent}}
    return fault


def _when(header_value) -> list:
    return [{"headers": {"x-fault": {"exact": header_value}}}]


def _ratings_routes() -> list:
    """Istio's fault-injection task on ratings (jason gets the delay), plus the other kinds of fault."""
    return [
        {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}],
         "fault": _fault(delay=f"{int(DELAY * 1000)}ms"), "route": [{"destination": {"host": "ratings"}}]},
        route_to("ratings", name="delay-then-timeout", match=_when("timeout"),
                 fault=_fault(delay="400ms"), timeout="200ms"),
        route_to("ratings", name="long-delay", match=_when("long"), fault=_fault(delay="1s")),
        route_to("ratings", name="abort", match=_when("abort"), fault=_fault(abort={"httpStatus": 500})),
        route_to("ratings", name="half", match=_when("half"), fault=_fault(abort={"httpStatus": 503}, percent=50)),
        route_to("ratings", name="grpc", match=_when("grpc"), fault=_fault(abort={"grpcStatus": "UNAVAILABLE"})),
        {"name": "default", "headers": {"request": {"add": {"x-order": "route"}}},
         "route": [{"destination": {"host": "ratings"},
                    "headers": {"request": {"set": {"x-order": "destination"}}}}]},
    ]


def _web_routes() -> list:
    """Redirects, direct responses, rewrites and CORS, by path."""

    def redirect(name, **fields):
        return {"name": name, "match": [{"uri": {"prefix": f"/r/{name}"}}], "redirect": fields}

    def direct(name, status, body=None):
        out = {"name": name, "match": [{"uri": {"prefix": f"/d/{name}"}}], "directResponse": {"status": status}}
        if body:
            out["directResponse"]["body"] = body
        return out

    cors = {"allowOrigins": [{"exact": "https://a.example"}, {"prefix": "https://b."}],
            "allowMethods": ["GET", "POST"], "allowHeaders": ["x-custom"], "exposeHeaders": ["x-exposed"],
            "maxAge": "24h", "allowCredentials": True}
    return [
        {**redirect("uri", uri="/new"), "headers": {"response": {"set": {"x-redirected": "yes"}}}},
        redirect("authority", authority="new.example.com", redirectCode=302),
        redirect("port", port=8443),
        redirect("derive", derivePort="FROM_REQUEST_PORT", redirectCode=307),
        redirect("scheme", scheme="https", redirectCode=308),
        redirect("query", uri="/q?page=2", redirectCode=303),
        direct("text", 503, {"string": "down for maintenance"}),
        direct("bytes", 200, {"bytes": "aGVsbG8gYnl0ZXM="}),
        direct("created", 201),
        route_to("web", name="regex-rewrite", match=[{"uri": {"prefix": "/rw/"}}],
                 rewrite={"uriRegexRewrite": {"match": "^/rw/([^/]+)/(.*)$", "rewrite": r"/\2/by-\1"}}),
        route_to("web", name="regex-match", match=[{"uri": {"regex": "/items/[0-9]+"}}], rewrite={"uri": "/item"}),
        route_to("web", name="cors-ignore", match=[{"uri": {"prefix": "/cors-ignore"}}],
                 corsPolicy={"allowOrigins": [{"exact": "https://a.example"}], "allowMethods": ["*"],
                             "allowHeaders": ["*"], "unmatchedPreflights": "IGNORE"}),
        route_to("web", name="cors", match=[{"uri": {"prefix": "/cors"}}], corsPolicy=cors),
        route_to("web", name="default"),
    ]


def _reviews_routes() -> list:
    """Headers on the route and on each weighted destination (Istio's reference example, extended)."""
    return [{
        "headers": {"request": {"set": {"x-route": "yes"}, "add": {"x-order": "route"}},
                    "response": {"set": {"x-resp-route": "yes"}}},
        "route": [
            {"destination": {"host": "reviews", "subset": "v1"}, "weight": 50,
             "headers": {"request": {"set": {"x-dest": "v1", "x-order": "destination"}},
                         "response": {"add": {"x-resp-dest": "v1"}, "remove": ["content-type"]}}},
            {"destination": {"host": "reviews", "subset": "v2"}, "weight": 50,
             "headers": {"request": {"set": {"x-dest": "v2", "host": "reviews-v2.internal"}},
                         "response": {"remove": ["x-resp-route"]}}},
        ]}]


def _config(directory, backends, ratings_routes=None):
    """Write the module's config (``ratings_routes`` in place of :func:`_ratings_routes`) into ``directory``."""
    return write_config(directory, *_resources(backends, ratings_routes or _ratings_routes()))


def _resources(backends, ratings_routes) -> list:
    return [
        service_entry("ratings", [endpoint(backends["ratings"])]),
        service_entry("web", [endpoint(backends["web"])]),
        service_entry("reviews", [endpoint(backends[V1], version="v1"), endpoint(backends[V2], version="v2")]),
        destination_rule("reviews", "reviews", subsets=[{"name": "v1", "labels": {"version": "v1"}},
                                                        {"name": "v2", "labels": {"version": "v2"}}]),
        virtual_service("ratings", ["ratings"], ratings_routes),
        virtual_service("web", ["web"], _web_routes()),
        virtual_service("reviews", ["reviews"], _reviews_routes()),
        # nothing listens at the endpoint: the router's 503 still gets the route's response headers and CORS
        service_entry("gone", [endpoint(("127.0.0.1", backends["gone"]))]),
        virtual_service("gone", ["gone"], [route_to("gone", corsPolicy={"allowOrigins": [{"exact": "https://a.example"}]},
                                                    headers={"response": {"set": {"x-route": "yes"}}})]),
    ]


@dataclass
class Mesh:
    proxy: object
    log: Path  # the proxy's access log
    config: Path  # its config directory
    backends: dict


@pytest.fixture(scope="module")
def mesh(backend_factory, proxy_factory, tmp_path_factory) -> Mesh:
    backends = {name: backend_factory(name) for name in ("ratings", "web", V1, V2)}
    backends["gone"] = free_port()  # a port nothing listens on
    config = _config(tmp_path_factory.mktemp("route-actions-config"), backends)
    log = tmp_path_factory.mktemp("route-actions-log") / "access.log"
    return Mesh(proxy_factory(config, "client", extra_args=["--access-log", log]), log, config, backends)


def _logged(log, request_id: str) -> dict:
    """The access-log entry of ``request_id``, once written."""
    return wait_for(lambda: next((entry for entry in access_log(log) if entry["request_id"] == request_id), None),
                    10, what=f"the access-log line of {request_id}")


def _request(proxy, host, path="/", **kwargs):
    request_id = str(uuid.uuid4())
    headers = {"x-request-id": request_id, **kwargs.pop("headers", {})}
    return proxy.curl(host, path, headers=headers, **kwargs), request_id


# -- fault injection -----------------------------------------------------------------------------------------

def test_delay_for_jason_only(mesh):
    """Istio's task: jason's requests to ratings wait the fixed delay, everyone else's do not."""
    proxy, log = mesh.proxy, mesh.log
    delayed, delayed_id = _request(proxy, "ratings", headers={"end-user": "jason"})
    assert delayed.status == 200 and delayed.headers["x-demo-service"] == "ratings", delayed
    assert delayed.info["time_total"] >= DELAY, delayed.info
    assert _logged(log, delayed_id)["response_flags"] == "DI"
    plain, plain_id = _request(proxy, "ratings", headers={"end-user": "mary"})
    assert plain.status == 200 and _logged(log, plain_id)["response_flags"] == "-"
    metrics = scrape(proxy.metrics_port, "/stats/prometheus").decode()
    assert re.search(r'istio_requests_total\{[^}]*response_flags="DI"[^}]*\} [1-9]', metrics), metrics[-3000:]


def test_the_route_timeout_starts_after_the_delay(mesh):
    """As in Envoy (the router's timer starts when the fault filter lets the request go): a 400 ms delay
    does not trip a 200 ms route timeout."""
    proxy = mesh.proxy
    result, _ = _request(proxy, "ratings", headers={"x-fault": "timeout"})
    assert result.status == 200 and result.info["time_total"] >= 0.4, result


def test_abort(mesh):
    proxy, log = mesh.proxy, mesh.log
    result, request_id = _request(proxy, "ratings", headers={"x-fault": "abort"})
    assert (result.status, result.headers.get("x-mesh-flags")) == (500, "FI"), result
    assert "x-demo-service" not in result.headers
    assert result.body.startswith(b"fault filter abort")
    entry = _logged(log, request_id)
    assert (entry["response_flags"], entry["response_code_details"]) == ("FI", "fault_filter_abort")


def test_abort_of_half_the_requests(mesh):
    proxy = mesh.proxy
    requests = 400
    lines = curl_many(proxy.outbound_url + "/", requests, host="ratings", headers={"x-fault": "half"},
                      write_out="%{http_code} %header{x-mesh-flags}")
    aborted = lines.count("503 FI")
    assert aborted + lines.count("200 ") == requests, set(lines)
    # five standard deviations of the binomial (20 requests): a false alarm once in millions of runs
    assert abs(aborted - requests / 2) <= 5 * math.sqrt(requests * 0.25), aborted


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2c"])
def test_grpc_status_abort(mesh, http2):
    """A gRPC request gets the status in a Trailers-Only reply; any other request gets HTTP 200, as from
    Envoy."""
    proxy, log = mesh.proxy, mesh.log
    extra = ["--http2-prior-knowledge"] if http2 else []
    grpc, request_id = _request(proxy, "ratings", headers={"x-fault": "grpc", "content-type": "application/grpc"},
                                data=b"\0\0\0\0\0", extra_args=extra)
    assert (grpc.status, grpc.headers.get("grpc-status")) == (200, "14"), grpc
    assert grpc.headers["grpc-message"].startswith("fault filter abort") and grpc.body == b""
    assert _logged(log, request_id)["response_flags"] == "FI"
    plain, _ = _request(proxy, "ratings", headers={"x-fault": "grpc"}, extra_args=extra)
    assert plain.status == 200 and plain.body.startswith(b"fault filter abort"), plain
    assert "grpc-status" not in plain.headers and "x-demo-service" not in plain.headers


def test_a_client_that_leaves_during_the_delay_is_never_forwarded(mesh):
    """The client gives up (over HTTP/2: an HTTP/1.1 client's FIN is a half-close, which still gets its
    answer); the delay ends with the exchange, and the request never reaches the app."""
    proxy, log = mesh.proxy, mesh.log
    path = f"/left-{uuid.uuid4().hex}"
    started = time.monotonic()
    result, request_id = _request(proxy, "ratings", path, headers={"x-fault": "long"}, timeout=0.3,
                                  extra_args=["--http2-prior-knowledge"])
    assert result.status == 0, result
    entry = _logged(log, request_id)
    assert entry["response_flags"] == "DI,DC" and entry["duration"] < 1000, entry
    # the cancelled delay would have forwarded the request 1 s after it came: check past that point
    time.sleep(max(0.0, started + 1.5 - time.monotonic()))
    assert path not in mesh.backends["ratings"].log_path.read_text(), "the request reached the app after the delay"


# -- redirect and direct response ------------------------------------------------------------------------

@pytest.mark.parametrize("path, host, status, location", [
    ("/r/uri?x=1", "web", 301, "http://web/new?x=1"),
    ("/r/authority", "web:8080", 302, "http://new.example.com/r/authority"),
    ("/r/port", "web:9080", 301, "http://web:8443/r/port"),
    ("/r/derive", "web:9080", 307, "http://web:9080/r/derive"),
    ("/r/derive", "web", 307, "http://web/r/derive"),
    ("/r/scheme", "web:80", 308, "https://web/r/scheme"),
    ("/r/query?page=1", "web", 303, "http://web/q?page=2"),
])
def test_redirect(mesh, path, host, status, location):
    proxy, log = mesh.proxy, mesh.log
    result, request_id = _request(proxy, host, path)
    assert (result.status, result.headers.get("location")) == (status, location), result
    assert result.body == b"" and "content-type" not in result.headers and "x-demo-service" not in result.headers
    assert _logged(log, request_id)["response_code_details"] == "direct_response"


def test_a_redirect_gets_the_routes_response_headers(mesh):
    proxy = mesh.proxy
    result, _ = _request(proxy, "web", "/r/uri")
    assert result.headers.get("x-redirected") == "yes", result


@pytest.mark.parametrize("path, status, body, content_type, location", [
    ("/d/text", 503, b"down for maintenance", "text/plain", None),
    ("/d/bytes", 200, b"hello bytes", "text/plain", None),
    ("/d/created?id=7", 201, b"", None, "http://web/d/created?id=7"),  # Envoy points a 201 or 3xx at the URL
])
def test_direct_response(mesh, path, status, body, content_type, location):
    proxy = mesh.proxy
    result, _ = _request(proxy, "web", path)
    assert (result.status, result.body, result.headers.get("content-type"), result.headers.get("location")) == \
        (status, body, content_type, location), result
    assert "x-demo-service" not in result.headers and "x-mesh-flags" not in result.headers


# -- rewrite and headers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, forwarded", [
    ("/rw/alice/items?q=1", "/items/by-alice?q=1"),   # uriRegexRewrite: groups, query kept
    ("/items/42?x=1", "/item?x=1"),                   # rewrite.uri on a regex match: the whole path
])
def test_rewrite(mesh, path, forwarded):
    proxy = mesh.proxy
    result, _ = _request(proxy, "web", path)
    assert result.status == 200 and result.json()["path"] == forwarded, result


def test_headers_on_the_route_and_on_each_destination(mesh):
    proxy = mesh.proxy
    seen = {}
    for _ in range(40):
        result, _ = _request(proxy, "reviews")
        assert result.status == 200, result
        seen[result.headers["x-demo-service"]] = result
        if len(seen) == 2:
            break
    v1, v2 = seen[V1], seen[V2]
    sent_v1, sent_v2 = v1.json()["headers"], v2.json()["headers"]
    # a weighted destination's operations come first, then the route's: the route's add follows the set
    assert (sent_v1["x-route"], sent_v1["x-dest"], sent_v1["x-order"]) == ("yes", "v1", "destination, route")
    assert (sent_v2["x-dest"], sent_v2["host"], sent_v2["x-order"]) == ("v2", "reviews-v2.internal", "route")
    assert (v1.headers["x-resp-route"], v1.headers["x-resp-dest"]) == ("yes", "v1")
    assert "content-type" not in v1.headers and v2.headers["content-type"] == "application/json"
    assert v2.headers["x-resp-route"] == "yes"  # the destination's removal comes before the route's set


def test_a_lone_destination_joins_the_route_headers(mesh):
    """Istio joins them into one list: the destination's set follows (and replaces) the route's add."""
    proxy = mesh.proxy
    result, _ = _request(proxy, "ratings")
    assert result.json()["headers"]["x-order"] == "destination", result


# -- CORS ---------------------------------------------------------------------------------------------------

def _preflight(proxy, path, origin, **kwargs):
    return _request(proxy, "web", path, method="OPTIONS", headers={
        "origin": origin, "access-control-request-method": "POST", "access-control-request-headers": "x-custom"},
        **kwargs)[0]


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2c"])
def test_cors_preflight_is_answered_by_the_sidecar(mesh, http2):
    proxy = mesh.proxy
    result = _preflight(proxy, "/cors", "https://a.example", extra_args=["--http2-prior-knowledge"] if http2 else [])
    assert result.status == 200 and "x-demo-service" not in result.headers, result
    assert {name: value for name, value in result.headers.items() if name.startswith("access-control-")} == {
        "access-control-allow-origin": "https://a.example", "access-control-allow-credentials": "true",
        "access-control-allow-methods": "GET,POST", "access-control-allow-headers": "x-custom",
        "access-control-max-age": "86400", "access-control-expose-headers": "x-exposed"}
    assert result.body == b"" and "content-type" not in result.headers


def test_a_preflight_from_another_origin_goes_to_the_app(mesh):
    proxy = mesh.proxy
    result = _preflight(proxy, "/cors", "https://evil.example")
    assert result.headers.get("x-demo-service") == "web" and result.json()["method"] == "OPTIONS", result
    assert not any(name.startswith("access-control-") for name in result.headers)


def test_unmatched_preflights_ignore(mesh):
    """IGNORE: the sidecar answers the preflight itself, without allowing the origin; ``*`` echoes."""
    proxy = mesh.proxy
    result = _preflight(proxy, "/cors-ignore", "https://evil.example")
    assert result.status == 200 and "x-demo-service" not in result.headers, result
    assert "access-control-allow-origin" not in result.headers
    assert (result.headers["access-control-allow-methods"], result.headers["access-control-allow-headers"]) == \
        ("POST", "x-custom")


def test_cors_simple_requests(mesh):
    proxy = mesh.proxy
    allowed, _ = _request(proxy, "web", "/cors/data", headers={"origin": "https://b.example"})
    assert allowed.headers.get("x-demo-service") == "web", allowed
    assert (allowed.headers.get("access-control-allow-origin"), allowed.headers.get("access-control-allow-credentials"),
            allowed.headers.get("access-control-expose-headers")) == ("https://b.example", "true", "x-exposed")
    for headers in ({}, {"origin": "https://evil.example"}):
        other, _ = _request(proxy, "web", "/cors/data", headers=headers)
        assert other.status == 200 and not any(name.startswith("access-control-") for name in other.headers), other


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_the_routers_own_errors_get_cors_and_the_routes_response_headers(mesh, http2):
    """As Envoy: the router's local replies (here 503 for a dead endpoint) pass the CORS filter and get the
    route's response headers; a fault abort comes before the CORS filter and gets neither."""
    result, _ = _request(mesh.proxy, "gone", "/", headers={"origin": "https://a.example"},
                         extra_args=["--http2-prior-knowledge"] if http2 else [])
    assert result.status == 503, result
    assert (result.headers.get("access-control-allow-origin"), result.headers.get("x-route")) == (
        "https://a.example", "yes"), result
    other, _ = _request(mesh.proxy, "gone", "/", headers={"origin": "https://evil.example"})
    assert other.status == 503 and "access-control-allow-origin" not in other.headers, other
    assert other.headers.get("x-route") == "yes", other


# -- HTTP/2 -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, headers, status, header", [
    ("/r/uri", {}, 301, ("location", "http://web/new")),
    ("/d/text", {}, 503, ("content-type", "text/plain")),
    ("/rw/bob/x", {}, 200, ("x-demo-service", "web")),
    ("/", {"x-fault": "abort"}, 500, ("x-mesh-flags", "FI")),
])
def test_the_same_over_http2(mesh, path, headers, status, header):
    proxy = mesh.proxy
    host = "ratings" if "x-fault" in headers else "web"
    result, _ = _request(proxy, host, path, headers=headers, extra_args=["--http2-prior-knowledge"])
    assert result.info["http_version"] == "2" and result.status == status, result
    assert result.headers.get(header[0]) == header[1], result


# -- bad config ---------------------------------------------------------------------------------------------

def test_a_bad_fault_is_rejected_and_the_old_config_stays(mesh):
    proxy, config = mesh.proxy, mesh.config
    routes = _ratings_routes()
    routes[3]["fault"]["abort"]["percentage"]["value"] = 150
    version = proxy.admin("/config_dump")["version"]
    rejected = proxy.log_path.read_text(errors="replace").count("config rejected")
    _config(config, mesh.backends, routes)
    proxy.reload()
    try:
        wait_for(lambda: proxy.log_path.read_text(errors="replace").count("config rejected") > rejected, 10,
                 what="the rejection in the proxy's log")
        assert re.search(r"config rejected.*mesh\.yaml:\d+: VirtualService/default/ratings: "
                         r"spec\.http\[3\]\.fault\.abort\.percentage\.value: percentage 150 is neither 0 nor in "
                         r"the range \[0\.0001, 100\]", proxy.log_path.read_text(errors="replace")), proxy.log_tail()
        assert proxy.admin("/config_dump")["version"] == version
        assert _request(proxy, "ratings", headers={"x-fault": "abort"})[0].status == 500
    finally:
        _config(config, mesh.backends)
