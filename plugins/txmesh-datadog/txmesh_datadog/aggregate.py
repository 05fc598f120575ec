"""In-process aggregation of the golden metrics, flushed as DogStatsD lines (Datadog's client-side
"aggregation" mode).

Per request, the hot path finds the request's :class:`RequestSeries` with one
tuple key and one dict lookup (the tags of a new key are worked out once, by
:mod:`txmesh_datadog.labels`) and calls :meth:`RequestSeries.observe`: a
counter increment and three list appends.  No formatting, no I/O.  Each
flush turns what the series gathered since the last one into DogStatsD lines,
series by series (:meth:`Aggregator.drain`), and starts them over.

Distributions keep at most :data:`MAX_SAMPLES` values per series and flush
(a uniform reservoir sample when there were more requests); the lines then
carry the sample rate, so the agent still counts every request.  The request
count itself is exact.

**Bounded cardinality.**  At most ``max_contexts`` distinct tag sets are ever
reported.  A request or connection whose tag set would be one more is
counted in its reporter's *overflow* context, whose tags are ``other`` but
for ``reporter`` (and ``request_protocol``), and in
``txmesh.datadog.overflow``; the first time it happens, a warning is logged.
"""

from __future__ import annotations

from random import random

from twisted.logger import Logger

from . import labels
from .wire import count_line, distribution_lines

log = Logger(namespace="txmesh_datadog")

#: Metric names (Datadog's: lower case, dot-separated).
PREFIX = "txmesh."
REQUEST_COUNT = PREFIX + "request.count"
REQUEST_DURATION = PREFIX + "request.duration"
REQUEST_SIZE = PREFIX + "request.size"
RESPONSE_SIZE = PREFIX + "response.size"
TCP_OPENED = PREFIX + "tcp.connections_opened"
TCP_CLOSED = PREFIX + "tcp.connections_closed"
TCP_SENT = PREFIX + "tcp.sent_bytes"
TCP_RECEIVED = PREFIX + "tcp.received_bytes"
OVERFLOW = PREFIX + "datadog.overflow"

#: Values kept per distribution, series and flush interval.
MAX_SAMPLES = 128
DEFAULT_MAX_CONTEXTS = 500
#: Request keys remembered (many keys share a tag set); the key cache starts over past this.
MIN_KEY_CACHE = 1024


class RequestSeries:
    """What one request tag set gathered since the last flush: the request count, and samples of the
    duration (milliseconds), request and response body sizes (bytes), index-aligned."""

    __slots__ = ("tags", "count", "durations", "request_sizes", "response_sizes")

    def __init__(self, tags: str):
        self.tags = tags
        self.count = 0
        self.durations = []
        self.request_sizes = []
        self.response_sizes = []

    def observe(self, milliseconds: float, received: int, sent: int) -> None:
        """Count one request (the per-request work: Vitter's algorithm R past :data:`MAX_SAMPLES`)."""
        count = self.count = self.count + 1
        durations = self.durations
        if len(durations) < MAX_SAMPLES:
            durations.append(milliseconds)
            self.request_sizes.append(received)
            self.response_sizes.append(sent)
            return
        slot = int(random() * count)
        if slot < MAX_SAMPLES:
            durations[slot] = milliseconds
            self.request_sizes[slot] = received
            self.response_sizes[slot] = sent

    def lines(self, max_bytes: int) -> list[str]:
        """The DogStatsD lines of what was gathered, and start over; [] when nothing was."""
        count = self.count
        if not count:
            return []
        tags = self.tags
        rate = len(self.durations) / count
        lines = [count_line(REQUEST_COUNT, count, tags)]
        lines += distribution_lines(REQUEST_DURATION, ":".join(map("%.3f".__mod__, self.durations)), rate, tags,
                                    max_bytes)
        lines += distribution_lines(REQUEST_SIZE, ":".join(map(str, self.request_sizes)), rate, tags, max_bytes)
        lines += distribution_lines(RESPONSE_SIZE, ":".join(map(str, self.response_sizes)), rate, tags, max_bytes)
        self.count = 0
        self.durations, self.request_sizes, self.response_sizes = [], [], []
        return lines


class TcpSeries:
    """What one TCP tag set gathered since the last flush: connections opened and closed, bytes sent to
    and received from the client."""

    __slots__ = ("tags", "counts")

    NAMES = (TCP_OPENED, TCP_CLOSED, TCP_SENT, TCP_RECEIVED)

    def __init__(self, tags: str):
        self.tags = tags
        self.counts = [0, 0, 0, 0]

    def lines(self, max_bytes: int) -> list[str]:
        """COUNT lines of the non-zero counters, and start over (each line is short: ``max_bytes`` is not
        needed)."""
        lines = [count_line(name, value, self.tags) for name, value in zip(self.NAMES, self.counts) if value]
        self.counts = [0, 0, 0, 0]
        return lines


class Aggregator:
    """The series of one sidecar, by request key and by tag set, with the cardinality cap.

    :param own: this sidecar's :class:`txmesh_datadog.labels.Workload`.
    :param constant_tags: ``--datadog-tags``, added to every line.
    :param max_contexts: the cap on distinct tag sets (request and TCP together).
    """

    def __init__(self, own: labels.Workload, constant_tags: tuple = (), max_contexts: int = DEFAULT_MAX_CONTEXTS):
        self.own = own
        self.constant_tags = tuple(constant_tags)
        self.constant_text = ",".join(self.constant_tags)
        self.max_contexts = max_contexts
        #: tag text -> series: every context reported so far (at most ``max_contexts``)
        self.contexts = {}
        #: (series class, reporter) -> the overflow series
        self._overflow_contexts = {}
        #: request key -> RequestSeries; TCP key -> TcpSeries (caches: cleared when too large)
        self.requests = {}
        self.tcp = {}
        self._key_cache_size = max(MIN_KEY_CACHE, 4 * max_contexts)
        #: requests and connections counted in an overflow context (as of the last flush)
        self.overflowed = 0

    # -- binding a new key (once per key, not per request) ------------------------------------------
    def request_series(self, key: tuple) -> RequestSeries:
        """The series of a request key ``(direction, cluster, peer, host, code, flags, peer metadata)``."""
        if len(self.requests) >= self._key_cache_size:
            self.requests.clear()
        values = labels.request_values(self.own, *key)
        series = self.requests[key] = self._context(labels.REQUEST_TAGS, values, RequestSeries)
        return series

    def tcp_series(self, key: tuple) -> TcpSeries:
        """The series of a TCP key ``(direction, cluster, flags)``."""
        if len(self.tcp) >= self._key_cache_size:
            self.tcp.clear()
        values = labels.tcp_values(self.own, *key)
        series = self.tcp[key] = self._context(labels.TCP_TAGS, values, TcpSeries)
        return series

    def _context(self, names: tuple, values: tuple, kind):
        text = labels.tag_text(names, values, self.constant_tags)
        series = self.contexts.get(text)
        if series is not None:
            return series
        if len(self.contexts) < self.max_contexts:
            series = self.contexts[text] = kind(text)
            return series
        return self._overflow(names, values[0], kind)

    def _overflow(self, names: tuple, reporter: str, kind):
        key = (kind, reporter)
        series = self._overflow_contexts.get(key)
        if series is None:
            if not self._overflow_contexts:
                log.warn("datadog: {count} distinct tag sets reached (--datadog-max-contexts); requests and "
                         "connections of new ones are counted under the tags of value 'other' and in "
                         "{metric}", count=self.max_contexts, metric=OVERFLOW)
            protocol = "http" if kind is RequestSeries else "tcp"
            text = labels.tag_text(names, labels.overflow_values(names, reporter, protocol), self.constant_tags)
            series = self._overflow_contexts[key] = kind(text)
        return series

    # -- flushing ----------------------------------------------------------------------------------
    def drain(self, max_bytes: int):
        """Yield the DogStatsD lines of each series in turn (a list per series) and start it over, then
        the overflow count.  A generator, so that a flush can yield to the reactor between series;
        contexts that appear meanwhile wait for the next flush."""
        overflowed = 0
        for series in list(self.contexts.values()):
            yield series.lines(max_bytes)
        for series in list(self._overflow_contexts.values()):
            # requests, or connections opened
            overflowed += series.count if isinstance(series, RequestSeries) else series.counts[0]
            yield series.lines(max_bytes)
        if overflowed:
            self.overflowed += overflowed
            yield [count_line(OVERFLOW, overflowed, self.constant_text)]
