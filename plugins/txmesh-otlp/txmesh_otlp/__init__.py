"""OTLP/HTTP export of txmesh spans, through the OpenTelemetry SDK.

``builtin.tracing`` finishes each sampled span in ``mesh_request_complete``
(``tryfirst``) and leaves it in ``ctx.extra["span"]`` (a
:class:`mesh.telemetry.tracing.Span`).  This plugin's ``mesh_request_complete``
runs after it, turns that span into an SDK ``ReadableSpan`` with the same ids,
parent, kind, times and tags, and hands it to a ``BatchSpanProcessor`` around
an ``OTLPSpanExporter``.

Nothing here blocks the reactor: ``BatchSpanProcessor.on_end`` appends to a
bounded ``deque`` and at most sets a ``threading.Event``; the SDK's worker
thread does the batching and the HTTP POSTs.  The processor (and its thread)
is created at the first span, only when an endpoint is configured:
``twistd mesh-proxy --otlp-endpoint URL``, or the environment variables of
README.md.  Without one the plugin stays idle (none of its hooks is called).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from mesh import hookimpl

__version__ = "0.1.0"

#: Seconds between two log messages about failed exports.
LOG_INTERVAL = 10.0
#: Seconds the reactor waits, at shutdown, for the queue to be flushed.
SHUTDOWN_TIMEOUT = 3.0


def endpoint_from_env(environ=os.environ):
    """The traces URL to export to, or None when OTLP export is not configured."""
    base = environ.get("MESH_OTLP_ENDPOINT")
    if base:
        return base.rstrip("/") + "/v1/traces"
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return environ["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces"
    return None


class OtlpSink:
    """Converts :class:`mesh.telemetry.tracing.Span` objects and feeds the SDK's batch processor."""

    def __init__(self, endpoint, reactor=None):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # Failures are reported by _CountingExporter, at most once per LOG_INTERVAL; without this,
        # the SDK logs every failed batch and every dropped span through the stdlib logging module.
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
        self.endpoint = endpoint
        self.exporter = _CountingExporter(OTLPSpanExporter(endpoint=endpoint), endpoint, reactor)
        self.processor = BatchSpanProcessor(self.exporter)
        self._resources = {}
        self._types = _sdk_types()
        if reactor is not None:
            reactor.addSystemEventTrigger("before", "shutdown", self.shutdown, reactor)

    def add(self, span) -> None:
        """Queue one span for export (non-blocking)."""
        self.processor.on_end(self._readable(span))

    def _readable(self, span):
        t = self._types
        trace_id = int(span.trace_id, 16)
        context = t.SpanContext(trace_id, int(span.span_id, 16), is_remote=False, trace_flags=t.SAMPLED)
        parent = None
        if span.parent_id:
            parent = t.SpanContext(trace_id, int(span.parent_id, 16), is_remote=True, trace_flags=t.SAMPLED)
        attributes = dict(span.tags)
        status_code = attributes.get("http.status_code", "")
        if status_code.isdigit():
            attributes["http.response.status_code"] = int(status_code)
        if span.remote_ip:
            attributes["network.peer.address"] = span.remote_ip
            if span.remote_port:
                attributes["network.peer.port"] = span.remote_port
        start = span.start_us * 1000
        return t.ReadableSpan(
            name=span.name, context=context, parent=parent, resource=self._resource(span.service),
            attributes=attributes, kind=t.CLIENT if span.kind == "CLIENT" else t.SERVER,
            status=t.ERROR if attributes.get("error") == "true" else t.UNSET,
            start_time=start, end_time=start + span.duration_us * 1000, instrumentation_scope=t.scope)

    def _resource(self, service):
        resource = self._resources.get(service)
        if resource is None:
            workload, _, namespace = service.partition(".")
            resource = self._resources[service] = self._types.Resource.create(
                {"service.name": service, "service.namespace": namespace, "k8s.namespace.name": namespace})
        return resource

    def shutdown(self, reactor):
        """Flush and stop the processor in a thread; the reactor waits SHUTDOWN_TIMEOUT at most."""
        from twisted.internet.defer import Deferred

        done = Deferred()

        def finish(_=None):
            if not done.called:
                done.callback(None)

        def run():
            try:
                self.processor.shutdown()
            finally:
                reactor.callFromThread(finish)

        threading.Thread(target=run, name="otlp-shutdown", daemon=True).start()
        reactor.callLater(SHUTDOWN_TIMEOUT, finish)
        return done


class _CountingExporter:
    """Wraps the OTLP exporter: counts spans, logs failures at most once per LOG_INTERVAL."""

    def __init__(self, exporter, endpoint, reactor):
        self._exporter = exporter
        self._endpoint = endpoint
        self._reactor = reactor
        self.sent = 0
        self.failed = 0
        self._failures_since_log = 0
        self._last_log = None

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = self._exporter.export(spans)
        except Exception as error:  # the SDK worker thread must survive anything
            result, reason = SpanExportResult.FAILURE, repr(error)
        else:
            reason = "the collector refused or did not answer"
        if result is SpanExportResult.SUCCESS:
            self.sent += len(spans)
        else:
            self.failed += len(spans)
            self._failures_since_log += 1
            now = time.monotonic()
            if self._last_log is None or now - self._last_log >= LOG_INTERVAL:
                self._last_log = now
                self._log(self._failures_since_log, reason)
                self._failures_since_log = 0
        return result

    def _log(self, failures, reason):
        from twisted.logger import Logger

        def emit():
            Logger(namespace="txmesh_otlp").warn(
                "OTLP export to {endpoint} failed ({failures} failed batch(es) since the last message; "
                "{failed} span(s) lost so far): {reason}",
                endpoint=self._endpoint, failures=failures, failed=self.failed, reason=reason)

        if self._reactor is not None:
            self._reactor.callFromThread(emit)  # log from the reactor thread
        else:
            emit()

    def shutdown(self, *args, **kwargs):
        return self._exporter.shutdown(*args, **kwargs)

    def force_flush(self, timeout_millis=30000):
        return self._exporter.force_flush(timeout_millis)


class _sdk_types:
    """The SDK names used per span, looked up once (the SDK is imported only when export is on)."""

    def __init__(self):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode

        self.Resource = Resource
        self.ReadableSpan = ReadableSpan
        self.SpanContext = SpanContext
        self.SAMPLED = TraceFlags(TraceFlags.SAMPLED)
        self.CLIENT = SpanKind.CLIENT
        self.SERVER = SpanKind.SERVER
        self.ERROR = Status(StatusCode.ERROR)
        self.UNSET = Status(StatusCode.UNSET)
        self.scope = InstrumentationScope("txmesh", __version__)


OPTION = "otlp-endpoint"


def traces_url(base):
    """``BASE/v1/traces`` for ``--otlp-endpoint BASE``; ValueError (a usage error) unless it is http(s)."""
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"--{OPTION} wants the collector's base URL, http://HOST:4318, not {base!r}")
    return base.rstrip("/") + "/v1/traces"


class OtlpPlugin:
    """The ``otlp`` plugin of one sidecar: idle unless an endpoint is configured.

    ``endpoint`` is the traces URL, from ``--otlp-endpoint`` or else the
    environment (:func:`endpoint_from_env`); the :class:`OtlpSink` (and the
    SDK's worker thread) is made at the first span.
    """

    MESH_API_VERSION = 1

    def __init__(self):
        self.endpoint = None
        self.reactor = None
        self._sink = None

    @hookimpl
    def mesh_addoption(self, parser):
        parser.addoption(OPTION, default=None, coerce=traces_url, role="proxy",
                         help="Export the sidecar's spans over OTLP/HTTP to this collector (base URL, e.g. "
                              "http://otel-collector:4318; spans go to URL/v1/traces); default: "
                              "$MESH_OTLP_ENDPOINT, then the OpenTelemetry variables")

    @hookimpl
    def mesh_configure(self, config):
        if config.role != "proxy":
            config.set_idle(self, "sidecars only")
            return
        self.endpoint = config.option(OPTION) or endpoint_from_env()
        if self.endpoint is None:
            config.set_idle(self, f"no --{OPTION} (nor $MESH_OTLP_ENDPOINT)")
            return
        self.reactor = config.reactor

    @hookimpl
    def mesh_request_complete(self, ctx, outcome):
        """Export the span ``builtin.tracing`` recorded for this request, if any."""
        span = ctx.extra.get("span")
        if span is not None:
            if self._sink is None:
                self._sink = OtlpSink(self.endpoint, self.reactor)
            self._sink.add(span)


#: What the ``otlp`` entry point registers.
plugin = OtlpPlugin()
