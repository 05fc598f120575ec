"""The sidecar's own health metrics (``mesh_*``), read from live state at scrape time.

Nothing here runs per request: :class:`ProxyHealth` walks the clusters,
listeners, config and certificate of the proxy when Prometheus scrapes.
(Retries are the exception: they are counted as requests complete, by
:mod:`mesh.telemetry.istio`, because no live state remembers them.)
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector


class ProxyHealth(Collector):
    """Collector of a :class:`mesh.proxy.service.ProxyService`'s health.

    Reads ``proxy.runtime.snapshot`` (clusters and their endpoints' pools,
    loads and ejections; each endpoint's ``pool`` is read through ``open_count()`` and
    ``opened_total``, so any pool with those works), ``proxy.listeners``, ``proxy.config_applied_at``
    (``reactor.seconds()`` when a config was last applied, from the config
    dir or a control-plane push), ``proxy.credentials`` and ``proxy.mirror_stats`` (the mirror stage's
    counters).  Per-cluster figures sum the cluster's endpoints; an
    endpoint shared by a service's cluster and a subset's cluster counts in both.
    """

    def __init__(self, proxy):
        self._proxy = proxy

    def collect(self):
        proxy = self._proxy
        now = proxy.reactor.seconds()
        snapshot = proxy.runtime.snapshot
        yield from _cluster_families(snapshot.clusters if snapshot is not None else {}, now)
        yield from _listener_families(proxy.listeners)
        yield from _mirror_families(proxy.mirror_stats)
        if snapshot is not None:
            yield InfoMetricFamily("mesh_config", "The config in force.", value={"version": snapshot.config.version})
        if proxy.config_applied_at is not None:  # None: waiting for the control plane's first push
            yield GaugeMetricFamily("mesh_config_age_seconds", "Seconds since the config in force was applied.",
                                    value=now - proxy.config_applied_at)
        credentials = proxy.credentials.current
        if credentials is not None:
            yield GaugeMetricFamily("mesh_workload_cert_expiry_seconds",
                                    "Seconds until the workload certificate expires.", value=credentials.expires_in())


def _listener_families(listeners):
    """Per-listener connections, limit and overload (:mod:`mesh.proxy.overload`)."""
    label = ("listener",)
    active = GaugeMetricFamily("mesh_downstream_cx_active", "Open client connections, per listener.", labels=label)
    limit = GaugeMetricFamily("mesh_downstream_cx_limit", "The connection limit of the listener (--max-connections, "
                              "fitted to the file-descriptor limit).", labels=label)
    overloaded = GaugeMetricFamily("mesh_downstream_cx_overloaded", "1 while the listener is overloaded (from 90 % "
                                   "of its limit until below 80 %).", labels=label)
    closed = CounterMetricFamily("mesh_downstream_cx_overload_closed", "Idle client connections closed to admit "
                                 "new ones near the limit.", labels=label)
    overflow = CounterMetricFamily("mesh_downstream_cx_overflow", "Client connections refused at the limit, "
                                   "nothing idle being left to close.", labels=label)
    for listener in listeners:
        name, overload = (listener.direction,), listener.overload
        active.add_metric(name, len(listener.connections))
        limit.add_metric(name, overload.limit)
        overloaded.add_metric(name, int(overload.active))
        closed.add_metric(name, overload.closed_idle)
        overflow.add_metric(name, overload.refused)
    return active, limit, overloaded, closed, overflow


def _mirror_families(stats):
    """The request copies of the mirror stage: ``stats`` has the counters of
    :class:`mesh.proxy.mirror.MirrorStats` (``sent``, ``completed``, ``failed``, ``abandoned``,
    ``in_flight``), process-wide."""
    ended = CounterMetricFamily("mesh_mirror_requests", "Request copies to mirrors that ended, by result: completed "
                                "(a whole response came back), failed (connect failure, reset or timeout), abandoned "
                                "(never sent: body over 64 KiB, no endpoint, 256 copies already in flight, or the "
                                "client went before its body was complete).",
                                labels=("result",))
    for result in ("completed", "failed", "abandoned"):
        ended.add_metric((result,), getattr(stats, result))
    sent = CounterMetricFamily("mesh_mirror_requests_sent", "Request copies written to a mirror.", value=stats.sent)
    active = GaugeMetricFamily("mesh_mirror_requests_active", "Request copies in flight (connecting, sent or "
                               "awaiting their response).", value=stats.in_flight)
    return ended, sent, active


def _cluster_families(clusters, now):
    """Per-cluster connection, load, outlier-detection, retry-budget and circuit-breaking families (the
    overflow counters list only the clusters with limits)."""
    active = GaugeMetricFamily("mesh_upstream_cx_active", "Open upstream connections.", labels=("cluster",))
    opened = CounterMetricFamily("mesh_upstream_cx_opened", "Upstream connections opened.", labels=("cluster",))
    in_flight = GaugeMetricFamily("mesh_upstream_rq_active", "Tries in flight to the cluster's endpoints.",
                                  labels=("cluster",))
    ejections = CounterMetricFamily("mesh_outlier_ejections", "Outlier-detection ejections of the cluster's endpoints.",
                                    labels=("cluster",))
    ejected = GaugeMetricFamily("mesh_outlier_ejected_endpoints", "Endpoints ejected now.", labels=("cluster",))
    overflows = [CounterMetricFamily(f"mesh_upstream_{name}", help_text, labels=("cluster",)) for name, help_text in (
        ("cx_overflow", "Times the cluster's maxConnections circuit breaker made a request wait "
                        "or closed a TCP connection (UO)."),
        ("rq_pending_overflow", "Requests refused 503 UO by the cluster's http1MaxPendingRequests or "
                                "http2MaxRequests circuit breaker."),
        ("rq_retry_overflow", "Retries not made because of the cluster's maxRetries circuit breaker."))]
    budget_exhausted = CounterMetricFamily("mesh_upstream_rq_retry_budget_exhausted",
                                           "Retries not made because the cluster's retry budget was used up.",
                                           labels=("cluster",))
    for name in sorted(clusters):
        endpoints = clusters[name].endpoints
        label = (name,)
        active.add_metric(label, sum(endpoint.pool.open_count() for endpoint in endpoints))
        opened.add_metric(label, sum(endpoint.pool.opened_total for endpoint in endpoints))
        in_flight.add_metric(label, sum(endpoint.active_requests for endpoint in endpoints))
        ejections.add_metric(label, sum(endpoint.ejections for endpoint in endpoints))
        ejected.add_metric(label, sum(1 for endpoint in endpoints if endpoint.ejected_until > now))
        budget_exhausted.add_metric(label, clusters[name].retry_budget.exhausted)
        breaker = clusters[name].breaker
        if breaker is not None:
            for family, count in zip(overflows, (breaker.cx_overflow, breaker.pending_overflow,
                                                 breaker.retry_overflow)):
                family.add_metric(label, count)
    return active, opened, in_flight, ejections, ejected, budget_exhausted, *overflows
