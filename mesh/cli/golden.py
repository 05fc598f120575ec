"""Golden metrics (success rate, requests per second, latency percentiles) from Istio's metrics.

Pure functions shared by both sources of ``meshctl stat``: two scrapes of the sidecars (their
difference) or Prometheus (``increase()`` over the window).  Either way the input is *increases*
over a known number of seconds: ``istio_requests_total`` by ``response_code`` and
``istio_request_duration_milliseconds`` buckets by ``le``, per group.

A request succeeds unless its ``response_code`` is 5xx, as Istio's dashboards and linkerd count.
Percentiles are interpolated within the histogram buckets exactly as Prometheus's
``histogram_quantile`` does, so both sources agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

REQUESTS = "istio_requests_total"
BUCKETS = "istio_request_duration_milliseconds_bucket"


@dataclass(frozen=True)
class Grouping:
    """How ``meshctl stat --by X`` groups series: the reporter to read and the label(s) naming a row."""

    reporter: str
    labels: tuple
    headers: tuple


GROUPINGS = {
    # what the workload's own sidecar saw arrive (as linkerd viz stat deploy)
    "workload": Grouping("destination", ("destination_workload_namespace", "destination_workload"),
                         ("NAMESPACE", "WORKLOAD")),
    # what the callers' sidecars saw, per destination service and version (failures that never reached it too)
    "service": Grouping("source", ("destination_service", "destination_version"), ("SERVICE", "VERSION")),
}

QUANTILES = (0.5, 0.95, 0.99)


@dataclass
class Traffic:
    """Increases of one group over the window: requests by status code, cumulative duration buckets by ``le``."""

    codes: dict = field(default_factory=dict)
    buckets: dict = field(default_factory=dict)

    @property
    def requests(self) -> float:
        return sum(self.codes.values())

    @property
    def success_rate(self):
        """Share of non-5xx responses, or None without requests."""
        total = self.requests
        if total <= 0:
            return None
        failed = sum(rate for code, rate in self.codes.items() if str(code).startswith("5"))
        return (total - failed) / total


def group(request_increases, bucket_increases, grouping: Grouping) -> dict:
    """``{group key: Traffic}`` from ``[(labels, increase)]`` of both metrics (other reporters left out)."""
    traffic = {}
    for samples, add in ((request_increases, _add_code), (bucket_increases, _add_bucket)):
        for labels, increase in samples:
            if labels.get("reporter", grouping.reporter) != grouping.reporter:
                continue
            key = tuple(labels.get(name, "unknown") for name in grouping.labels)
            add(traffic.setdefault(key, Traffic()), labels, increase)
    return traffic


def _add_code(traffic, labels, increase):
    code = labels.get("response_code", "unknown")
    traffic.codes[code] = traffic.codes.get(code, 0.0) + increase


def _add_bucket(traffic, labels, increase):
    bound = float(labels["le"])
    traffic.buckets[bound] = traffic.buckets.get(bound, 0.0) + increase


def quantile(q: float, buckets: dict):
    """Prometheus's ``histogram_quantile(q, ...)`` over ``{upper bound: cumulative count}``; None if empty."""
    bounds = sorted(buckets)
    if len(bounds) < 2 or bounds[-1] != math.inf or buckets[math.inf] <= 0:
        return None
    rank = q * buckets[math.inf]
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:
                return previous_bound  # the highest finite bound, as Prometheus answers
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    return previous_bound


def rows(traffic: dict, seconds: float) -> list:
    """One dict per group with requests (sorted): name, requests, rps, success_rate, p50/p95/p99 (ms)."""
    out = []
    for key, group_traffic in sorted(traffic.items()):
        requests = group_traffic.requests
        if requests <= 0:
            continue
        row = {"name": list(key), "requests": round(requests), "rps": requests / seconds,
               "success_rate": group_traffic.success_rate}
        for q in QUANTILES:
            row[f"p{round(q * 100)}_ms"] = quantile(q, group_traffic.buckets)
        out.append(row)
    return out


def counter_deltas(before: dict, after: dict) -> list:
    """``[(labels, increase)]`` between two scrapes of ``{label items: value}``.

    A series that went down was reset (its sidecar restarted): its increase
    is its new value, as Prometheus's ``rate()`` counts it.
    """
    deltas = []
    for key, value in after.items():
        previous = before.get(key, 0.0)
        deltas.append((dict(key), value - previous if value >= previous else value))
    return deltas


def format_ms(value) -> str:
    """A latency for a table: ``850us``, ``12ms``, ``1.5s``; ``-`` when unknown."""
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}us"
    if value < 1000:
        return f"{value:.3g}ms"
    return f"{value / 1000:.3g}s"


def format_rate(value) -> str:
    """A success rate as a percentage, ``-`` when unknown."""
    return "-" if value is None else f"{value * 100:.2f}%"
