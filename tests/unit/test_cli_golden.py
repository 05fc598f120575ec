"""meshctl stat's arithmetic (mesh.cli.golden): Prometheus's histogram_quantile, grouping, counter resets."""

from __future__ import annotations

import math

import pytest

from mesh.cli import golden

INF = math.inf


@pytest.mark.parametrize("q, buckets, expected", [
    (0.5, {1.0: 0, 5.0: 10, 10.0: 10, INF: 10}, 3.0),        # inside the (1, 5] bucket: 1 + 4 * 5/10
    (0.5, {5.0: 10, INF: 10}, 2.5),                          # the first bucket starts at 0
    (0.99, {1.0: 0, 5.0: 10, INF: 20}, 5.0),                 # rank in +Inf: the highest finite bound
    (0.95, {10.0: 80, 25.0: 100, INF: 100}, 21.25),          # 10 + 15 * (95 - 80) / 20
    (0.5, {5.0: 0, INF: 0}, None),                           # no observations
    (0.5, {}, None),
])
def test_quantile_is_prometheus_histogram_quantile(q, buckets, expected):
    assert golden.quantile(q, buckets) == expected


def test_rows_group_by_workload_and_count_5xx_as_failures():
    grouping = golden.GROUPINGS["workload"]
    labels = {"reporter": "destination", "destination_workload": "reviews", "destination_workload_namespace": "shop"}
    requests = [({**labels, "response_code": "200"}, 8.0), ({**labels, "response_code": "503"}, 2.0),
                ({**labels, "response_code": "404"}, 0.0),
                ({**labels, "reporter": "source", "response_code": "200"}, 50.0)]  # the other reporter: left out
    buckets = [({**labels, "le": "5"}, 6.0), ({**labels, "le": "10"}, 10.0), ({**labels, "le": "+Inf"}, 10.0)]
    [row] = golden.rows(golden.group(requests, buckets, grouping), seconds=5.0)
    assert row["name"] == ["shop", "reviews"] and row["requests"] == 10 and row["rps"] == 2.0
    assert row["success_rate"] == 0.8 and row["p50_ms"] == 5 * 5 / 6 and row["p99_ms"] == 5 + 5 * 3.9 / 4


def test_counter_deltas_handle_a_restarted_sidecar():
    before = {frozenset({"code": "200"}.items()): 10.0, frozenset({"code": "500"}.items()): 7.0}
    after = {frozenset({"code": "200"}.items()): 15.0, frozenset({"code": "500"}.items()): 2.0,
             frozenset({"code": "404"}.items()): 1.0}
    assert sorted((labels["code"], delta) for labels, delta in golden.counter_deltas(before, after)) == [
        ("200", 5.0), ("404", 1.0), ("500", 2.0)]


def test_formats():
    assert [golden.format_ms(v) for v in (None, 0.5, 12.0, 2500.0)] == ["-", "500us", "12ms", "2.5s"]
    assert golden.format_rate(None) == "-" and golden.format_rate(0.8) == "80.00%"
