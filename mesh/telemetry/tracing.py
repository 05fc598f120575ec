"""Built-in distributed tracing: the plugin ``builtin.tracing``.

One span per sidecar hop, as Envoy does in Istio: a CLIENT span on the
outbound listener, a SERVER span on the inbound listener.  Per request:

1. ``mesh_request_headers`` (after routing, before the upstream head is
   built) reads the incoming context (:mod:`mesh.telemetry.tracing_context`),
   starts a trace when none came, decides sampling, picks this hop's span id,
   and rewrites the trace headers of the forwarded request so that this span
   is the downstream's parent.  It sets ``ctx.extra["trace_id"]`` and
   ``ctx.extra["trace"]`` (a :class:`Hop`).
2. ``mesh_request_complete`` (``tryfirst``, so other plugins see the ids)
   finishes the span: when sampled it builds a :class:`Span`, stores it in
   ``ctx.extra["span"]`` (the OTLP plugin reads it there) and queues it on the
   Zipkin exporter, if one is configured.  A request answered before routing
   (404 NR, 403 RBAC) gets its hop here.

Sampling: the caller's decision wins (sampled flag 1 -> record, 0 -> don't);
with no decision, ``--trace-sampling`` percent of requests are recorded.  The
context is propagated whether or not the request is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from random import random

from mesh import hookimpl
from mesh.telemetry.peers import canonical_names
from mesh.telemetry.tracing_context import extract, inject, new_span_id, new_trace_id

#: Istio's default sampling rate (meshConfig.defaultConfig.tracing.sampling), in percent.
DEFAULT_SAMPLING = 1.0


@dataclass(frozen=True)
class TracingSettings:
    """``--zipkin-url``, ``--trace-sampling`` (percent, 0-100) and ``--zipkin-max-queue``."""

    zipkin_url: str = None
    sampling: float = DEFAULT_SAMPLING
    zipkin_max_queue: int = 2048


class Hop:
    """This sidecar's place in the trace of one request (``ctx.extra["trace"]``).

    ``trace_id``, ``span_id`` (this hop's span), ``parent_id`` (the caller's
    span, None for a root span), ``sampled``; ``incoming`` is the parsed
    :class:`~mesh.telemetry.tracing_context.Incoming` or None.
    """

    __slots__ = ("trace_id", "span_id", "parent_id", "sampled", "incoming")

    def __init__(self, trace_id, span_id, parent_id, sampled, incoming):
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.incoming = incoming


class Span:
    """A finished, sampled span (``ctx.extra["span"]``): what exporters send.

    Times are epoch microseconds; ``kind`` is ``"CLIENT"`` or ``"SERVER"``;
    ``service`` is ``<workload>.<namespace>``; ``remote_ip``/``remote_port``
    may be None; ``tags`` maps str to str.
    """

    __slots__ = ("trace_id", "span_id", "parent_id", "kind", "name", "start_us", "duration_us",
                 "service", "remote_ip", "remote_port", "tags")

    def __init__(self, trace_id, span_id, parent_id, kind, name, start_us, duration_us, service,
                 remote_ip, remote_port, tags):
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.kind = kind
        self.name = name
        self.start_us = start_us
        self.duration_us = duration_us
        self.service = service
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.tags = tags

    def to_zipkin(self) -> dict:
        """The Zipkin v2 JSON object of this span."""
        span = {"traceId": self.trace_id, "id": self.span_id, "kind": self.kind, "name": self.name,
                "timestamp": self.start_us, "duration": self.duration_us,
                "localEndpoint": {"serviceName": self.service}, "tags": self.tags}
        if self.parent_id:
            span["parentId"] = self.parent_id
        if self.remote_ip:
            remote = {"ipv6" if ":" in self.remote_ip else "ipv4": self.remote_ip}
            if self.remote_port:
                remote["port"] = self.remote_port
            span["remoteEndpoint"] = remote
        return span


class Tracer:
    """The ``builtin.tracing`` plugin object for one sidecar.

    :param workload: :class:`mesh.config.compile.Workload` of this sidecar.
    :param address: this workload's IP, for ``node_id``.
    :param sampling: percent of requests to record when the caller did not decide.
    :param exporter: a :class:`mesh.telemetry.zipkin.ZipkinExporter`, or None.
    """

    def __init__(self, workload, address, sampling=DEFAULT_SAMPLING, exporter=None):
        self.sampling = float(sampling)
        self._rate = self.sampling / 100.0
        self.exporter = exporter
        namespace = workload.namespace
        self.service = f"{workload.name}.{namespace}"
        canonical, revision = canonical_names(workload.labels or {}, workload.name)
        self.node_id = f"sidecar~{address}~{workload.name}.{namespace}~{namespace}.svc.cluster.local"
        self._static_tags = {
            "component": "proxy",
            "node_id": self.node_id,
            "istio.canonical_service": canonical,
            "istio.canonical_revision": revision,
            "istio.namespace": namespace,
            "workload": workload.name,
        }
        self._names = {}

    # -- hooks ---------------------------------------------------------------------------
    @hookimpl
    def mesh_request_headers(self, ctx):
        """Start this hop's span and forward the context with it as the parent."""
        hop = self._hop(ctx)
        return inject(hop.trace_id, hop.span_id, hop.parent_id, hop.sampled, hop.incoming)

    @hookimpl(tryfirst=True)
    def mesh_request_complete(self, ctx, outcome):
        """Finish the span; record it when sampled."""
        extra = ctx.extra
        hop = extra.get("trace")
        if hop is None:
            hop = self._hop(ctx)  # answered before routing: no headers were forwarded
        if not hop.sampled:
            return
        span = self._finish(ctx, outcome, hop)
        extra["span"] = span
        if self.exporter is not None:
            self.exporter.add(span)

    # -- internals -----------------------------------------------------------------------
    def _hop(self, ctx) -> Hop:
        incoming = extract(ctx.headers)
        if incoming is not None and incoming.trace_id is not None:
            trace_id = incoming.trace_id
            parent_id = incoming.parent_id
        else:
            trace_id = new_trace_id()
            parent_id = None
        if incoming is not None and incoming.sampled is not None:
            sampled = incoming.sampled
        else:
            sampled = random() < self._rate
        hop = Hop(trace_id, new_span_id(), parent_id, sampled, incoming)
        extra = ctx.extra
        extra["trace"] = hop
        extra["trace_id"] = trace_id
        return hop

    def _finish(self, ctx, outcome, hop) -> Span:
        outbound = ctx.direction == "outbound"
        status = ctx.response_code
        tags = dict(self._static_tags)
        tags["http.method"] = ctx.method
        tags["http.url"] = ctx.uri_path
        tags["http.protocol"] = "HTTP/" + ctx.http_version
        tags["http.status_code"] = str(status)
        tags["response_flags"] = ctx.response_flags or "-"
        tags["upstream_cluster"] = ctx.cluster or "-"
        tags["guid:x-request-id"] = ctx.request_id
        tags["peer.address"] = ctx.source_address
        if ctx.upstream_host:
            tags["upstream_address"] = ctx.upstream_host
        if ctx.peer:
            tags["peer.principal"] = ctx.peer
        user_agent = ctx.headers.get("user-agent")
        if user_agent:
            tags["user_agent"] = user_agent
        if status >= 500 or status == 0:
            tags["error"] = "true"
        if outbound:
            remote_ip, _, port = (ctx.upstream_host or "").rpartition(":")
            remote_port = int(port) if port.isdigit() else None
        else:
            remote_ip, remote_port = ctx.source_address, None
        return Span(hop.trace_id, hop.span_id, hop.parent_id, "CLIENT" if outbound else "SERVER",
                    self._name(ctx, outbound), int(ctx.start * 1e6), max(1, int(outcome.duration * 1e6)),
                    self.service, remote_ip.strip("[]") or None, remote_port, tags)

    def _name(self, ctx, outbound) -> str:
        """Istio's span name ``<host>:<port>/*``: the cluster's service outbound, the Host inbound."""
        key = ctx.cluster if outbound and ctx.cluster else ctx.authority
        name = self._names.get(key)
        if name is None:
            if len(self._names) > 4096:
                self._names.clear()
            name = self._names[key] = _span_name(ctx.cluster if outbound else None, ctx.host, ctx.authority)
        return name

    def describe(self) -> dict:
        """For the admin ``/config_dump``."""
        return {"sampling_percent": self.sampling,
                "zipkin": self.exporter.describe() if self.exporter is not None else None}


def _span_name(cluster, host, authority) -> str:
    if cluster and cluster.startswith("outbound|"):
        _, port, _, fqdn = cluster.split("|", 3)
        return f"{fqdn}:{port}/*"
    _, sep, port = (authority or b"").decode("latin-1").rpartition(":")
    if not sep or not port.isdigit():
        port = "80"
    return f"{host}:{port}/*"
