"""Parsing and formatting of trace context headers: W3C traceparent/tracestate, B3 single and multi."""

from __future__ import annotations

import re

import pytest

from mesh.telemetry.tracing_context import (
    B3_MULTI,
    B3_SINGLE,
    W3C,
    extract,
    format_b3_single,
    format_traceparent,
    inject,
    new_span_id,
    new_trace_id,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SPAN = "b7ad6b7169203331"
TP = f"00-{TRACE}-{PARENT}-01"


# -- ids ------------------------------------------------------------------------------------------
def test_new_ids_are_lowercase_hex_of_the_right_length_and_unique():
    traces = {new_trace_id() for _ in range(1000)}
    spans = {new_span_id() for _ in range(1000)}
    assert len(traces) == 1000 and len(spans) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", t) and t != "0" * 32 for t in traces)
    assert all(re.fullmatch(r"[0-9a-f]{16}", s) and s != "0" * 16 for s in spans)


# -- W3C --------------------------------------------------------------------------------------------
def test_traceparent_valid():
    assert parse_traceparent(TP) == (TRACE, PARENT, 1)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-00") == (TRACE, PARENT, 0)
    assert parse_traceparent(f" 00-{TRACE}-{PARENT}-03 ") == (TRACE, PARENT, 3)


def test_traceparent_future_version_is_read_by_its_first_fields():
    assert parse_traceparent(f"cc-{TRACE}-{PARENT}-01") == (TRACE, PARENT, 1)
    assert parse_traceparent(f"cc-{TRACE}-{PARENT}-01-what-the-future-will-be-like") == (TRACE, PARENT, 1)
    assert parse_traceparent(f"cc-{TRACE}-{PARENT}-01.extra") is None


@pytest.mark.parametrize("value", [
    "",
    "garbage",
    f"ff-{TRACE}-{PARENT}-01",                     # version ff is invalid
    f"00-{'0' * 32}-{PARENT}-01",                  # all-zero trace id
    f"00-{TRACE}-{'0' * 16}-01",                   # all-zero parent id
    f"00-{TRACE.upper()}-{PARENT}-01",             # upper-case hex
    f"00-{TRACE}-{PARENT.upper()}-01",
    f"00-{TRACE[:-1]}-{PARENT}-01",                # short trace id
    f"00-{TRACE}-{PARENT}0-01",                    # long parent id
    f"00-{TRACE}-{PARENT}-1",                      # short flags
    f"00-{TRACE}-{PARENT}-01-extra",               # version 00 has exactly four fields
    f"00_{TRACE}_{PARENT}_01",
    f"0g-{TRACE}-{PARENT}-01",
])
def test_traceparent_invalid(value):
    assert parse_traceparent(value) is None


def test_format_traceparent():
    assert format_traceparent(TRACE, SPAN, True) == f"00-{TRACE}-{SPAN}-01"
    assert format_traceparent(TRACE, SPAN, False) == f"00-{TRACE}-{SPAN}-00"
    assert format_traceparent(TRACE, SPAN, False, flags=0x03) == f"00-{TRACE}-{SPAN}-02"  # other bits kept
    assert format_traceparent("463ac35c9f6413ad", SPAN, True) == f"00-0000000000000000463ac35c9f6413ad-{SPAN}-01"


# -- B3 single ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    (f"{TRACE}-{PARENT}-1-{SPAN}", (TRACE, PARENT, True, False, SPAN)),
    (f"{TRACE}-{PARENT}-0", (TRACE, PARENT, False, False, None)),
    (f"{TRACE}-{PARENT}-d", (TRACE, PARENT, True, True, None)),
    (f"{TRACE}-{PARENT}", (TRACE, PARENT, None, False, None)),
    (f"463ac35c9f6413ad-{PARENT}-1", ("463ac35c9f6413ad", PARENT, True, False, None)),
    (f"{TRACE.upper()}-{PARENT}-1", (TRACE, PARENT, True, False, None)),  # hex case is forgiven
    ("0", (None, None, False, False, None)),
    ("1", (None, None, True, False, None)),
    ("d", (None, None, True, True, None)),
])
def test_b3_single_valid(value, expected):
    assert parse_b3_single(value) == expected


@pytest.mark.parametrize("value", [
    "", "x", "2", "true", f"{TRACE}", f"{TRACE}-{PARENT}-2", f"{TRACE}-{PARENT}-1-", f"{TRACE[:20]}-{PARENT}-1",
    f"{'0' * 32}-{PARENT}-1", f"{TRACE}-{'0' * 16}-1", f"{TRACE}-{PARENT}-1-{'0' * 16}", f"{TRACE}-{PARENT}-1-zz",
])
def test_b3_single_invalid(value):
    assert parse_b3_single(value) is None


def test_format_b3_single():
    assert format_b3_single(TRACE, SPAN, True, parent_id=PARENT) == f"{TRACE}-{SPAN}-1-{PARENT}"
    assert format_b3_single(TRACE, SPAN, False) == f"{TRACE}-{SPAN}-0"
    assert format_b3_single(TRACE, SPAN, True, debug=True) == f"{TRACE}-{SPAN}-d"


# -- B3 multi ---------------------------------------------------------------------------------------
def _multi(trace=TRACE, span=PARENT, **more):
    headers = {"x-b3-traceid": trace, "x-b3-spanid": span}
    headers.update({f"x-b3-{name}": value for name, value in more.items()})
    return {k: v for k, v in headers.items() if v is not None}


@pytest.mark.parametrize("headers, expected", [
    (_multi(sampled="1"), (TRACE, PARENT, True, False)),
    (_multi(sampled="0"), (TRACE, PARENT, False, False)),
    (_multi(sampled="true"), (TRACE, PARENT, True, False)),
    (_multi(sampled="false"), (TRACE, PARENT, False, False)),
    (_multi(), (TRACE, PARENT, None, False)),
    (_multi(flags="1"), (TRACE, PARENT, True, True)),
    (_multi(flags="1", sampled="0"), (TRACE, PARENT, True, True)),  # debug implies sampled
    (_multi(trace="463ac35c9f6413ad", parentspanid=SPAN), ("463ac35c9f6413ad", PARENT, None, False)),
    ({"x-b3-sampled": "0"}, (None, None, False, False)),
    (_multi(sampled="maybe"), (TRACE, PARENT, None, False)),
])
def test_b3_multi_valid(headers, expected):
    assert parse_b3_multi(headers) == expected


@pytest.mark.parametrize("headers", [
    {}, _multi(span=None), _multi(trace=None), _multi(trace="xyz"), _multi(span=PARENT + "0"),
    _multi(trace="0" * 32), _multi(span="0" * 16), _multi(trace=TRACE[:24]),
])
def test_b3_multi_invalid(headers):
    assert parse_b3_multi(headers) is None


# -- extract: precedence and what is written back ----------------------------------------------------
def test_no_trace_headers_means_no_context():
    assert extract({"host": "x", "user-agent": "curl"}) is None


def test_w3c_wins_over_b3_and_every_format_present_is_remembered():
    incoming = extract({"traceparent": TP, "b3": f"{'a' * 32}-{SPAN}-0", "x-b3-traceid": "b" * 32,
                        "x-b3-spanid": SPAN})
    assert (incoming.trace_id, incoming.parent_id, incoming.sampled) == (TRACE, PARENT, True)
    assert incoming.formats == W3C | B3_SINGLE | B3_MULTI


def test_invalid_traceparent_falls_back_to_b3_and_drops_tracestate():
    incoming = extract({"traceparent": "00-bad", "tracestate": "a=b", "b3": f"{TRACE}-{PARENT}-0"})
    assert (incoming.trace_id, incoming.parent_id, incoming.sampled) == (TRACE, PARENT, False)
    assert incoming.drop_tracestate
    pairs = dict(inject(TRACE, SPAN, PARENT, False, incoming))
    assert pairs[b"tracestate"] is None


def test_sampling_only_b3_gives_a_decision_without_ids():
    incoming = extract({"b3": "0"})
    assert incoming.trace_id is None and incoming.sampled is False and incoming.formats == B3_SINGLE


def test_w3c_sampled_flag_is_bit_zero():
    assert extract({"traceparent": f"00-{TRACE}-{PARENT}-02"}).sampled is False
    assert extract({"traceparent": f"00-{TRACE}-{PARENT}-03"}).sampled is True


def test_inject_without_incoming_writes_w3c_only():
    assert inject(TRACE, SPAN, None, True, None) == [(b"traceparent", f"00-{TRACE}-{SPAN}-01".encode())]


def test_inject_rewrites_each_format_that_came_in_with_our_span_as_parent():
    incoming = extract({"traceparent": TP, "tracestate": "congo=t61rcWkgMzE", "b3": f"{TRACE}-{PARENT}-1",
                        "x-b3-traceid": TRACE, "x-b3-spanid": PARENT, "x-b3-sampled": "1"})
    pairs = inject(TRACE, SPAN, PARENT, True, incoming)
    assert pairs == [
        (b"traceparent", f"00-{TRACE}-{SPAN}-01".encode()),
        (b"b3", f"{TRACE}-{SPAN}-1-{PARENT}".encode()),
        (b"x-b3-traceid", TRACE.encode()),
        (b"x-b3-spanid", SPAN.encode()),
        (b"x-b3-parentspanid", PARENT.encode()),
        (b"x-b3-sampled", b"1"),
    ]  # tracestate is not touched: it is forwarded as received


def test_inject_b3_multi_root_removes_a_stale_parent_and_keeps_debug():
    incoming = extract({"x-b3-flags": "1"})
    pairs = dict(inject(TRACE, SPAN, None, True, incoming))
    assert pairs[b"x-b3-parentspanid"] is None
    assert b"x-b3-sampled" not in pairs  # debug: x-b3-flags (forwarded as received) says it all
