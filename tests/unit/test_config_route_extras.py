"""Validating and compiling what an http route does besides forwarding: fault, redirect, directResponse,
uriRegexRewrite, corsPolicy and per-destination headers (Istio's rules, each rejection naming its field)."""

from __future__ import annotations

import json
import textwrap

from mesh.config.compile import Workload
from mesh.config.route_extras import FaultInjection, Redirect
from mesh.config.tables import HeaderOps
from tests.unit.test_config_compile import _compile, _route
from tests.unit.test_config_validate import _expected, _valid, _validate, _vs

WEB = "web.shop.svc.cluster.local"
SHOP = textwrap.dedent("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: web, namespace: shop}
    spec:
      hosts: [web]
      location: MESH_INTERNAL
      resolution: STATIC
      ports: [{number: 80, name: http, protocol: HTTP}]
      endpoints: [{address: 10.0.0.1, labels: {version: v1}}, {address: 10.0.0.2, labels: {version: v2}}]
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: web, namespace: shop}
    spec:
      host: web
      subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
    ---
""")


def test_valid_fields(tmp_path):
    [vs] = _valid(tmp_path, _vs("""
        - fault:
            delay: {fixedDelay: 2s, percentage: {value: 12.5}}
            abort: {httpStatus: 503, percentage: {value: 0.0001}}
          route: [{destination: {host: web}}]
        - fault:
            delay: {fixedDelay: 100ms, percent: 30}
            abort: {grpcStatus: UNAVAILABLE}
          route: [{destination: {host: web}}]
        - redirect: {uri: /new, authority: new.example, port: 8080, scheme: https, redirectCode: 308}
        - redirect: {derivePort: FROM_REQUEST_PORT}
        - redirect: {port: 80, uri: /x}
        - directResponse: {status: 503, body: {string: down}}
        - directResponse: {status: 200, body: {bytes: aGVsbG8}}
        """))
    delay_abort, deprecated_percent, redirect, derived, port_80, text, raw = vs.http
    assert delay_abort.fault == FaultInjection(delay=2.0, delay_fraction=0.125, abort_status=503,
                                               abort_fraction=0.000001)
    # Istio still reads the deprecated integer percent of a delay; an abort without percentage aborts nothing
    assert deprecated_percent.fault == FaultInjection(delay=0.1, delay_fraction=0.3, abort_grpc=14,
                                                      without_percentage=("abort",))
    assert redirect.redirect == Redirect(status=308, scheme=b"https", authority=b"new.example", port=8080,
                                         path=b"/new")
    assert redirect.route == ()
    assert derived.redirect == Redirect(port_from_request=True)
    assert port_80.redirect == Redirect(path=b"/x")  # Istio writes no :80 for http
    assert (text.direct_response.status, text.direct_response.body) == (503, b"down")
    assert raw.direct_response.body == b"hello"  # base64, padding optional


def test_fault_rejections(tmp_path):
    _, errors, path = _validate(tmp_path, _vs("""
        - fault: {}
          route: [{destination: {host: web}}]
        - fault:
            delay: {percentage: {value: 150}, exponentialDelay: 1s}
            abort: {httpStatus: 700, grpcStatus: NOPE, percent: 50, http2Error: x}
          route: [{destination: {host: web}}]
        - fault:
            delay: {fixedDelay: 1s, percentage: {value: 0.00001}}
            abort: {grpcStatus: NOT_FOUND, percentage: {value: "50"}}
          route: [{destination: {host: web}}]
        """))
    assert errors == _expected(f"{path}:{{}}: VirtualService/shop/vs: spec.http", [
        (7, "[0].fault: set delay, abort or both"),
        (10, "[1].fault.delay.exponentialDelay: 'exponentialDelay' is not supported by txmesh; Istio does not "
             "support it either; use fixedDelay"),
        (10, "[1].fault.delay.fixedDelay: 'fixedDelay' is required"),
        (10, "[1].fault.delay.percentage.value: percentage 150 is neither 0 nor in the range [0.0001, 100]"),
        (11, "[1].fault.abort.percent: 'percent' is not supported by txmesh; it was removed from Istio's abort; "
             "use percentage: {value: N}"),
        (11, "[1].fault.abort.http2Error: 'http2Error' is not supported by txmesh; Istio does not support it "
             "either; use httpStatus or grpcStatus"),
        (11, "[1].fault.abort: set one of httpStatus or grpcStatus"),
        (11, "[1].fault.abort.httpStatus: must be >= 200 and <= 599, not 700"),
        (11, "[1].fault.abort.grpcStatus: unknown gRPC status 'NOPE'; use one of OK, CANCELLED, UNKNOWN, "
             "INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, RESOURCE_EXHAUSTED, "
             "FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS, "
             "UNAUTHENTICATED"),
        (14, "[2].fault.delay.percentage.value: percentage 1e-05 is neither 0 nor in the range [0.0001, 100]"),
        (15, "[2].fault.abort.percentage.value: must be a number from 0 to 100, not '50'"),
    ])


def test_redirect_and_direct_response_rejections(tmp_path):
    _, errors, path = _validate(tmp_path, _vs("""
        - redirect: {}
        - redirect: {port: 8080, derivePort: FROM_REQUEST_PORT, redirectCode: 305, scheme: ftp, uri: "/a b"}
          route: [{destination: {host: web}}]
          fault: {abort: {httpStatus: 500}}
          rewrite: {uri: /x}
          directResponse: {status: 200}
        - directResponse: {}
        - directResponse: {status: 100, body: {}}
        - directResponse: {status: 200, body: {bytes: "not base64!"}}
        - timeout: 1s
        """))
    assert errors == _expected(f"{path}:{{}}: VirtualService/shop/vs: spec.http", [
        (7, "[0].redirect: set at least one of uri, authority, scheme, port or derivePort"),
        (8, "[1].redirect.derivePort: set only one of port or derivePort"),
        (8, "[1].redirect.scheme: invalid scheme 'ftp'; use one of: http, https"),
        (8, "[1].redirect.redirectCode: redirect code 305 is not one Envoy can send; use 301 (the default), "
            "302, 303, 307 or 308"),
        (8, "[1].redirect.uri: '/a b' is not a usable path: use ASCII without spaces or control characters "
            "(percent-encode the others)"),
        (9, "[1].route: a route with redirect answers locally, without forwarding: remove route (Istio rejects "
            "them together)"),
        (10, "[1].fault: a route with redirect answers locally, without forwarding: remove fault (Istio rejects "
             "them together)"),
        (11, "[1].rewrite: a route with redirect answers locally, without forwarding: remove rewrite (Istio "
             "rejects them together)"),
        (12, "[1].directResponse: set only one of redirect or directResponse"),
        (13, "[2].directResponse.status: 'status' is required"),
        (14, "[3].directResponse.status: must be >= 200 and <= 599, not 100"),
        (14, "[3].directResponse.body: set one of string or bytes"),
        (15, "[4].directResponse.body.bytes: must be base64 (how Istio's YAML writes bytes); use string for "
             "text"),
        (16, "[5].route: 'route' is required: the destinations of the requests (or answer them here with "
             "redirect or directResponse)"),
    ])


def test_rewrite_cors_and_destination_header_rejections(tmp_path):
    _, errors, path = _validate(tmp_path, _vs("""
        - rewrite: {uri: /x, uriRegexRewrite: {match: "(a", rewrite: x}}
          route: [{destination: {host: web}}]
        - rewrite: {uriRegexRewrite: {match: "(a)", rewrite: '\\2'}}
          route: [{destination: {host: web}}]
        - corsPolicy:
            allowOrigins: [{}, {exact: ""}, {regex: "(?=x)"}]
            allowOrigin: [a]
            allowMethods: [FETCH]
            allowHeaders: ["bad header"]
            maxAge: 1500ms
            unmatchedPreflights: BOGUS
          route: [{destination: {host: web}}]
        - route:
          - destination: {host: web, subset: a}
            weight: 50
            headers: {request: {set: {":path": x}}, response: {set: {host: b}}}
          - destination: {host: web, subset: b}
            weight: 50
        """))
    assert errors == _expected(f"{path}:{{}}: VirtualService/shop/vs: spec.http", [
        (7, "[0].rewrite.uriRegexRewrite.match: invalid regex: missing ): (a; Istio uses RE2 syntax "
            "(https://github.com/google/re2/wiki/Syntax)"),
        (7, "[0].rewrite.uriRegexRewrite: set only one of uri or uriRegexRewrite"),
        (9, "[1].rewrite.uriRegexRewrite.rewrite: the rewrite uses group \\2, but the match regex has only 1 "
            "parenthesized group(s)"),
        (12, "[2].corsPolicy.allowOrigins[0]: set exactly one of exact, prefix or regex"),
        (12, "[2].corsPolicy.allowOrigins[1]: an empty match allows no origin; set exact, prefix or regex to a "
             "value"),
        (12, "[2].corsPolicy.allowOrigins[2].regex: invalid regex: invalid perl operator: (?=; Istio uses RE2 "
             "syntax (https://github.com/google/re2/wiki/Syntax)"),
        (13, "[2].corsPolicy.allowOrigin: set only allowOrigins: allowOrigin is deprecated, and Istio ignores it "
             "when allowOrigins is set"),
        (14, "[2].corsPolicy.allowMethods[0]: 'FETCH' is not a supported HTTP method; use GET, HEAD, POST, PUT, "
             "PATCH, DELETE, CONNECT, OPTIONS, TRACE, *"),
        (15, "[2].corsPolicy.allowHeaders[0]: invalid header name 'bad header': use letters, digits, '-' and "
             "'_', or *"),
        (16, "[2].corsPolicy.maxAge: maxAge is accurate only to seconds (as in Istio); use whole seconds, like "
             "86400s or 24h"),
        (17, "[2].corsPolicy.unmatchedPreflights: invalid unmatchedPreflights 'BOGUS'; use one of: UNSPECIFIED, "
             "FORWARD, IGNORE"),
        (22, "[3].route[0].headers.request.set[\":path\"]: the Host header and pseudo-headers cannot be changed "
             "here"),
        (22, "[3].route[0].headers.response.set.host: the Host header and pseudo-headers cannot be changed here"),
    ])


def _shop(tmp_path, http):
    """The config a client in namespace shop gets from SHOP and a VirtualService with ``http``."""
    return _compile(tmp_path, SHOP + _vs(http), workload=Workload("client", "shop"))


def test_plain_routes_have_no_extras(tmp_path):
    config = _shop(tmp_path, """
        - match: [{uri: {prefix: /a}}]
          rewrite: {uri: /b}
          headers: {request: {set: {x-a: "1"}}}
          route: [{destination: {host: web}}]
        - match: [{uri: {regex: "/c/[0-9]+"}}]
          rewrite: {authority: other}
          route: [{destination: {host: web}}]
        """)
    assert _route(config, WEB, "/a").extras is None
    assert _route(config, WEB, "/c/1").extras is None


def test_a_lone_destination_joins_the_routes_headers(tmp_path):
    config = _shop(tmp_path, """
        - headers:
            request: {add: {x-a: route}}
            response: {set: {x-r: route}}
          route:
          - destination: {host: web}
            headers:
              request: {set: {x-a: dest, host: dest.example}}
              response: {remove: [x-r]}
        """)
    action = _route(config, WEB)
    assert action.extras is None  # merged once, at config time
    # one parser: the removal first, then the route's set; the destination's set replaces the route's add
    assert action.request_headers == HeaderOps(add=((b"x-a", b"dest"),), remove=(b"x-a",))
    assert action.response_headers == HeaderOps(add=((b"x-r", b"route"),), remove=(b"x-r",))
    assert action.rewrite_authority == b"dest.example"


def test_weighted_destinations_get_their_own_actions(tmp_path):
    config = _shop(tmp_path, """
        - headers: {request: {set: {x-a: route}}}
          route:
          - destination: {host: web, subset: v1}
            weight: 50
            headers: {request: {add: {x-a: dest, x-v: v1}}}
          - destination: {host: web, subset: v2}
            weight: 50
        """)
    action = _route(config, WEB)
    v1 = action.extras.by_cluster[f"outbound|80|v1|{WEB}"]
    # the destination's parser first, then the route's: the route's set replaces the destination's add
    assert v1.request_headers == HeaderOps(add=((b"x-v", b"v1"), (b"x-a", b"route")), remove=(b"x-a",))
    assert list(action.extras.by_cluster) == [f"outbound|80|v1|{WEB}"]
    json.dumps(config.dump)


def test_regex_match_with_rewrite_uri_replaces_the_whole_path(tmp_path):
    config = _shop(tmp_path, """
        - match: [{uri: {regex: "/items/[0-9]+"}}, {uri: {prefix: /old/}}]
          rewrite: {uri: /item}
          route: [{destination: {host: web}}]
        """)
    by_regex, by_prefix = _route(config, WEB, "/items/42"), _route(config, WEB, "/old/x")
    assert (by_regex.rewrite_prefix, by_regex.extras.whole_path) == (None, b"/item")
    assert (by_prefix.rewrite_prefix, by_prefix.rewrite_strip, by_prefix.extras) == (b"/item", 5, None)


def test_a_fault_without_percentage_is_warned_about(tmp_path):
    config = _shop(tmp_path, """
        - fault: {abort: {httpStatus: 503}}
          route: [{destination: {host: web}}]
        """)
    [warning] = config.warnings
    assert str(warning).endswith("VirtualService/shop/vs: spec.http[0].fault.abort: fault.abort has no "
                                 "percentage, so it applies to no request (as in Istio and Envoy); set "
                                 "percentage: {value: 100} to abort every request")


def test_redirects_have_no_cluster_and_show_in_the_dump(tmp_path):
    config = _shop(tmp_path, """
        - redirect: {uri: /new}
          corsPolicy: {allowOrigins: [{exact: "https://a.example"}], maxAge: 1h}
        """)
    action = _route(config, WEB)
    assert action.clusters == () and action.pick_cluster() is None
    [vhost] = [vhost for vhost in config.dump["routes"] if vhost["name"] == "VirtualService/shop/vs"]
    described = vhost["routes"][0]["action"]
    assert described["redirect"]["path"] == "/new" and described["cors"]["max_age"] == "3600"
    assert described["cors"]["allow_origins"] == ["exact 'https://a.example'"]
