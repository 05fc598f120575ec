"""txmesh-datadog: a sidecar's golden metrics to a Datadog agent over DogStatsD, and its spans to the
agent's trace intake.

A third-party plugin in every respect: it imports nothing of txmesh but
:mod:`mesh.api`, and registers through the ``mesh.plugins`` entry point as
``datadog``.  In ``twistd mesh-proxy``:

- ``mesh_request_complete`` counts each request in an in-process aggregate
  (:mod:`txmesh_datadog.aggregate`: one dict lookup, a counter, three list
  appends) tagged with Istio's labels (:mod:`txmesh_datadog.labels`);
  ``mesh_connection_open``/``_complete`` count TCP passthrough connections
  and their bytes.  A child service (:mod:`txmesh_datadog.statsd`) flushes
  the aggregate as DogStatsD datagrams every ``--datadog-flush-interval``,
  over UDP or a Unix datagram socket (:mod:`txmesh_datadog.wire` writes the
  format).
- the same hook hands the span ``builtin.tracing`` recorded
  (``ctx.extra["span"]``) to a batching writer that PUTs it to the agent's
  ``/v0.4/traces`` (:mod:`txmesh_datadog.traces`).

Per request there is no formatting and no I/O, and no thread anywhere.
Without an agent address (options, or Datadog's ``DD_*`` variables) the
plugin is idle.  README.md documents the metrics, tags and options.
"""

from __future__ import annotations

import os

from twisted.logger import Logger

from mesh.api import Config, ConnectionView, OptionParser, RequestOutcome, RequestView, hookimpl

from .addresses import parse_statsd_address, parse_trace_agent, statsd_target_from_env, trace_target_from_env
from .aggregate import DEFAULT_MAX_CONTEXTS, Aggregator
from .labels import PEER_METADATA, own_workload
from .statsd import DogStatsDFlusher
from .traces import TraceWriter
from .wire import parse_tags

__version__ = "0.1.0"

#: The plugin API this plugin is written for.
MESH_API_VERSION = 1

DEFAULT_FLUSH_INTERVAL = 2.0

log = Logger(namespace="txmesh_datadog")


def parse_interval(text: str) -> float:
    """``--datadog-flush-interval``: ``2s``, ``500ms`` or seconds (``1.5``), from 50 ms to 60 s."""
    value = text.strip().lower()
    scale = 1.0
    if value.endswith("ms"):
        value, scale = value[:-2], 0.001
    elif value.endswith("s"):
        value = value[:-1]
    try:
        seconds = float(value) * scale
    except ValueError:
        seconds = -1.0
    if not 0.05 <= seconds <= 60.0:
        raise ValueError(f"--datadog-flush-interval wants a duration from 50ms to 60s, e.g. 2s or 500ms, not {text!r}")
    return seconds


def parse_max_contexts(text: str) -> int:
    """``--datadog-max-contexts``: a whole number of tag sets, at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"--datadog-max-contexts wants a whole number of tag sets, at least 1, not {text!r}")
    return int(text)


class DatadogPlugin:
    """The ``datadog`` plugin of one process.

    ``aggregator`` and ``flusher`` exist when metrics go to a DogStatsD
    address, ``traces`` (a :class:`~txmesh_datadog.traces.TraceWriter`) when
    spans go to a trace agent; both are None while the plugin is idle.
    """

    MESH_API_VERSION = MESH_API_VERSION

    def __init__(self):
        self.aggregator = None
        self.flusher = None
        self.traces = None
        self.failures = 0

    @hookimpl
    def mesh_addoption(self, parser: OptionParser) -> None:
        parser.addoption("datadog-statsd", default=None, coerce=parse_statsd_address, role="proxy",
                         help="Send the golden metrics to this DogStatsD address: HOST:PORT (UDP) or unix:///PATH "
                              "(a Unix datagram socket); default: $DD_DOGSTATSD_URL, then $DD_AGENT_HOST "
                              "(and $DD_DOGSTATSD_PORT, 8125)")
        parser.addoption("datadog-trace-agent", default=None, coerce=parse_trace_agent, role="proxy",
                         help="Send the recorded spans (see --trace-sampling) to this Datadog trace agent: "
                              "http://HOST:PORT or unix:///PATH; default: $DD_TRACE_AGENT_URL, then $DD_AGENT_HOST "
                              "(and $DD_TRACE_AGENT_PORT, 8126)")
        parser.addoption("datadog-flush-interval", default=DEFAULT_FLUSH_INTERVAL, coerce=parse_interval,
                         role="proxy", help="How often the aggregated metrics are sent (e.g. 2s, 500ms)")
        parser.addoption("datadog-tags", default=(), coerce=parse_tags, role="proxy",
                         help="Tags added to every metric, comma-separated, e.g. env:prod,team:payments")
        parser.addoption("datadog-max-contexts", default=DEFAULT_MAX_CONTEXTS, coerce=parse_max_contexts,
                         role="proxy", help="Distinct tag sets reported at most; the traffic of further ones is "
                                            "counted under tags of value 'other'")

    @hookimpl
    def mesh_configure(self, config: Config) -> None:
        if config.role != "proxy":
            config.set_idle(self, "sidecars only")
            return
        statsd = config.option("datadog-statsd") or statsd_target_from_env(os.environ)
        traces = config.option("datadog-trace-agent") or trace_target_from_env(os.environ)
        if statsd is None and traces is None:
            config.set_idle(self, "no --datadog-statsd nor --datadog-trace-agent (nor $DD_AGENT_HOST, "
                                  "$DD_DOGSTATSD_URL, $DD_TRACE_AGENT_URL)")
            return
        if statsd is not None:
            own = own_workload(config.option("workload"), config.option("namespace"), config.option("labels") or {})
            self.aggregator = Aggregator(own, config.option("datadog-tags"), config.option("datadog-max-contexts"))
            self.flusher = DogStatsDFlusher(config.reactor, statsd, self.aggregator,
                                            config.option("datadog-flush-interval"))
            self.flusher.setServiceParent(config.service)
        if traces is not None:
            self.traces = TraceWriter(config.reactor, traces)
            self.traces.setServiceParent(config.service)
        log.info("datadog: metrics to {statsd}, spans to {traces}", statsd=str(statsd or "nowhere"),
                 traces=str(traces or "nowhere"))

    @hookimpl
    def mesh_request_complete(self, ctx: RequestView, outcome: RequestOutcome) -> None:
        """Count the request under its tags; queue its span, if one was recorded."""
        try:
            aggregator = self.aggregator
            if aggregator is not None:
                key = (ctx.direction, ctx.cluster, ctx.peer, ctx.host, ctx.response_code, ctx.response_flags,
                       ctx.extra.get(PEER_METADATA))
                series = aggregator.requests.get(key) or aggregator.request_series(key)
                series.observe(outcome.duration * 1000.0, ctx.bytes_received, ctx.bytes_sent)
            if self.traces is not None:
                span = ctx.extra.get("span")
                if span is not None:
                    self.traces.add(span)
        except Exception:
            self._failed()

    @hookimpl
    def mesh_connection_open(self, connection: ConnectionView) -> None:
        """Count a TCP passthrough connection opened (HTTP connections are counted per request)."""
        if connection.protocol == "tcp" and self.aggregator is not None:
            try:
                self._tcp(connection).counts[0] += 1
            except Exception:
                self._failed()

    @hookimpl
    def mesh_connection_complete(self, connection: ConnectionView) -> None:
        """Count a TCP passthrough connection closed, with its bytes."""
        if connection.protocol == "tcp" and self.aggregator is not None:
            try:
                counts = self._tcp(connection).counts
                counts[1] += 1
                counts[2] += connection.bytes_sent
                counts[3] += connection.bytes_received
            except Exception:
                self._failed()

    def _tcp(self, connection: ConnectionView):
        key = (connection.direction, connection.cluster, connection.response_flags)
        return self.aggregator.tcp.get(key) or self.aggregator.tcp_series(key)

    def _failed(self) -> None:
        """Log a bug caught in a hook on its 1st, 2nd, 4th, 8th... occurrence: the request goes on."""
        self.failures += 1
        if self.failures & (self.failures - 1) == 0:
            log.failure("datadog: a hook failed ({count} time(s) so far); the request itself was not affected",
                        count=self.failures)


#: What the ``datadog`` entry point registers.
plugin = DatadogPlugin()
