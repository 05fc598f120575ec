"""mesh.span_export, the service both span exporters share (Zipkin, Datadog's trace agent), no network.

Each test runs against both exporters: the collector down (spans lost and counted, one warning per interval
that counts them, nothing sent from the request path) and a batch that cannot be encoded (counted, and the
flushing goes on).  test_tracing_zipkin.py tests the rest of the shared part through Zipkin; the integration
tests (test_tracing.py, test_datadog.py) send to real collectors, down ones included.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from txmesh_datadog.addresses import TraceTarget
from txmesh_datadog.traces import TraceWriter

from mesh.telemetry.tracing import Span
from mesh.telemetry.zipkin import ZipkinExporter

EXPORTERS = {
    "zipkin": lambda clock, **kw: ZipkinExporter(clock, "http://127.0.0.1:9/api/v2/spans", **kw),
    "datadog": lambda clock, **kw: TraceWriter(clock, TraceTarget(url="http://127.0.0.1:9"), **kw),
}
#: The namespace of each exporter's messages (the sidecar's log shows it), as before they shared a base.
NAMESPACES = {"zipkin": "mesh.telemetry.zipkin", "datadog": "txmesh_datadog"}


def _span(number):
    return Span("4bf92f3577b34da6a3ce929d0e0e4736", "%016x" % (number + 1), None, "CLIENT", "orders:80/*",
                1_700_000_000_000_000, 1500, "client.default", "127.0.0.1", 8080, {"http.status_code": "200"})


class _Response:
    code = 202


class _Agent:
    """Counts the requests; each fails at once (``down``) or is answered 202."""

    def __init__(self, down):
        self.down = down
        self.requests = 0

    def request(self, method, uri, headers, producer):
        self.requests += 1
        return fail(ConnectionRefusedError("Connection was refused by other side")) if self.down else succeed(
            _Response())


@pytest.fixture
def warnings():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [event for event in events if event.get("log_level") is not None
                   and event["log_level"].name == "warn" and "failed" in formatEvent(event)]
    globalLogPublisher.removeObserver(events.append)


def _exporter(kind, agent, **kw):
    clock = Clock()
    exporter = EXPORTERS[kind](clock, **kw)
    exporter._agent = agent
    exporter.startService()
    return clock, exporter


@pytest.mark.parametrize("kind", EXPORTERS)
def test_a_collector_that_is_down_costs_spans_counted_in_one_warning_per_interval(kind, warnings):
    agent = _Agent(down=True)
    clock, exporter = _exporter(kind, agent, batch_size=10, max_queue=30, log_interval=10.0)
    for number in range(35):
        exporter.add(_span(number))
    assert agent.requests == 0, "add() only queues: the requests go out later, from the reactor"
    assert exporter.dropped == 5 and len(exporter.queue) == 30
    clock.advance(0)  # the full batches' flush
    assert agent.requests == 3 and exporter.failed == 30 and exporter.sent == 0
    assert exporter.in_flight == 0 and not exporter._pending and exporter.queue == []
    (warning,) = warnings()
    text = formatEvent(warning)
    assert "to http://127.0.0.1:9" in text and "Connection was refused" in text
    assert warning["failures"] == 1 and warning["dropped"] == 5  # the first failure is told at once
    assert warning["log_namespace"] == NAMESPACES[kind]
    for number in range(3):
        exporter.add(_span(number))
        clock.advance(1.0)  # each interval's flush fails too: counted, not told
    assert len(warnings()) == 1 and exporter.failed == 33
    clock.advance(10.0)
    exporter.add(_span(0))
    clock.advance(1.0)
    assert len(warnings()) == 2 and warnings()[1]["failures"] == 6  # 2 + 3 untold, and this one
    assert exporter.describe()["last_error"] == "Connection was refused by other side"
    exporter.stopService()


@pytest.mark.parametrize("kind", EXPORTERS)
def test_a_batch_that_cannot_be_encoded_is_counted_and_the_flushing_goes_on(kind, monkeypatch):
    monkeypatch.setattr("mesh.span_export.readBody", lambda response: succeed(b""))
    events = []
    globalLogPublisher.addObserver(events.append)
    agent = _Agent(down=False)
    clock, exporter = _exporter(kind, agent, batch_size=10)
    for _ in range(3):
        exporter.add(object())  # not a span
        clock.advance(1.0)
    globalLogPublisher.removeObserver(events.append)
    assert exporter.failed == 3 and agent.requests == 0 and exporter.describe()["last_error"] == "encoding error"
    assert len([event for event in events if "log_failure" in event]) == 1  # one traceback, not one per batch
    exporter.add(_span(0))
    clock.advance(1.0)
    assert agent.requests == 1 and exporter.sent == 1
    exporter.stopService()
