"""Distributed tracing through real sidecars, exported to a real (tiny) Zipkin receiver.

The call chain: curl (the frontend app) -> frontend sidecar (outbound) -> user-service sidecar (inbound)
-> user-service app (tests/apps/forwarder.py) -> user-service sidecar (outbound) -> payment sidecar
(inbound) -> payment app (the demo app, which echoes the headers it got).  Every sidecar samples 100 %
and posts to the :class:`Collector`.  Four spans per request, parented in a chain:

    frontend CLIENT -> user-service SERVER -> user-service CLIENT -> payment SERVER
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.harness import free_port, wait_for
from tests.integration.test_proxy_support import (
    curl_many,
    endpoint,
    service_entry,
    write_config,
)
from tests.integration.test_tracing_support import Collector, ForwarderApp, HangingServer

USERS = "user-service.demo.svc.cluster.local"
PAYMENT = "payment.demo.svc.cluster.local"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def zipkin():
    collector = Collector().start()
    yield collector
    collector.stop()


@pytest.fixture(scope="module")
def mesh(backend_factory, proxy_factory, tmp_path_factory, process_log_dir, zipkin):
    users_inbound, users_outbound, payment_inbound = free_port(), free_port(), free_port()
    config = write_config(
        tmp_path_factory.mktemp("tracing-config"),
        service_entry("user-service", [endpoint(("127.0.0.1", users_inbound))], namespace="demo", hosts=[USERS]),
        service_entry("payment", [endpoint(("127.0.0.1", payment_inbound))], namespace="demo", hosts=[PAYMENT]),
    )
    tracing = ["--zipkin-url", zipkin.url("/api/v2/spans"), "--trace-sampling", "100"]
    payment_app = backend_factory("payment")
    users_app = ForwarderApp("user-service", users_outbound, PAYMENT, log_dir=process_log_dir).start()
    sidecars = {
        "payment": proxy_factory(config, "payment", namespace="demo", app_port=payment_app.port,
                                 inbound_port=payment_inbound, extra_args=tracing),
        "user-service": proxy_factory(config, "user-service", namespace="demo", app_port=users_app.port,
                                      inbound_port=users_inbound, outbound_port=users_outbound,
                                      extra_args=tracing),
        "frontend": proxy_factory(config, "frontend", namespace="frontend", extra_args=tracing),
    }
    yield sidecars
    users_app.stop()


def _call(mesh, headers=None):
    """One request through the chain, with a fresh x-request-id; returns (request id, the forwarder's JSON)."""
    request_id = str(uuid.uuid4())
    result = mesh["frontend"].curl(USERS, "/pay?amount=3", headers={"x-request-id": request_id, **(headers or {})})
    assert result.status == 200, result
    return request_id, result.json()


def _spans_of(zipkin, request_id, count, timeout=10.0) -> dict:
    """Wait for ``count`` spans tagged with ``request_id``; return them by (service, kind)."""
    def found():
        spans = [s for s in zipkin.zipkin_spans() if s["tags"].get("guid:x-request-id") == request_id]
        return spans if len(spans) >= count else None

    spans = wait_for(found, timeout, interval=0.1, what=f"{count} spans of request {request_id}")
    assert len(spans) == count, spans
    return {(s["localEndpoint"]["serviceName"], s["kind"]): s for s in spans}


def _traceparent(headers) -> tuple:
    version, trace_id, parent_id, flags = headers["traceparent"].split("-")
    return trace_id, parent_id, flags


def test_one_trace_with_four_chained_spans(mesh, zipkin):
    request_id, body = _call(mesh)
    spans = _spans_of(zipkin, request_id, 4)
    client = spans[("frontend.frontend", "CLIENT")]
    users_server = spans[("user-service.demo", "SERVER")]
    users_client = spans[("user-service.demo", "CLIENT")]
    payment_server = spans[("payment.demo", "SERVER")]
    assert len({s["traceId"] for s in spans.values()}) == 1
    assert len(client["traceId"]) == 32 and "parentId" not in client  # the trace started at the frontend
    assert users_server["parentId"] == client["id"]
    assert users_client["parentId"] == users_server["id"]
    assert payment_server["parentId"] == users_client["id"]
    # the apps see the context, with the span of their own sidecar's inbound hop as the parent
    assert _traceparent(body["received"]) == (client["traceId"], users_server["id"], "01")
    assert _traceparent(body["upstream"]["headers"]) == (client["traceId"], payment_server["id"], "01")


def test_span_contents(mesh, zipkin):
    request_id, _ = _call(mesh)
    spans = _spans_of(zipkin, request_id, 4)
    client = spans[("frontend.frontend", "CLIENT")]
    assert client["name"] == f"{USERS}:80/*"
    assert client["tags"]["upstream_cluster"] == f"outbound|80||{USERS}"
    assert client["tags"]["http.url"] == "/pay" and client["tags"]["http.method"] == "GET"
    assert client["tags"]["http.status_code"] == "200" and client["tags"]["response_flags"] == "-"
    assert client["remoteEndpoint"]["ipv4"] == "127.0.0.1" and client["remoteEndpoint"]["port"] > 0
    server = spans[("payment.demo", "SERVER")]
    assert server["tags"]["upstream_cluster"].startswith("inbound|")
    assert server["tags"]["node_id"].startswith("sidecar~") and server["tags"]["istio.namespace"] == "demo"
    for span in spans.values():
        assert span["duration"] > 0 and abs(span["timestamp"] / 1e6 - time.time()) < 60
        assert "error" not in span["tags"]
    # the client span encloses the whole chain
    assert client["duration"] >= spans[("payment.demo", "SERVER")]["duration"]


def test_incoming_w3c_context_is_continued_and_tracestate_kept(mesh, zipkin):
    request_id, body = _call(mesh, {"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "congo=t61rcWkgMzE"})
    spans = _spans_of(zipkin, request_id, 4)
    assert {s["traceId"] for s in spans.values()} == {TRACE}
    assert spans[("frontend.frontend", "CLIENT")]["parentId"] == PARENT
    assert body["upstream"]["headers"]["tracestate"] == "congo=t61rcWkgMzE"
    assert "b3" not in body["received"] and "x-b3-traceid" not in body["received"]


def test_b3_multi_headers_are_continued_and_rewritten(mesh, zipkin):
    trace = "463ac35c9f6413ad"
    request_id, body = _call(mesh, {"x-b3-traceid": trace, "x-b3-spanid": PARENT, "x-b3-sampled": "1"})
    spans = _spans_of(zipkin, request_id, 4)
    assert {s["traceId"] for s in spans.values()} == {trace}
    assert spans[("frontend.frontend", "CLIENT")]["parentId"] == PARENT
    received = body["received"]
    assert received["x-b3-traceid"] == trace
    assert received["x-b3-spanid"] == spans[("user-service.demo", "SERVER")]["id"]
    assert received["x-b3-parentspanid"] == spans[("frontend.frontend", "CLIENT")]["id"]
    assert received["x-b3-sampled"] == "1"
    assert "traceparent" not in received  # the format that came in, not another one


def test_b3_single_header_is_continued(mesh, zipkin):
    request_id, body = _call(mesh, {"b3": f"{TRACE}-{PARENT}-1"})
    spans = _spans_of(zipkin, request_id, 4)
    assert {s["traceId"] for s in spans.values()} == {TRACE}
    payment_server = spans[("payment.demo", "SERVER")]
    assert body["upstream"]["headers"]["b3"] == \
        f"{TRACE}-{payment_server['id']}-1-{spans[('user-service.demo', 'CLIENT')]['id']}"


def test_not_sampled_by_the_caller_exports_nothing_but_propagates(mesh, zipkin):
    request_id, body = _call(mesh, {"traceparent": f"00-{TRACE}-{PARENT}-00"})
    trace_id, parent_id, flags = _traceparent(body["upstream"]["headers"])
    assert (trace_id, flags) == (TRACE, "00") and parent_id != PARENT
    sampled_id, _ = _call(mesh)  # a sampled request sent after it
    _spans_of(zipkin, sampled_id, 4)  # once its spans are in, every sidecar has flushed past the first one
    time.sleep(1.2)  # and one more flush interval, to be sure
    assert [s for s in zipkin.zipkin_spans() if s["tags"].get("guid:x-request-id") == request_id] == []


def test_config_dump_reports_tracing(mesh):
    tracing = mesh["frontend"].admin("/config_dump")["tracing"]
    assert tracing["sampling_percent"] == 100.0
    assert tracing["zipkin"]["sent"] > 0 and tracing["zipkin"]["dropped"] == 0


# -- a collector that is down or hangs never hurts requests ------------------------------------------------
@pytest.fixture(scope="module")
def lone_backend(backend_factory):
    return backend_factory("lone")


@pytest.fixture(scope="module")
def lone_config(tmp_path_factory, lone_backend):
    return write_config(tmp_path_factory.mktemp("tracing-lone"), service_entry("lone", [endpoint(lone_backend)]))


def _timed(proxy, count):
    started = time.monotonic()
    lines = curl_many(proxy.outbound_url + "/", count, host="lone", write_out="%{http_code} %{time_total}")
    elapsed = time.monotonic() - started
    assert {line.split()[0] for line in lines} == {"200"}, lines[:5]
    return elapsed, max(float(line.split()[1]) for line in lines)


def test_dead_zipkin_endpoint_does_not_affect_requests(proxy_factory, lone_config):
    dead_port = free_port("127.0.0.1")  # nothing listens there: connection refused
    dead = proxy_factory(lone_config, "client", extra_args=[
        "--zipkin-url", f"http://127.0.0.1:{dead_port}/api/v2/spans", "--trace-sampling", "100"])
    baseline = proxy_factory(lone_config, "client", extra_args=["--disable-plugin", "builtin.tracing"])
    _timed(baseline, 50)  # warm up
    base_elapsed, _ = _timed(baseline, 500)
    dead_elapsed, dead_worst = _timed(dead, 500)
    assert dead_elapsed < base_elapsed * 2 + 1.0, (dead_elapsed, base_elapsed)
    assert dead_worst < 0.5, dead_worst
    stats = dead.admin("/config_dump")["tracing"]["zipkin"]
    wait_for(lambda: dead.admin("/config_dump")["tracing"]["zipkin"]["post_failures"] > 0, 5.0,
             what="a failed POST to the dead endpoint")
    assert stats["sent"] == 0
    log = dead.log_path.read_text()
    assert log.count("Zipkin export to") <= 2, "failures are logged at most once per interval"
    assert "builtin.tracing" not in baseline.admin("/config_dump")["plugins"]


def test_hanging_zipkin_endpoint_overflows_the_queue_and_counts_drops(proxy_factory, lone_config):
    hanging = HangingServer().start()
    try:
        proxy = proxy_factory(lone_config, "client", extra_args=[
            "--zipkin-url", f"http://127.0.0.1:{hanging.port}/api/v2/spans", "--trace-sampling", "100",
            "--zipkin-max-queue", "50"])
        elapsed, worst = _timed(proxy, 600)
        assert worst < 0.5, worst
        stats = proxy.admin("/config_dump")["tracing"]["zipkin"]
        # two POSTs of 100 spans hang in flight, 50 wait in the queue: the rest are dropped and counted
        assert stats["dropped"] >= 600 - 250, stats
        assert stats["queued"] <= 50 and stats["sent"] == 0
    finally:
        hanging.stop()
