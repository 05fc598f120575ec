"""Spans to the Datadog agent's trace intake: ``PUT /v0.4/traces``, JSON, batched off the request path.

``builtin.tracing`` finishes each sampled span in ``mesh_request_complete``
(``tryfirst``) and leaves it in ``ctx.extra["span"]``, as the OTLP plugin
reads it.  The plugin hands it to :meth:`TraceWriter.add`, which appends it
to a bounded queue (or counts a drop when the queue is full): that is all the
request path does.  Every ``interval`` seconds, or as soon as a batch is full,
the writer converts a batch (:func:`datadog_span`), groups it by trace and
PUTs it with :class:`twisted.web.client.Agent` (non-blocking, persistent
connections, a timeout), to ``http://HOST:8126`` or over the agent's Unix
socket (``unix:///var/run/datadog/apm.socket``).  A failed PUT loses its
batch (the queue must stay bounded) and is logged at most once per
``log_interval`` seconds.

The payload is what Datadog's tracers send to ``/v0.4/traces``: a JSON array
of traces, each an array of spans with ``trace_id``, ``span_id``,
``parent_id`` (unsigned 64-bit integers), ``name``, ``resource``,
``service``, ``type``, ``start`` and ``duration`` (nanoseconds), ``error``
(0 or 1), ``meta`` (string tags) and ``metrics`` (numeric tags); the header
``X-Datadog-Trace-Count`` says how many traces it holds.
"""

from __future__ import annotations

import json
from io import BytesIO

from twisted.application import service
from twisted.internet.defer import DeferredList
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, _HTTP11ClientFactory, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from .addresses import TraceTarget

log = Logger(namespace="txmesh_datadog")

PATH = b"/v0.4/traces"
#: The operation name of every span: what the sidecar does (Envoy's Datadog tracer says ``envoy.proxy``).
OPERATION = "txmesh.proxy"


def datadog_span(span) -> dict:
    """The v0.4 JSON object of a finished span of ``builtin.tracing`` (``ctx.extra["span"]``).

    The 128-bit trace id is split as Datadog's tracers split it: the low 64
    bits are ``trace_id``, the high ones (hex) the ``_dd.p.tid`` tag.  The
    span's tags are its ``meta``; ``span.kind`` says ``client`` or ``server``.
    """
    trace_hex = span.trace_id.rjust(32, "0")
    high = trace_hex[:-16]
    meta = dict(span.tags)
    error = 1 if meta.pop("error", None) == "true" else 0
    meta["span.kind"] = span.kind.lower()
    if int(high, 16):
        meta["_dd.p.tid"] = high
    return {
        "trace_id": int(trace_hex[-16:], 16),
        "span_id": int(span.span_id, 16),
        "parent_id": int(span.parent_id, 16) if span.parent_id else 0,
        "name": OPERATION,
        "resource": span.name,
        "service": span.service,
        "type": "web" if span.kind == "SERVER" else "http",
        "start": span.start_us * 1000,
        "duration": span.duration_us * 1000,
        "error": error,
        "meta": meta,
        "metrics": {"_sampling_priority_v1": 1},  # sampled by the mesh: the agent keeps it
    }


def payload(spans) -> tuple[bytes, int]:
    """The request body of a batch of spans, grouped by trace, and the number of traces."""
    traces = {}
    for span in spans:
        converted = datadog_span(span)
        traces.setdefault(converted["trace_id"], []).append(converted)
    return json.dumps(list(traces.values()), separators=(",", ":")).encode(), len(traces)


class _QuietFactory(_HTTP11ClientFactory):
    """No "Starting factory" / "Stopping factory" log lines for every connection to the agent."""

    noisy = False


@implementer(IAgentEndpointFactory)
class _UnixSocket:
    """Every request of the :class:`Agent` goes to one Unix socket."""

    def __init__(self, reactor, path: str, timeout: float):
        self._reactor, self._path, self._timeout = reactor, path, timeout

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(self._reactor, self._path, timeout=self._timeout)


class TraceWriter(service.Service):
    """Batches spans to the trace agent (see the module docstring).

    Counters: ``queued`` (now), ``sent`` (spans the agent accepted),
    ``dropped`` (queue full), ``failed`` (spans in PUTs that failed), ``puts``.
    """

    name = "datadog-traces"

    def __init__(self, reactor, target: TraceTarget, *, max_queue: int = 2048, batch_size: int = 256,
                 interval: float = 1.0, timeout: float = 5.0, max_in_flight: int = 2, log_interval: float = 10.0,
                 stop_timeout: float = 2.0):
        self.reactor = reactor
        self.target = target
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.interval = interval
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.log_interval = log_interval
        self.stop_timeout = stop_timeout
        self.queue = []
        self.in_flight = 0
        self.sent = self.dropped = self.failed = self.puts = 0
        self._failures_since_log = 0
        self._last_log = None
        self._flush_soon = None
        self._pending = set()
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = max_in_flight
        pool.retryAutomatically = False
        pool._factory = _QuietFactory
        self._pool = pool
        if target.path:
            self._url = b"http://localhost" + PATH
            self._agent = Agent.usingEndpointFactory(reactor, _UnixSocket(reactor, target.path, timeout), pool=pool)
        else:
            self._url = target.url.encode("ascii") + PATH
            self._agent = Agent(reactor, connectTimeout=timeout, pool=pool)
        self._loop = LoopingCall(self.flush)
        self._loop.clock = reactor

    def add(self, span) -> None:
        """Queue one finished span; never blocks, never raises."""
        queue = self.queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            return
        queue.append(span)
        if len(queue) >= self.batch_size and self._flush_soon is None and self.running:
            self._flush_soon = self.reactor.callLater(0, self._flush_now)

    def _flush_now(self):
        self._flush_soon = None
        self.flush()

    def flush(self) -> None:
        """PUT queued spans, one batch per free in-flight slot."""
        while self.queue and self.in_flight < self.max_in_flight:
            batch = self.queue[:self.batch_size]
            del self.queue[:self.batch_size]
            self._put(batch)

    def _put(self, batch) -> None:
        body, traces = payload(batch)
        headers = Headers({b"content-type": [b"application/json"], b"user-agent": [b"txmesh-datadog"],
                           b"x-datadog-trace-count": [str(traces).encode()],
                           b"datadog-meta-lang": [b"python"], b"datadog-meta-tracer-version": [b"txmesh"]})
        self.in_flight += 1
        self.puts += 1
        d = self._agent.request(b"PUT", self._url, headers, FileBodyProducer(BytesIO(body)))
        d.addCallback(lambda response: readBody(response).addCallback(lambda text: (response.code, text)))
        d.addTimeout(self.timeout, self.reactor)
        d.addCallbacks(self._answered, self._put_failed, callbackArgs=(len(batch),), errbackArgs=(len(batch),))
        d.addBoth(self._put_done, d)
        self._pending.add(d)

    def _answered(self, result, count: int) -> None:
        code, text = result
        if 200 <= code < 300:
            self.sent += count
        else:
            self._failed(count, f"HTTP {code}: {text[:200].decode('utf-8', 'replace')}")

    def _put_failed(self, failure, count: int) -> None:
        self._failed(count, failure.getErrorMessage() or failure.type.__name__)

    def _put_done(self, _, d) -> None:
        self._pending.discard(d)
        self.in_flight -= 1
        if len(self.queue) >= self.batch_size and self.running:
            self.flush()

    def _failed(self, count: int, reason: str) -> None:
        self.failed += count
        self._failures_since_log += 1
        now = self.reactor.seconds()
        if self._last_log is None or now - self._last_log >= self.log_interval:
            self._last_log = now
            log.warn("datadog: sending spans to {target} failed ({failures} failed PUT(s) since the last message; "
                     "{failed} span(s) lost so far, {dropped} dropped with the queue full); requests are not "
                     "affected: {reason}", target=str(self.target), failures=self._failures_since_log,
                     failed=self.failed, dropped=self.dropped, reason=reason)
            self._failures_since_log = 0

    def startService(self):
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self):
        """Send what is queued (best effort, at most ``stop_timeout`` seconds), then close connections."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        self.max_in_flight += 1  # one more slot for the final batch even if PUTs hang
        self.flush()
        done = DeferredList(list(self._pending), consumeErrors=True)
        done.addTimeout(self.stop_timeout, self.reactor)
        done.addBoth(lambda _: self._pool.closeCachedConnections())
        return done
