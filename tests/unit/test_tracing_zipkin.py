"""The Zipkin exporter: bounded queue with a drop counter, batches, in-flight limit, failures (no network).

The shared part (mesh.span_export) through Zipkin; test_span_export.py runs its failure paths
against the Datadog trace writer too.
"""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from mesh.telemetry.zipkin import ZipkinExporter


class _FakeSpan:
    def __init__(self, number):
        self.number = number

    def to_zipkin(self):
        return {"traceId": "a" * 32, "id": "%016x" % (self.number + 1), "name": "n"}


class _Response:
    def __init__(self, code):
        self.code = code


class _FakeAgent:
    """Records each POST; its Deferred is fired by the test (or at once with ``auto``)."""

    def __init__(self, auto=None):
        self.requests = []
        self.auto = auto

    def request(self, method, uri, headers, producer):
        body = producer._inputFile.read()
        d = Deferred()
        self.requests.append((method, uri, headers, json.loads(body), d))
        if self.auto is not None:
            d.callback(_Response(self.auto))
        return d


def _exporter(agent, **kw):
    clock = Clock()
    exporter = ZipkinExporter(clock, "http://127.0.0.1:9/api/v2/spans", **kw)
    exporter._agent = agent
    return clock, exporter


def _read_body_ok(monkeypatch):
    monkeypatch.setattr("mesh.span_export.readBody", lambda response: succeed(b""))


def test_queue_is_bounded_and_counts_drops():
    clock, exporter = _exporter(_FakeAgent(), max_queue=10)
    for number in range(25):
        exporter.add(_FakeSpan(number))
    assert len(exporter.queue) == 10 and exporter.dropped == 15


def test_flush_every_interval_posts_json_batches(monkeypatch):
    _read_body_ok(monkeypatch)
    agent = _FakeAgent(auto=202)
    clock, exporter = _exporter(agent, batch_size=100)
    exporter.startService()
    for number in range(5):
        exporter.add(_FakeSpan(number))
    assert agent.requests == []
    clock.advance(1.0)
    (method, uri, headers, body, _), = agent.requests
    assert method == b"POST" and uri == b"http://127.0.0.1:9/api/v2/spans"
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert [span["id"] for span in body] == ["%016x" % n for n in range(1, 6)]
    assert exporter.sent == 5 and exporter.queue == []
    exporter.stopService()


def test_full_batch_is_sent_without_waiting_for_the_interval(monkeypatch):
    _read_body_ok(monkeypatch)
    agent = _FakeAgent(auto=202)
    clock, exporter = _exporter(agent, batch_size=10)
    exporter.startService()
    for number in range(25):
        exporter.add(_FakeSpan(number))
    assert agent.requests == []  # the flush is scheduled, not run inside add()
    clock.advance(0)
    assert [len(r[3]) for r in agent.requests] == [10, 10, 5] and exporter.sent == 25
    exporter.stopService()


def test_in_flight_posts_are_limited_and_the_queue_overflows_while_the_collector_hangs():
    agent = _FakeAgent()  # never answers
    clock, exporter = _exporter(agent, batch_size=10, max_queue=50, max_in_flight=2, timeout=5.0)
    exporter.startService()
    for number in range(200):
        exporter.add(_FakeSpan(number))
    clock.advance(1.0)
    assert len(agent.requests) == 2 and exporter.in_flight == 2
    assert exporter.dropped > 0 and len(exporter.queue) <= 50
    clock.advance(5.0)  # the timeout cancels the hanging POSTs: their spans count as failed
    assert exporter.in_flight <= 2 and exporter.failed >= 20


def test_failures_are_counted_and_logged_at_most_once_per_interval(monkeypatch):
    messages = []
    observer = messages.append
    globalLogPublisher.addObserver(observer)
    try:
        agent = _FakeAgent()
        agent.request = lambda *a: fail(ConnectionRefusedError("refused"))
        clock, exporter = _exporter(agent, batch_size=1, log_interval=10.0)
        exporter.startService()
        for _ in range(5):
            exporter.add(_FakeSpan(0))
            clock.advance(1.0)
        assert exporter.failed == 5 and exporter.describe()["post_failures"] == 5 and exporter.sent == 0
        warnings = [m for m in messages if formatEvent(m).startswith("Zipkin export to")]
        assert len(warnings) == 1
        clock.advance(10.0)
        exporter.add(_FakeSpan(0))
        clock.advance(1.0)
        warnings = [m for m in messages if formatEvent(m).startswith("Zipkin export to")]
        assert len(warnings) == 2 and warnings[1]["failures"] == 5  # 4 unlogged + this one
        assert exporter.describe()["last_error"]
    finally:
        globalLogPublisher.removeObserver(observer)


def test_http_error_status_is_a_failure(monkeypatch):
    _read_body_ok(monkeypatch)
    agent = _FakeAgent(auto=400)
    clock, exporter = _exporter(agent)
    exporter.startService()
    exporter.add(_FakeSpan(0))
    clock.advance(1.0)
    assert exporter.failed == 1 and exporter.sent == 0 and "HTTP 400" in exporter.describe()["last_error"]
