"""Spans to the Datadog agent's trace intake: ``PUT /v0.4/traces``, JSON, batched off the request path.

``builtin.tracing`` finishes each sampled span in ``mesh_request_complete``
(``tryfirst``) and leaves it in ``ctx.extra["span"]``, as the OTLP plugin
reads it.  The plugin hands it to :meth:`TraceWriter.add`, which appends it
to a bounded queue (or counts a drop when the queue is full): that is all the
request path does.  :class:`TraceWriter` is a :class:`mesh.api.SpanExporter`,
which batches, sends and counts; it adds only the payload: every ``interval``
seconds, or as soon as a batch is full, a batch is converted
(:func:`datadog_span`), grouped by trace and PUT (non-blocking, persistent
connections, a timeout) to ``http://HOST:8126`` or over the agent's Unix
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

from twisted.web.http_headers import Headers

from mesh.api import SpanExporter

from .addresses import TraceTarget

PATH = "/v0.4/traces"
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


class TraceWriter(SpanExporter):
    """Batches spans to the trace agent (see the module docstring).

    Counters (:meth:`~mesh.api.SpanExporter.describe`): ``queued`` (now),
    ``sent`` (spans the agent accepted), ``dropped`` (queue full), ``failed``
    (spans in PUTs that failed), ``requests`` (PUTs) and ``request_failures``.
    """

    name = "datadog-traces"
    what = "datadog: sending spans"
    method = b"PUT"
    log_namespace = "txmesh_datadog"

    def __init__(self, reactor, target: TraceTarget, *, batch_size: int = 256, **options):
        url = ("http://localhost" if target.path else target.url) + PATH  # over a Unix socket: the path only
        super().__init__(reactor, url, unix_path=target.path, target=str(target), batch_size=batch_size, **options)

    def encode(self, batch: list) -> tuple[bytes, Headers]:
        """The v0.4 payload, and the header that counts its traces."""
        body, traces = payload(batch)
        return body, Headers({b"content-type": [b"application/json"], b"user-agent": [b"txmesh-datadog"],
                              b"x-datadog-trace-count": [str(traces).encode()],
                              b"datadog-meta-lang": [b"python"], b"datadog-meta-tracer-version": [b"txmesh"]})
