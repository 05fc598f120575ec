"""meshctl stat against real sidecars found through a real control plane, and through a real Prometheus.

The mesh is :func:`tests.integration.test_meshctl_observe_support.observed_mesh`.  Traffic goes
from productpage to reviews-v2 (``/v2/*``: no split), so the counts are exact.
"""

from __future__ import annotations

import json

import pytest

from mesh.cli import stat_sources
from tests.harness import free_port, wait_for
from tests.integration.test_meshctl_observe_support import (
    meshctl,
    observed_mesh,
    start_meshctl,
    wait_for_stderr_line,
)
from tests.integration.test_proxy_support import curl_many
from tests.integration.test_telemetry_support import Prometheus


@pytest.fixture(scope="module")
def mesh(control_factory, backend_factory, process_log_dir, tmp_path_factory):
    mesh, stop = observed_mesh(control_factory, backend_factory, process_log_dir, tmp_path_factory.mktemp("mesh"))
    yield mesh
    stop()


def send(client, ok: int, failed: int) -> None:
    """``ok`` x 200 and ``failed`` x 500 from productpage to reviews-v2 (the app answers /status/N)."""
    for path, count, code in (("/v2/status/200", ok, "200"), ("/v2/status/500", failed, "500")):
        if count:
            assert set(curl_many(f"{client.outbound_url}{path}", count, host="reviews",
                                 write_out="%{http_code}")) == {code}


def stat(*args):
    """Run meshctl stat in the background and wait for its first round of scrapes."""
    proc = start_meshctl("stat", *args)
    wait_for_stderr_line(proc, "sampling 3 sidecar(s)")
    return proc


def test_stat_per_workload_from_the_sidecars(mesh):
    proc = stat("--control-admin", mesh["control_admin"], "--window", "3s", "-o", "json")
    send(mesh["productpage"], ok=8, failed=2)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    rows = {tuple(row["name"]): row for row in json.loads(out)["rows"]}
    row = rows[("default", "reviews-v2")]
    assert row["requests"] == 10 and row["success_rate"] == 0.8 and row["rps"] > 0
    assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert ("default", "reviews-v1") not in rows  # no request reached it in the window
    proc = stat("reviews-v2", "--control-admin", mesh["control_admin"], "--window", "2s")
    send(mesh["productpage"], ok=3, failed=1)
    out, err = proc.communicate(timeout=30)
    header, line = out.splitlines()
    assert header.split() == ["NAMESPACE", "WORKLOAD", "SUCCESS", "RPS", "P50", "P95", "P99", "REQUESTS"]
    assert line.split()[:3] == ["default", "reviews-v2", "75.00%"] and line.split()[-1] == "4"


def test_stat_per_service_as_the_callers_saw_it(mesh):
    client = mesh["productpage"]
    metrics = [f"127.0.0.1:{proxy.metrics_port}" for proxy in (client, mesh["reviews-v1"], mesh["reviews-v2"])]
    proc = start_meshctl("stat", "--by", "service", "--window", "3s", "-o", "json",
                         *[arg for address in metrics for arg in ("--metrics", address)])
    wait_for_stderr_line(proc, "sampling 3 sidecar(s)")
    send(client, ok=5, failed=0)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    [row] = json.loads(out)["rows"]
    assert row["name"] == ["reviews.default.svc.cluster.local", "v2"] and row["requests"] == 5
    assert row["success_rate"] == 1.0


def test_stat_without_traffic_or_sources_says_what_to_do(mesh):
    code, out, err = meshctl("stat", "ratings", "--control-admin", mesh["control_admin"], "--window", "1s")
    assert code == 0 and out.startswith("no requests for ratings in the last 1s (3 sidecar(s))")
    assert "send some traffic or widen --window" in out
    port = free_port()
    code, out, err = meshctl("stat", "--control-admin", f"127.0.0.1:{port}")
    assert code == 1 and out == "" and f"cannot reach the control plane's admin port at http://127.0.0.1:{port}" in err
    code, out, err = meshctl("stat", "--metrics", f"127.0.0.1:{port}", "--window", "1s")
    assert code == 1 and f"no sidecar could be scraped: cannot scrape http://127.0.0.1:{port}/stats/prometheus" in err
    assert f"--metrics-port {port}" in err
    code, out, err = meshctl("stat", "--prometheus", f"http://127.0.0.1:{port}")
    assert code == 1 and f"cannot reach Prometheus at http://127.0.0.1:{port}" in err
    assert "give --prometheus the server's base URL" in err
    code, out, err = meshctl("stat", "--window", "ten seconds")
    assert code == 2 and "invalid duration 'ten seconds'" in err


def test_stat_through_prometheus_agrees_with_prometheus(mesh, process_log_dir):
    """A real Prometheus scrapes the sidecars every second; meshctl asks it with PromQL."""
    client, server = mesh["productpage"], mesh["reviews-v2"]
    prometheus = Prometheus({"sidecars": ("/stats/prometheus", [f"127.0.0.1:{client.metrics_port}",
                                                                f"127.0.0.1:{server.metrics_port}"])},
                            log_dir=process_log_dir).start()
    try:
        # both series exist before the counted traffic (increase() cannot see what came before a series'
        # first sample), with 8 s of samples: increase() extrapolates by up to half a scrape interval at
        # each end, so a short history would make the two answers below, a second apart, differ a lot
        send(client, ok=1, failed=1)
        selector = 'istio_requests_total{reporter="destination",destination_workload="reviews-v2"}'
        wait_for(lambda: prometheus.query(f'min(count_over_time({selector}[1m])) >= 8'), timeout=30,
                 what="8 samples of every reviews-v2 series in Prometheus")
        send(client, ok=8, failed=2)
        requests, _ = stat_sources.scrape("127.0.0.1", server.metrics_port)
        total = sum(value for labels, value in requests.items() if ("reporter", "destination") in labels)
        wait_for(lambda: prometheus.query(f"sum({selector}) == {total}"), timeout=20,
                 what="Prometheus to scrape the counted traffic")
        code, out, err = meshctl("stat", "reviews-v2", "--prometheus", f"http://127.0.0.1:{prometheus.port}",
                                 "--window", "30s", "-o", "json")
        assert code == 0, err
        [row] = json.loads(out)["rows"]
        increase = prometheus.query(f"sum(increase({selector}[30s]))")[0][1]
        expected = prometheus.query(f'sum(increase({selector[:-1]},response_code!~"5.."}}[30s])) '
                                    f'/ sum(increase({selector}[30s]))')[0][1]
        p50 = prometheus.query('histogram_quantile(0.5, sum by (le) (increase(istio_request_duration_milliseconds_'
                               'bucket{reporter="destination",destination_workload="reviews-v2"}[30s])))')[0][1]
    finally:
        prometheus.stop()
    # increase() is extrapolated and may see earlier tests' traffic too: compare with Prometheus's own answers
    assert row["name"] == ["default", "reviews-v2"] and row["requests"] == pytest.approx(increase, rel=0.2)
    assert row["requests"] >= 10 and row["rps"] == pytest.approx(row["requests"] / 30, rel=0.2)
    assert row["success_rate"] == pytest.approx(expected, abs=0.05) and 0.6 < row["success_rate"] < 0.95
    assert row["p50_ms"] == pytest.approx(p50, rel=0.05)
