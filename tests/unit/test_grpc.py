"""The gRPC helpers of the request path (mesh/proxy/grpc.py) and the gRPC retry conditions."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.api import TryOutcome
from mesh.builtin.retry import should_retry
from mesh.config.tables import RetryPolicy
from mesh.proxy import grpc
from mesh.proxy.context import RequestContext


@pytest.mark.parametrize("content_type,is_grpc", [
    ("application/grpc", True), ("application/grpc+proto", True), ("application/grpc;charset=x", True),
    ("application/grpc-web", False), ("application/grpc-web+proto", False), ("application/grpcx", False),
])
def test_grpc_content_types_as_envoy_tells_them(content_type, is_grpc):
    assert (grpc.call_for(content_type) is not None) is is_grpc


@pytest.mark.parametrize("value,seconds", [
    ("1H", 3600.0), ("2M", 120.0), ("3S", 3.0), ("250m", 0.25), ("1500u", 0.0015), ("99999999n", 0.099999999),
    ("0S", 0.0),
])
def test_grpc_timeout_values(value, seconds):
    assert grpc.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "S", "10", "10s", "123456789S", "-1S", "1.5S", "²S", " 1S"])
def test_malformed_grpc_timeouts_are_ignored(value):
    assert grpc.parse_timeout(value) is None


@pytest.mark.parametrize("seconds,wire", [
    (0.25, b"250m"), (0.0001, b"1m"), (2.0, b"2000m"), (99999.999, b"99999999m"), (100000.0, b"100000S"),
    (10 ** 6 * 1.0, b"1000000S"), (10 ** 8 * 1.0, b"1666666M"), (10 ** 12 * 1.0, b"99999999H"),
])
def test_grpc_timeouts_are_written_in_milliseconds_as_envoy_writes_them(seconds, wire):
    assert grpc.format_timeout(seconds) == wire


@pytest.mark.parametrize("http,timeout,status", [
    (404, False, 12), (403, False, 7), (401, False, 16), (400, False, 13), (503, False, 14), (429, False, 14),
    (502, False, 14), (504, False, 14), (504, True, 4), (500, False, 2), (413, False, 2),
])
def test_local_replies_map_http_statuses_as_envoy(http, timeout, status):
    headers = dict(grpc.local_reply_headers(http, timeout, "x"))
    assert headers[b"content-type"] == b"application/grpc" and headers[b"grpc-status"] == b"%d" % status


@pytest.mark.parametrize("status,http", [
    (0, 200), (1, 499), (2, 500), (3, 400), (4, 504), (5, 404), (6, 409), (7, 403), (8, 429), (9, 400),
    (10, 409), (11, 400), (12, 501), (13, 500), (14, 503), (15, 500), (16, 401), (17, 500), (99, 500),
])
def test_outlier_detection_counts_a_grpc_status_as_envoy_maps_it(status, http):
    assert grpc.outlier_status(status) == http


def test_grpc_messages_are_percent_encoded():
    assert grpc.encode_message("no route: 100% sure ü") == b"no route: 100%25 sure %C3%BC"


def _frames(sizes):
    return b"".join(struct.pack(">BI", 0, size) + bytes(size) for size in sizes)


@given(sizes=st.lists(st.integers(0, 300), max_size=20), cuts=st.lists(st.integers(1, 50), max_size=40))
def test_messages_are_counted_however_the_stream_is_cut(sizes, cuts):
    data = _frames(sizes)
    counter = grpc.MessageCounter()
    position = 0
    for cut in cuts:
        counter.feed(data[position:position + cut])
        position += cut
    counter.feed(data[position:])
    assert counter.count == len(sizes)


def test_one_large_message_is_skipped_not_read():
    counter = grpc.MessageCounter()
    counter.feed(struct.pack(">BI", 0, 10_000_000) + bytes(100))
    for _ in range(99):
        counter.feed(bytes(100_000))
    counter.feed(bytes(100_000 - 100) + _frames([3]))
    assert counter.count == 2


def _ctx(headers, route_timeout, now=100.0):
    ctx = RequestContext.for_test(headers={"content-type": "application/grpc", **headers})
    call = ctx.grpc = grpc.call_for("application/grpc")
    return ctx, call, call.deadline(ctx, route_timeout, now, ((b"x-forwarded-client-cert", b"c"),))


def test_the_smaller_of_grpc_timeout_and_route_timeout_is_the_deadline():
    assert _ctx({"grpc-timeout": "500m"}, 2.0)[2] == 0.5
    assert _ctx({"grpc-timeout": "5S"}, 2.0)[2] == 2.0
    assert _ctx({"grpc-timeout": "5S"}, None)[2] == 5.0
    assert _ctx({}, 2.0)[2] == 2.0
    assert _ctx({}, None)[2] is None
    assert _ctx({"grpc-timeout": "0m"}, None)[2] is None  # 0: no deadline, as Envoy
    assert _ctx({"grpc-timeout": "soon"}, 3.0)[2] == 3.0  # malformed: ignored


def test_each_try_forwards_the_time_left_bounded_by_the_per_try_timeout():
    ctx, call, timeout = _ctx({"grpc-timeout": "2S"}, None)
    assert timeout == 2.0 and call.client_timeout == "2S"
    assert all(name != b"grpc-timeout" for name, _ in ctx.raw_headers)  # the client's is not forwarded
    assert call.forwarded_headers(100.5, None) == ((b"x-forwarded-client-cert", b"c"), (b"grpc-timeout", b"1500m"))
    assert call.forwarded_headers(101.0, 0.25)[-1] == (b"grpc-timeout", b"250m")
    assert call.forwarded_headers(101.875, 0.25)[-1] == (b"grpc-timeout", b"125m")


def test_the_status_comes_from_the_head_the_trailers_or_the_http_status():
    call = grpc.call_for("application/grpc")
    assert call.head_status([(b"content-type", b"application/grpc")]) is None
    call.trailers([(b"grpc-status", b"0")])
    call.complete(200)
    assert call.status == 0
    trailers_only = grpc.call_for("application/grpc")
    assert trailers_only.head_status([(b"grpc-status", b"14"), (b"grpc-message", b"down")]) == 14
    inferred = grpc.call_for("application/grpc")
    inferred.complete(503)
    assert inferred.status == 14
    cut = grpc.call_for("application/grpc")
    cut.complete(0)
    assert cut.status is None


@pytest.mark.parametrize("name,status", [
    ("cancelled", 1), ("deadline-exceeded", 4), ("resource-exhausted", 8), ("internal", 13), ("unavailable", 14),
])
def test_grpc_retry_conditions_match_their_status_only(name, status):
    policy = RetryPolicy(attempts=2, retry_on=frozenset({name}))
    assert should_retry(TryOutcome("status", 200, grpc_status=status), policy)
    others = [code for code in range(17) if code != status]
    assert not any(should_retry(TryOutcome("status", 200, grpc_status=code), policy) for code in others)
    assert not should_retry(TryOutcome("status", 503), policy)  # an HTTP 503 is no gRPC status


def test_http_conditions_still_apply_to_grpc_requests():
    policy = RetryPolicy(attempts=2, retry_on=frozenset({"5xx"}))
    assert should_retry(TryOutcome("status", 503, grpc_status=None), policy)
    assert not should_retry(TryOutcome("status", 200, grpc_status=14), policy)
