"""deploy/grafana/txmesh-overview.json: a valid Grafana dashboard whose queries use only metrics txmesh exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh.telemetry.control import ControlPlaneMetrics
from mesh.telemetry.exposition import new_registry
from mesh.telemetry.health import ProxyHealth
from mesh.telemetry.istio import IstioMetrics
from tests.unit.test_telemetry_support import (
    PRODUCTPAGE,
    control_like,
    done,
    inbound,
    outbound,
    peers,
    proxy_like,
)

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "txmesh-overview.json"
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "Inf", "NaN"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board) -> list:
    return [panel for panel in board["panels"] if panel["type"] != "row"]


def expressions(board) -> list:
    """Every PromQL expression: panel targets and template variable queries."""
    exprs = [target["expr"] for panel in panels(board) for target in panel["targets"]]
    exprs += [variable["query"]["query"] for variable in board["templating"]["list"] if variable["type"] == "query"]
    return exprs


def metric_names(expr: str) -> set:
    """The metric names a PromQL expression reads (``label_values(m, l)`` reads ``m``)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings, matchers' values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,[^)]*\)", r"\1", expr)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr))
    return names - PROMQL_WORDS


def exported_names() -> set:
    """Sample names of a sidecar that served requests both ways and of the control plane."""
    registry = new_registry()
    metrics = IstioMetrics(PRODUCTPAGE, peers())
    for ctx in (outbound(200, attempts=2), inbound(403)):
        metrics.mesh_request_complete(ctx, done(ctx))
    registry.register(metrics)
    registry.register(ProxyHealth(proxy_like()))
    names = set()
    for source in (registry, ControlPlaneMetrics(control_like()).registry):
        for family in text_string_to_metric_families(generate_latest(source).decode()):
            names.update(sample.name for sample in family.samples)
    return names


def test_metric_names_of_promql():
    assert metric_names('sum(rate(istio_requests_total{reporter="destination", response_code!~"5.*"}'
                        '[$__rate_interval])) by (le, destination_service) / sum(up) or vector(0)') == \
        {"istio_requests_total", "up"}
    assert metric_names('label_values(istio_requests_total{a=~"$x"}, destination_service)') == \
        {"istio_requests_total"}


def test_every_query_reads_metrics_txmesh_exports():
    exported = exported_names()
    used = set().union(*(metric_names(expr) for expr in expressions(dashboard())))
    assert used and used <= exported, f"not exported: {sorted(used - exported)}"
    assert {"istio_requests_total", "istio_request_duration_milliseconds_bucket", "mesh_control_pushes_total",
            "mesh_upstream_cx_active"} <= used


def test_it_is_a_grafana_dashboard_model():
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in board["templating"]["list"]}
    assert {"datasource", "namespace", "service", "workload"} <= variables
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and grid["x"] + grid["w"] <= 24, panel["title"]
    for panel in panels(board):
        assert panel["type"] in ("stat", "timeseries") and panel["datasource"]["uid"] == "${datasource}"
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
    text = json.dumps(board)
    used = set(re.findall(r"\$\{?([a-zA-Z_]+)", text)) - {"__rate_interval"}
    assert used <= variables, f"undefined variables: {used - variables}"


@pytest.mark.parametrize("title", ["Mesh overview", "Proxy health", "Control plane", "Service detail: $service"])
def test_rows(title):
    assert title in [panel["title"] for panel in dashboard()["panels"] if panel["type"] == "row"]
