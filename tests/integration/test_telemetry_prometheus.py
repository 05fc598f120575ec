"""Istio's metrics and the access log, end to end: real sidecars, a real mesh-control, a real Prometheus.

A client sidecar (``frontend``, outbound only) calls a server sidecar (``user-service``, in front of the
demo app) over mTLS, with certificates from mesh-control; Prometheus scrapes both sidecars and the
control plane every second.  The traffic is known:

- warm-up, one of each, then 15 s of samples (Prometheus's ``increase()`` cannot see increments made
  before a series' first sample, and extrapolates what it sees to the whole window: the longer the
  samples span, the closer to the truth): a 503 while the app is not up yet, then a 200 and a 403
  (``/admin/*`` is denied by an AuthorizationPolicy);
- counted: 20 x 200, 5 x 403, 2 requests to ``ghost`` (a dead endpoint: 503 UF after two retries,
  never reaching the server), then the app is stopped and 4 x 503 (UF at the server sidecar).

The route to user-service has ``retries: {attempts: 0}``, so that every request the client sends is
exactly one request at the server.  Assertions use Istio's dashboard PromQL through Prometheus's
HTTP API, and the access-log files of both sidecars.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.harness import free_port, wait_for
from tests.integration.test_identity_support import authorization_policy, mesh_endpoint
from tests.integration.test_proxy_support import curl_many, endpoint, service_entry, virtual_service, write_config
from tests.integration.test_telemetry_support import (
    ISTIO_MILLISECONDS_LINT,
    Prometheus,
    access_log,
    promtool_check,
    scrape,
)

NS = "shop"
USER_SERVICE = f"user-service.{NS}.svc.cluster.local"
WARM_UP = {"200": 1, "403": 1, "503": 1}
WARM_UP_SAMPLES = 15  # seconds of samples before the counted traffic
COUNTED = {"200": 20, "403": 5, "503": 4}
GHOST_REQUESTS = 2
DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "txmesh-overview.json"
DESTINATION_BY_CODE = 'sum(increase(istio_requests_total{reporter="destination"}[1m])) by (response_code)'


def sent(*parts) -> dict:
    return dict(sum((Counter(part) for part in parts), Counter()))


@pytest.fixture(scope="module")
def mesh(control_factory, backend_factory, proxy_factory, process_log_dir, tmp_path_factory):
    control = control_factory()
    app_port, inbound_port = free_port(), free_port()
    config = write_config(
        tmp_path_factory.mktemp("telemetry-config"),
        service_entry("user-service", [mesh_endpoint(inbound_port, "user-service", app="user-service",
                                                     version="v1")], namespace=NS),
        virtual_service("user-service", ["user-service"], [
            {"route": [{"destination": {"host": "user-service"}}], "retries": {"attempts": 0}}], namespace=NS),
        service_entry("ghost", [endpoint(("127.0.0.1", free_port()))], namespace=NS),
        authorization_policy("no-admin", NS, selector={"app": "user-service"}, action="DENY",
                             rules=[{"to": [{"operation": {"paths": ["/admin/*"]}}]}]),
    )
    logs = tmp_path_factory.mktemp("access-logs")
    ports = {"server": free_port(), "client": free_port()}
    server = proxy_factory(config, "user-service", namespace=NS, app_port=app_port, inbound_port=inbound_port,
                           labels={"app": "user-service", "version": "v1"},
                           extra_args=[*control.proxy_args(NS, "user-service"), "--metrics-port", ports["server"],
                                       "--access-log", logs / "server.log"])
    client = proxy_factory(config, "frontend", namespace=NS, labels={"app": "frontend", "version": "v2"},
                           extra_args=[*control.proxy_args(NS, "frontend"), "--metrics-port", ports["client"],
                                       "--access-log", logs / "client.log"])
    prometheus = Prometheus({
        "sidecars": ("/stats/prometheus", [f"127.0.0.1:{ports['server']}", f"127.0.0.1:{ports['client']}"]),
        "mesh-control": ("/metrics", [f"127.0.0.1:{control.admin_port}"]),
    }, log_dir=process_log_dir).start()
    mesh = {"control": control, "server": server, "client": client, "prometheus": prometheus, "ports": ports,
            "logs": logs}
    try:
        _warm_up(mesh, backend_factory, app_port)
        _counted_traffic(mesh)
        yield mesh
    finally:
        prometheus.stop()


def _send(client, path, count, host="user-service") -> Counter:
    return Counter(line.split()[0] for line in curl_many(client.outbound_url + path, count, host=host,
                                                         write_out="%{http_code}"))


def _totals(prometheus, reporter="destination") -> dict:
    """The raw counters (exact): ``{response code: requests}`` as ``reporter`` counted them."""
    totals = prometheus.by(f'sum(istio_requests_total{{reporter="{reporter}"}}) by (response_code)', "response_code")
    return {code: int(value) for code, value in totals.items()}


def _warm_up(mesh, backend_factory, app_port):
    client, prometheus = mesh["client"], mesh["prometheus"]
    assert _send(client, "/", 1) == {"503": 1}, "the app is not up yet: the server sidecar answers 503"
    mesh["app"] = backend_factory("user-service", port=app_port)
    assert _send(client, "/", 1) + _send(client, "/admin/users", 1) == {"200": 1, "403": 1}
    wait_for(lambda: _totals(prometheus) == WARM_UP, 30, interval=0.5,
             what="Prometheus to scrape the warm-up requests")
    samples = 'min(count_over_time(istio_requests_total{reporter="destination"}[1m]))'
    wait_for(lambda: prometheus.query(samples)[0][1] >= WARM_UP_SAMPLES, 60, interval=0.5,
             what=f"{WARM_UP_SAMPLES} samples of every series")


def _counted_traffic(mesh):
    client, prometheus = mesh["client"], mesh["prometheus"]
    assert _send(client, "/", COUNTED["200"]) == {"200": COUNTED["200"]}
    assert _send(client, "/admin/users", COUNTED["403"]) == {"403": COUNTED["403"]}
    assert _send(client, "/", GHOST_REQUESTS, host="ghost") == {"503": GHOST_REQUESTS}
    mesh["app"].stop()
    assert _send(client, "/", COUNTED["503"]) == {"503": COUNTED["503"]}
    wait_for(lambda: _totals(prometheus) == sent(WARM_UP, COUNTED)
             and _totals(prometheus, "source") == sent(WARM_UP, COUNTED, {"503": GHOST_REQUESTS}), 30,
             interval=0.5, what="Prometheus to scrape the counted requests from both sidecars")


# -- Prometheus ----------------------------------------------------------------------------------------

def test_prometheus_scrapes_both_sidecars_and_the_control_plane(mesh):
    up = {labels["instance"]: value for labels, value in mesh["prometheus"].query("up")}
    assert up == {f"127.0.0.1:{mesh['ports']['server']}": 1, f"127.0.0.1:{mesh['ports']['client']}": 1,
                  f"127.0.0.1:{mesh['control'].admin_port}": 1}


def test_requests_by_response_code_match_the_traffic(mesh):
    """Istio's dashboard query counts what was sent.  Prometheus extrapolates ``increase()`` from the
    samples it has to the window (by at most about a scrape interval at each end), so the counted
    traffic is a lower bound and ~15 % above it the upper one; the raw counters are exact."""
    prometheus = mesh["prometheus"]
    assert _totals(prometheus) == sent(WARM_UP, COUNTED)
    increase = prometheus.by(DESTINATION_BY_CODE, "response_code")
    assert set(increase) == set(COUNTED)
    for code, count in COUNTED.items():
        assert count - 0.01 <= increase[code] <= count * 1.2 + 0.5, (code, increase)
    assert _totals(prometheus, "source") == {"200": 21, "403": 6, "503": 5 + GHOST_REQUESTS}


def test_success_rate(mesh):
    rate = mesh["prometheus"].query(
        'sum(rate(istio_requests_total{reporter="destination", response_code!~"5.*"}[1m]))'
        ' / sum(rate(istio_requests_total{reporter="destination"}[1m]))')
    expected = (COUNTED["200"] + COUNTED["403"]) / sum(COUNTED.values())
    assert rate and rate[0][1] == pytest.approx(expected, abs=0.1)


def test_p99_latency_is_a_sane_number_of_milliseconds(mesh):
    [(_, p99)] = mesh["prometheus"].query(
        "histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket[1m])) by (le))")
    assert 0 < p99 < 1000


def test_labels_name_both_sides_of_the_call(mesh):
    query = 'sum(istio_requests_total{response_code="200"}) by (reporter, source_workload, source_principal, ' \
            'destination_service, destination_app, destination_version, destination_principal, ' \
            'connection_security_policy)'
    rows = {labels["reporter"]: labels for labels, _ in mesh["prometheus"].query(query)}
    spiffe = f"spiffe://cluster.local/ns/{NS}/sa/"
    assert rows["source"] == {
        "reporter": "source", "source_workload": "frontend", "source_principal": spiffe + "frontend",
        "destination_service": USER_SERVICE, "destination_app": "user-service", "destination_version": "v1",
        "destination_principal": spiffe + "user-service", "connection_security_policy": "unknown"}
    assert rows["destination"] == {
        "reporter": "destination", "source_workload": "frontend", "source_principal": spiffe + "frontend",
        "destination_service": USER_SERVICE, "destination_app": "user-service", "destination_version": "v1",
        "destination_principal": spiffe + "user-service", "connection_security_policy": "mutual_tls"}
    flags = mesh["prometheus"].by('sum(istio_requests_total{reporter="destination"}) by (response_flags)',
                                  "response_flags")
    assert flags["-"] == 21 and sorted(flags) == ["-", "RBAC", "UF"]  # the flag; the policy is in the access log


def test_proxy_health_metrics(mesh):
    prometheus = mesh["prometheus"]
    ghost = f"outbound|80||ghost.{NS}.svc.cluster.local"
    assert prometheus.by("sum(mesh_upstream_rq_retry_total) by (cluster)", "cluster") == {ghost: 2 * GHOST_REQUESTS}
    assert prometheus.by("sum(mesh_outlier_ejections_total) by (cluster)", "cluster")[ghost] >= 1
    opened = prometheus.by("sum(mesh_upstream_cx_opened_total) by (cluster)", "cluster")
    assert opened[f"outbound|80||{USER_SERVICE}"] >= 1 and opened[f"inbound|{mesh['app'].port}||"] >= 1
    expiry = prometheus.query("mesh_workload_cert_expiry_seconds")
    assert len(expiry) == 2 and all(0 < value <= 24 * 3600 for _, value in expiry)
    assert len(prometheus.query("mesh_config_info")) == 2
    assert all(0 <= value < 600 for _, value in prometheus.query("mesh_config_age_seconds"))


def test_control_plane_metrics(mesh):
    prometheus = mesh["prometheus"]
    [(_, signed)] = prometheus.query("mesh_control_csr_signed_total")
    assert signed >= 2
    [(_, expiry)] = prometheus.query("mesh_control_ca_cert_expiry_seconds")
    assert expiry > 30 * 24 * 3600


def test_promtool_accepts_every_metrics_endpoint(mesh):
    """Only the unit in Istio's own name is flagged (kept: dashboards query it by that name)."""
    ports = mesh["ports"]
    for port, path in ((ports["server"], "/stats/prometheus"), (ports["client"], "/stats/prometheus")):
        assert promtool_check(scrape(port, path)) == [ISTIO_MILLISECONDS_LINT]
    assert promtool_check(scrape(mesh["control"].admin_port, "/metrics")) == []


def test_every_dashboard_query_runs_on_the_scraped_metrics(mesh):
    """Grafana's variables replaced (all namespaces, services and workloads; a 1m rate interval)."""
    board = json.loads(DASHBOARD.read_text())
    empty = []
    for panel in board["panels"]:
        for target in panel.get("targets", ()):
            expr = target["expr"].replace("$__rate_interval", "1m")
            for variable in ("$namespace", "$service", "$workload"):
                expr = expr.replace(variable, ".*")
            if not mesh["prometheus"].query(expr):  # fails the test on a PromQL error
                empty.append(panel["title"])
    for title in ("Global request volume", "Global success rate (non-5xx)", "Requests by service",
                  "Request duration (all services)", "Upstream connections", "Config age",
                  "Workload certificate expiry", "Connected proxies", "CA certificate expiry",
                  "Requests by response code", "Requests by caller", "mTLS"):
        assert title not in empty, f"{title}: no data"


# -- access log ------------------------------------------------------------------------------------------

def _entries(mesh, name: str, count: int) -> list:
    path = mesh["logs"] / f"{name}.log"
    return wait_for(lambda: (lambda entries: entries if len(entries) >= count else None)(access_log(path)), 10,
                    what=f"{count} lines in {path}")


def test_server_access_log_has_one_line_per_request(mesh):
    entries = _entries(mesh, "server", sum(sent(WARM_UP, COUNTED).values()))
    assert len(entries) == sum(sent(WARM_UP, COUNTED).values())
    assert Counter(str(entry["response_code"]) for entry in entries) == sent(WARM_UP, COUNTED)
    assert {entry["direction"] for entry in entries} == {"inbound"}
    flags = Counter((entry["response_code"], entry["response_flags"]) for entry in entries)
    assert flags == {(200, "-"): 21, (403, "RBAC"): 6, (503, "UF"): 5}
    denied = next(entry for entry in entries if entry["response_code"] == 403)
    assert (denied["authz_policy"], denied["path"]) == ("shop/no-admin", "/admin/users")
    assert denied["response_code_details"] == "rbac_access_denied_matched_policy[shop/no-admin]"
    assert denied["source_principal"] == f"spiffe://cluster.local/ns/{NS}/sa/frontend"


def test_client_access_log_has_one_line_per_request(mesh):
    total = sum(sent(WARM_UP, COUNTED).values()) + GHOST_REQUESTS
    entries = _entries(mesh, "client", total)
    assert len(entries) == total
    ghost = [entry for entry in entries if entry["authority"] == "ghost"]
    assert len(ghost) == GHOST_REQUESTS
    assert all(entry["response_code"] == 503 and set(entry["response_flags"].split(",")) == {"UF", "URX"}
               for entry in ghost)
    served = [entry for entry in entries if entry["authority"] == "user-service"]
    assert Counter((entry["response_code"], entry["response_flags"]) for entry in served) == \
        {(200, "-"): 21, (403, "-"): 6, (503, "-"): 5}
    ok = next(entry for entry in served if entry["response_code"] == 200)
    assert ok["response_code_details"] == "via_upstream"
    assert ok["upstream_cluster"] == f"outbound|80||{USER_SERVICE}" and ok["destination_principal"].endswith(
        "/sa/user-service")
    assert ok["duration"] >= int(ok["upstream_service_time"]) >= 0 and ok["trace_id"]  # whole ms, as Envoy's
