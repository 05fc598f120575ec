"""builtin.tap's pure parts: the filter, the event (redaction), and the cost without subscribers."""

from __future__ import annotations

import pytest

from mesh.proxy.context import RequestContext
from mesh.proxy.outcome import RequestOutcome
from mesh.telemetry.tap_stream import REDACTED, TapFilter, TapHub, TapRequestError, event


def finished(**kw):
    ctx = RequestContext.for_test(method="POST", path="/api/items?page=2", host="reviews",
                                  headers={"authorization": "Bearer secret", "cookie": "session=1",
                                           "user-agent": "curl/8", "x-trace": "abc"}, **kw)
    ctx.response_code = kw.get("response_code", 503)
    return ctx


def test_without_subscribers_the_hook_reads_one_attribute_and_touches_no_request():
    hub = TapHub(reactor=None)
    assert hub.mesh_request_complete(ctx=object(), outcome=None) is None  # object(): any attribute read would fail
    assert hub._failed.failures == 0


@pytest.mark.parametrize("query, matches", [
    ({}, True),
    ({"method": "post"}, True),
    ({"method": "GET"}, False),
    ({"path": "/api"}, True),
    ({"path": "/api/items"}, True),
    ({"path": "/other"}, False),
    ({"authority": "Reviews:9080"}, True),
    ({"authority": "ratings"}, False),
    ({"status": "503"}, True),
    ({"status": "5xx"}, True),
    ({"status": "5XX"}, True),
    ({"status": "2xx"}, False),
    ({"direction": "outbound"}, True),
    ({"direction": "inbound"}, False),
    ({"method": "POST", "status": "5xx", "path": "/api"}, True),
])
def test_filter(query, matches):
    assert TapFilter.from_query(query).matches(finished()) is matches


@pytest.mark.parametrize("query, message", [
    ({"status": "50"}, "give a code (503) or a class (5xx)"),
    ({"status": "6xx"}, "give a code (503) or a class (5xx)"),
    ({"direction": "sideways"}, "give inbound or outbound"),
    ({"path": "api"}, "starting with /"),
])
def test_bad_filters_say_what_to_give(query, message):
    with pytest.raises(TapRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TapFilter.from_query(query)


def test_headers_are_redacted_unless_asked_and_credentials_always():
    outcome = RequestOutcome(503, "UF", True, 0.0123)
    hidden = event(finished(), outcome, show_headers=False)
    assert set(hidden["headers"].values()) == {REDACTED} and "authorization" in hidden["headers"]
    shown = event(finished(), outcome, show_headers=True)["headers"]
    assert shown == {"authorization": REDACTED, "cookie": REDACTED, "user-agent": "curl/8", "x-trace": "abc"}
    assert hidden["duration_ms"] == 12.3 and hidden["path"] == "/api/items?page=2" and hidden["status"] == 503
