"""The builtin.tracing plugin: sampling decisions, spans, ctx.extra, and the forwarded-header merge."""

from __future__ import annotations

import re

import pytest

from mesh.config.compile import Workload
from mesh.plugins import MeshPluginManager
from mesh.proxy.context import RequestContext
from mesh.proxy.exchange import _set_headers
from mesh.proxy.outcome import RequestOutcome
from mesh.telemetry.tracing import Tracer, _span_name

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
WORKLOAD = Workload("user-service", "demo", labels={"app": "users", "version": "v1"})


def _ctx(headers=None, direction="outbound", **kw):
    ctx = RequestContext.for_test(path="/u/1?x=2", host="user-service", headers=headers, **kw)
    ctx.direction = direction
    ctx.start = 1700000000.25
    return ctx


def _complete(tracer, ctx, status=200, duration=0.0123):
    ctx.response_code = status
    tracer.mesh_request_complete(ctx=ctx, outcome=RequestOutcome(status, ctx.response_flags, False, duration))
    return ctx.extra.get("span")


class _Sink:
    def __init__(self):
        self.spans = []

    def add(self, span):
        self.spans.append(span)

    def describe(self):
        return {"queued": len(self.spans)}


# -- sampling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers, rate, expected", [
    ({"traceparent": f"00-{TRACE}-{PARENT}-01"}, 0.0, True),      # the caller's 1 wins over 0 %
    ({"traceparent": f"00-{TRACE}-{PARENT}-00"}, 100.0, False),   # the caller's 0 wins over 100 %
    ({"b3": f"{TRACE}-{PARENT}-1"}, 0.0, True),
    ({"b3": "0"}, 100.0, False),
    ({"x-b3-traceid": TRACE, "x-b3-spanid": PARENT, "x-b3-sampled": "0"}, 100.0, False),
    ({"x-b3-traceid": TRACE, "x-b3-spanid": PARENT, "x-b3-flags": "1"}, 0.0, True),
    ({"b3": f"{TRACE}-{PARENT}"}, 100.0, True),                    # no decision: ours
    ({"b3": f"{TRACE}-{PARENT}"}, 0.0, False),
    ({}, 100.0, True),
    ({}, 0.0, False),
])
def test_sampling_decision(headers, rate, expected):
    tracer = Tracer(WORKLOAD, "10.0.0.5", sampling=rate)
    ctx = _ctx(headers)
    tracer.mesh_request_headers(ctx=ctx)
    assert ctx.extra["trace"].sampled is expected
    assert (_complete(tracer, ctx) is not None) is expected


def test_sampling_rate_is_a_percentage():
    tracer = Tracer(WORKLOAD, "10.0.0.5", sampling=25.0)
    sampled = 0
    for _ in range(4000):
        ctx = _ctx()
        tracer.mesh_request_headers(ctx=ctx)
        sampled += ctx.extra["trace"].sampled
    assert 800 < sampled < 1200


# -- context and headers --------------------------------------------------------------------------------
def test_new_trace_when_none_came_in_forwards_w3c_with_our_span_as_parent():
    tracer = Tracer(WORKLOAD, "10.0.0.5", sampling=100)
    ctx = _ctx()
    pairs = tracer.mesh_request_headers(ctx=ctx)
    hop = ctx.extra["trace"]
    assert re.fullmatch(r"[0-9a-f]{32}", hop.trace_id) and re.fullmatch(r"[0-9a-f]{16}", hop.span_id)
    assert hop.parent_id is None
    assert ctx.extra["trace_id"] == hop.trace_id
    assert pairs == [(b"traceparent", f"00-{hop.trace_id}-{hop.span_id}-01".encode())]


def test_incoming_context_is_continued():
    tracer = Tracer(WORKLOAD, "10.0.0.5", sampling=0)
    ctx = _ctx({"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "a=1"})
    pairs = dict(tracer.mesh_request_headers(ctx=ctx))
    hop = ctx.extra["trace"]
    assert (hop.trace_id, hop.parent_id) == (TRACE, PARENT) and hop.span_id != PARENT
    assert pairs == {b"traceparent": f"00-{TRACE}-{hop.span_id}-01".encode()}


def test_set_headers_replaces_same_named_headers_and_removes_none():
    ctx = _ctx({"traceparent": "00-old", "tracestate": "a=1", "x-b3-parentspanid": PARENT, "accept": "*/*"})
    extra = _set_headers(ctx, [[(b"traceparent", b"00-new"), (b"x-b3-parentspanid", None)]],
                         ((b"x-forwarded-client-cert", b"By=..."),))
    assert ctx.raw_headers == [(b"tracestate", b"a=1"), (b"accept", b"*/*")]
    assert extra == ((b"x-forwarded-client-cert", b"By=..."), (b"traceparent", b"00-new"))
    assert _set_headers(ctx, [], ()) == ()


def test_hook_is_declared_and_collects_results():
    pm = MeshPluginManager()
    pm.register(Tracer(WORKLOAD, "10.0.0.5", sampling=100), name="builtin.tracing")
    results = pm.hook.mesh_request_headers(ctx=_ctx())
    assert len(results) == 1 and results[0][0][0] == b"traceparent"


# -- spans ---------------------------------------------------------------------------------------------
def test_client_span_fields():
    sink = _Sink()
    tracer = Tracer(WORKLOAD, "10.0.0.5", sampling=100, exporter=sink)
    ctx = _ctx({"traceparent": f"00-{TRACE}-{PARENT}-01", "user-agent": "curl/8"})
    ctx.cluster = "outbound|80||payment.demo.svc.cluster.local"
    ctx.upstream_host = "127.0.0.7:15006"
    tracer.mesh_request_headers(ctx=ctx)
    span = _complete(tracer, ctx, status=200)
    assert sink.spans == [span]
    z = span.to_zipkin()
    assert z["traceId"] == TRACE and z["parentId"] == PARENT and z["id"] == ctx.extra["trace"].span_id
    assert z["kind"] == "CLIENT" and z["name"] == "payment.demo.svc.cluster.local:80/*"
    assert z["timestamp"] == 1700000000250000 and z["duration"] == 12300
    assert z["localEndpoint"] == {"serviceName": "user-service.demo"}
    assert z["remoteEndpoint"] == {"ipv4": "127.0.0.7", "port": 15006}
    tags = z["tags"]
    assert tags["http.method"] == "GET" and tags["http.url"] == "/u/1" and tags["http.status_code"] == "200"
    assert tags["upstream_cluster"] == ctx.cluster and tags["response_flags"] == "-"
    assert tags["guid:x-request-id"] == "test" and tags["user_agent"] == "curl/8"
    assert tags["node_id"] == "sidecar~10.0.0.5~user-service.demo~demo.svc.cluster.local"
    assert tags["istio.canonical_service"] == "users" and tags["istio.namespace"] == "demo"
    assert "error" not in tags
    assert all(isinstance(value, str) for value in tags.values())


def test_server_span_and_error_tag():
    tracer = Tracer(WORKLOAD, "10.0.0.5", sampling=100)
    ctx = _ctx({"b3": f"{TRACE}-{PARENT}-1"}, direction="inbound", authority=b"user-service:80",
               peer="spiffe://cluster.local/ns/frontend/sa/frontend")
    ctx.cluster = "inbound|8080||"
    ctx.add_flag("UF")
    tracer.mesh_request_headers(ctx=ctx)
    z = _complete(tracer, ctx, status=503).to_zipkin()
    assert z["kind"] == "SERVER" and z["name"] == "user-service:80/*" and z["parentId"] == PARENT
    assert z["remoteEndpoint"] == {"ipv4": "127.0.0.1"}
    assert z["tags"]["error"] == "true" and z["tags"]["response_flags"] == "UF"
    assert z["tags"]["peer.principal"] == "spiffe://cluster.local/ns/frontend/sa/frontend"


def test_request_answered_before_routing_still_gets_a_span():
    tracer = Tracer(WORKLOAD, "10.0.0.5", sampling=100)
    ctx = _ctx({"traceparent": f"00-{TRACE}-{PARENT}-01"})
    ctx.add_flag("NR")
    span = _complete(tracer, ctx, status=404)
    assert ctx.extra["trace_id"] == TRACE
    z = span.to_zipkin()
    assert z["parentId"] == PARENT and z["name"] == "user-service:80/*" and "remoteEndpoint" not in z


def test_root_span_has_no_parent_id():
    tracer = Tracer(WORKLOAD, "10.0.0.5", sampling=100)
    ctx = _ctx()
    tracer.mesh_request_headers(ctx=ctx)
    assert "parentId" not in _complete(tracer, ctx).to_zipkin()


def test_span_names():
    assert _span_name("outbound|8080|v2|reviews.shop.svc.cluster.local", "reviews", b"reviews") == \
        "reviews.shop.svc.cluster.local:8080/*"
    assert _span_name("inbound|8080||", "reviews", b"reviews:9080") == "reviews:9080/*"
    assert _span_name(None, "reviews", b"reviews") == "reviews:80/*"
