"""Finished spans to a collector over HTTP: a bounded queue, batches, a few requests in flight.

:class:`SpanExporter` is the Twisted service every span exporter shares: the
Zipkin exporter (:mod:`mesh.telemetry.zipkin`) and the Datadog plugin's trace
writer (``txmesh_datadog.traces``, through :mod:`mesh.api`).  A subclass says
only how a batch is encoded (:meth:`SpanExporter.encode`) and where it goes
(the URL, the HTTP method, optionally a Unix socket).

``add(span)`` is all the data path does: append to a bounded queue (or count
a drop when it is full).  A flush runs every ``interval`` seconds, and soon
after the queue reaches ``batch_size``; it encodes up to ``batch_size`` spans
and sends them in one request with :class:`twisted.web.client.Agent`
(non-blocking, persistent connections, a timeout).  At most
``max_in_flight`` requests are outstanding; while they are, spans wait in the
queue, and past ``max_queue`` they are dropped and counted.  A failed request
loses its batch (no retry: the queue must stay bounded) and is logged at most
once per ``log_interval`` seconds, with the number of failures since the last
message.  On stop, what is queued gets one last flush, waited for at most
``stop_timeout`` seconds.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.application import service
from twisted.internet.defer import DeferredList
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, _HTTP11ClientFactory, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


class _QuietFactory(_HTTP11ClientFactory):
    """No "Starting factory" / "Stopping factory" log lines for every connection to the collector."""

    noisy = False


@implementer(IAgentEndpointFactory)
class _UnixSocket:
    """Every request of the :class:`Agent` goes to one Unix socket."""

    def __init__(self, reactor, path: str, timeout: float):
        self._reactor, self._path, self._timeout = reactor, path, timeout

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(self._reactor, self._path, timeout=self._timeout)


class SpanExporter(service.Service):
    """Batches finished spans to an HTTP collector (see the module docstring).

    A subclass sets ``what`` (how its failure messages begin: ``"Zipkin export"``)
    and ``method`` (``b"POST"``), and implements :meth:`encode`; it may set
    ``log_namespace`` (default: the subclass's module).  ``url`` is
    where the batches go; with ``unix_path``, they go over that Unix socket
    (the URL then gives only the path and the Host header).  ``target`` is how
    the messages name the collector (default: ``url``).

    Counters, for :meth:`describe`: ``queued`` (now), ``sent`` (spans the
    collector accepted), ``dropped`` (queue full), ``failed`` (spans in
    requests that failed), ``requests`` and ``request_failures``.
    """

    what = "span export"
    method = b"POST"
    log_namespace: str | None = None

    def __init__(self, reactor, url: str, *, unix_path: str | None = None, target: str | None = None,
                 max_queue: int = 2048, batch_size: int = 100, interval: float = 1.0, timeout: float = 5.0,
                 max_in_flight: int = 2, log_interval: float = 10.0, stop_timeout: float = 2.0):
        self.reactor = reactor
        self.log = Logger(namespace=self.log_namespace or type(self).__module__)
        self.url = url
        self.target = target or url
        self._url = url.encode("ascii")
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.interval = interval
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.log_interval = log_interval
        self.stop_timeout = stop_timeout
        self.queue = []
        self.in_flight = 0
        self.sent = self.dropped = self.failed = 0
        self.requests = self.request_failures = 0
        self._unlogged_failures = 0
        self._encoding_failed = False
        self._last_failure_log = None
        self._last_error = None
        self._flush_soon = None
        self._pending = set()
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = max_in_flight
        pool.retryAutomatically = False
        pool._factory = _QuietFactory
        self._pool = pool
        if unix_path:
            self._agent = Agent.usingEndpointFactory(reactor, _UnixSocket(reactor, unix_path, timeout), pool=pool)
        else:
            self._agent = Agent(reactor, connectTimeout=timeout, pool=pool)
        self._loop = LoopingCall(self.flush)
        self._loop.clock = reactor

    def encode(self, batch: list) -> tuple[bytes, Headers]:
        """The request body and headers that carry ``batch`` (a list of spans, as given to :meth:`add`)."""
        raise NotImplementedError

    # -- data path ------------------------------------------------------------------
    def add(self, span: Any) -> None:
        """Queue one finished span; never blocks, never raises."""
        queue = self.queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            return
        queue.append(span)
        if len(queue) >= self.batch_size and self._flush_soon is None and self.running:
            self._flush_soon = self.reactor.callLater(0, self._flush_now)

    # -- flushing ----------------------------------------------------------------------
    def _flush_now(self):
        self._flush_soon = None
        self.flush()

    def flush(self) -> None:
        """Send queued spans, one batch per free in-flight slot."""
        while self.queue and self.in_flight < self.max_in_flight:
            batch = self.queue[:self.batch_size]
            del self.queue[:self.batch_size]
            self._send(batch)

    def _send(self, batch):
        try:
            body, headers = self.encode(batch)
        except Exception:
            if not self._encoding_failed:  # a bug, the same for every batch: its traceback once, then counts
                self._encoding_failed = True
                self.log.failure("{what}: could not encode {count} spans (later encoding errors are only "
                                 "counted)", what=self.what, count=len(batch))
            self._failed(len(batch), "encoding error")
            return
        self.in_flight += 1
        self.requests += 1
        d = self._agent.request(self.method, self._url, headers, FileBodyProducer(BytesIO(body)))
        self._pending.add(d)  # before the callbacks: a request that fails at once is forgotten at once
        d.addCallback(self._response)
        d.addTimeout(self.timeout, self.reactor)
        d.addCallbacks(self._answered, self._request_failed, callbackArgs=(len(batch),), errbackArgs=(len(batch),))
        d.addBoth(self._request_done, d)

    @staticmethod
    def _response(response):
        d = readBody(response)  # read it all, so the connection can be reused
        d.addCallback(lambda body: (response.code, body))
        return d

    def _answered(self, result, count: int) -> None:
        code, body = result
        if 200 <= code < 300:
            self.sent += count
        else:
            self._failed(count, f"HTTP {code}: {body[:200].decode('utf-8', 'replace')}")

    def _request_failed(self, failure, count: int) -> None:
        self._failed(count, failure.getErrorMessage() or failure.type.__name__)

    def _request_done(self, _, d) -> None:
        self._pending.discard(d)
        self.in_flight -= 1
        if len(self.queue) >= self.batch_size and self.running:
            self.flush()

    def _failed(self, count: int, reason: str) -> None:
        self.failed += count
        self.request_failures += 1
        self._unlogged_failures += 1
        self._last_error = reason
        now = self.reactor.seconds()
        if self._last_failure_log is None or now - self._last_failure_log >= self.log_interval:
            self._last_failure_log = now
            self.log.warn("{what} to {target} failed ({failures} failed {method}(s) since the last message; "
                          "{failed} span(s) lost so far, {dropped} dropped with the queue full); requests are "
                          "not affected: {reason}", what=self.what, target=self.target,
                          failures=self._unlogged_failures, method=self.method.decode(), failed=self.failed,
                          dropped=self.dropped, reason=reason)
            self._unlogged_failures = 0

    # -- service ------------------------------------------------------------------------
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
        self.max_in_flight += 1  # one more slot for the final batch even if requests hang
        self.flush()
        done = DeferredList(list(self._pending), consumeErrors=True)
        done.addTimeout(self.stop_timeout, self.reactor)
        done.addBoth(lambda _: self._pool.closeCachedConnections())
        return done

    def describe(self) -> dict:
        """The counters (see the class docstring), the queue's bound and the last error."""
        return {"queued": len(self.queue), "max_queue": self.max_queue, "sent": self.sent, "dropped": self.dropped,
                "failed": self.failed, "requests": self.requests, "request_failures": self.request_failures,
                "in_flight": self.in_flight, "last_error": self._last_error}
