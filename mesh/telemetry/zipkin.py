"""Export finished spans to Zipkin: v2 JSON, batched, over HTTP POST.

:class:`ZipkinExporter` is a Twisted service.  ``add(span)`` is all the data
path does: append to a bounded queue (or count a drop when it is full).  A
flush runs every ``interval`` seconds, and soon after the queue reaches
``batch_size``; it serialises up to ``batch_size`` spans to one JSON array and
POSTs it with :class:`twisted.web.client.Agent` (non-blocking, persistent
connections, a timeout).  At most ``max_in_flight`` POSTs are outstanding;
while they are, spans wait in the queue, and past ``max_queue`` they are
dropped and counted.  A failed POST loses its batch (no retry: the queue must
stay bounded) and is logged at most once per ``log_interval`` seconds, with
the number of failures since the last message.
"""

from __future__ import annotations

import json
from io import BytesIO

from twisted.application import service
from twisted.internet.defer import DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, _HTTP11ClientFactory, readBody
from twisted.web.http_headers import Headers

log = Logger()

class _QuietFactory(_HTTP11ClientFactory):
    """No "Starting factory" / "Stopping factory" log lines for every connection to the collector."""

    noisy = False


_HEADERS = Headers({b"content-type": [b"application/json"], b"user-agent": [b"txmesh-proxy"]})


class ZipkinExporter(service.Service):
    """Batches spans (objects with ``to_zipkin() -> dict``) to a Zipkin v2 ``/api/v2/spans`` URL.

    Counters, for ``describe()``: ``queued`` (now), ``sent`` (spans accepted
    by the collector), ``dropped`` (queue full), ``failed`` (spans in POSTs
    that failed), ``posts`` and ``post_failures``.
    """

    name = "zipkin-exporter"

    def __init__(self, reactor, url: str, *, max_queue: int = 2048, batch_size: int = 100,
                 interval: float = 1.0, timeout: float = 5.0, max_in_flight: int = 2,
                 log_interval: float = 10.0, stop_timeout: float = 2.0):
        self.reactor = reactor
        self.url = url
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
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self.posts = 0
        self.post_failures = 0
        self._unlogged_failures = 0
        self._last_failure_log = None
        self._last_error = None
        self._flush_soon = None
        self._pending = set()
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = max_in_flight
        pool.retryAutomatically = False
        pool._factory = _QuietFactory
        self._pool = pool
        self._agent = Agent(reactor, connectTimeout=timeout, pool=pool)
        self._loop = LoopingCall(self.flush)
        self._loop.clock = reactor

    # -- data path ------------------------------------------------------------------
    def add(self, span) -> None:
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
        """POST queued spans, one batch per free in-flight slot."""
        while self.queue and self.in_flight < self.max_in_flight:
            batch = self.queue[:self.batch_size]
            del self.queue[:self.batch_size]
            self._post(batch)

    def _post(self, batch):
        try:
            body = json.dumps([span.to_zipkin() for span in batch], separators=(",", ":")).encode()
        except Exception:
            log.failure("could not serialise {count} spans for Zipkin", count=len(batch))
            self._failed(len(batch), "serialisation error")
            return
        self.in_flight += 1
        self.posts += 1
        d = self._agent.request(b"POST", self._url, _HEADERS, FileBodyProducer(BytesIO(body)))
        d.addCallback(self._response)
        d.addTimeout(self.timeout, self.reactor)
        d.addCallbacks(self._posted, self._post_failed, callbackArgs=(len(batch),), errbackArgs=(len(batch),))
        d.addBoth(self._post_done)
        self._pending.add(d)
        d.addBoth(self._forget, d)

    def _forget(self, result, d):
        self._pending.discard(d)
        return result

    @staticmethod
    def _response(response):
        d = readBody(response)  # read it all, so the connection can be reused
        d.addCallback(lambda body: (response.code, body))
        return d

    def _posted(self, result, count):
        code, body = result
        if 200 <= code < 300:
            self.sent += count
        else:
            self._failed(count, f"HTTP {code}: {body[:200].decode('utf-8', 'replace')}")

    def _post_failed(self, failure, count):
        self._failed(count, failure.getErrorMessage() or failure.type.__name__)

    def _post_done(self, _):
        self.in_flight -= 1
        if len(self.queue) >= self.batch_size and self.running:
            self.flush()

    def _failed(self, count, reason):
        self.failed += count
        self.post_failures += 1
        self._unlogged_failures += 1
        self._last_error = reason
        now = self.reactor.seconds()
        if self._last_failure_log is None or now - self._last_failure_log >= self.log_interval:
            self._last_failure_log = now
            log.warn("Zipkin export to {url} failed ({failures} failed POST(s) since the last message; "
                     "{dropped} span(s) dropped so far, queue full): {reason}",
                     url=self.url, failures=self._unlogged_failures, dropped=self.dropped, reason=reason)
            self._unlogged_failures = 0

    # -- service ------------------------------------------------------------------------
    def startService(self):
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self):
        """Flush what is queued (best effort, bounded by the timeout), then close connections."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        self.max_in_flight += 1  # one more slot for the final batch even if POSTs hang
        self.flush()
        done = DeferredList(list(self._pending), consumeErrors=True)
        done.addTimeout(self.stop_timeout, self.reactor)
        done.addBoth(lambda _: self._pool.closeCachedConnections())
        return done

    def describe(self) -> dict:
        return {"url": self.url, "queued": len(self.queue), "max_queue": self.max_queue, "sent": self.sent,
                "dropped": self.dropped, "failed": self.failed, "posts": self.posts,
                "post_failures": self.post_failures, "in_flight": self.in_flight, "last_error": self._last_error}
