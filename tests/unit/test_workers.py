"""``--workers N`` (mesh.proxy.workers): the option, and merging the workers' metrics into one scrape."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.python import usage

from mesh.proxy.tap import Options
from mesh.proxy.workers import WorkerSettings, merge_metrics

_BASE = ["--workload", "web", "--config-dir", "."]


@pytest.mark.parametrize("argv", [["--workers", "3"], ["--concurrency", "3"], ["--concurrency=3"]])
def test_workers_and_its_envoy_alias_concurrency(argv):
    options = Options()
    options.parseOptions([*_BASE, *argv])
    assert options["workers"] == 3


def test_workers_default_to_one_process():
    options = Options()
    options.parseOptions(_BASE)
    assert options["workers"] == 1


@pytest.mark.parametrize("value", ["0", "two", "65"])
def test_a_bad_number_of_workers_says_what_is_expected(value):
    with pytest.raises(usage.UsageError, match="from 1 to 64"):
        Options().parseOptions([*_BASE, "--concurrency", value])


def _samples(text: bytes) -> dict:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text.decode()) for sample in family.samples}


WORKER_1 = """# HELP istio_requests_total Requests.
# TYPE istio_requests_total counter
istio_requests_total{response_code="200"} 3
istio_requests_total{response_code="503"} 1
# HELP istio_request_duration_milliseconds Duration.
# TYPE istio_request_duration_milliseconds histogram
istio_request_duration_milliseconds_bucket{le="1"} 2
istio_request_duration_milliseconds_bucket{le="+Inf"} 4
istio_request_duration_milliseconds_sum 7.5
istio_request_duration_milliseconds_count 4
# HELP mesh_downstream_cx_active Open connections.
# TYPE mesh_downstream_cx_active gauge
mesh_downstream_cx_active{listener="outbound"} 2
# HELP mesh_workload_cert_expiry_seconds Seconds until the certificate expires.
# TYPE mesh_workload_cert_expiry_seconds gauge
mesh_workload_cert_expiry_seconds 100
"""
WORKER_2 = """# HELP istio_requests_total Requests.
# TYPE istio_requests_total counter
istio_requests_total{response_code="200"} 5
# HELP istio_request_duration_milliseconds Duration.
# TYPE istio_request_duration_milliseconds histogram
istio_request_duration_milliseconds_bucket{le="1"} 1
istio_request_duration_milliseconds_bucket{le="+Inf"} 5
istio_request_duration_milliseconds_sum 20
istio_request_duration_milliseconds_count 5
# HELP mesh_downstream_cx_active Open connections.
# TYPE mesh_downstream_cx_active gauge
mesh_downstream_cx_active{listener="outbound"} 3
# HELP mesh_workload_cert_expiry_seconds Seconds until the certificate expires.
# TYPE mesh_workload_cert_expiry_seconds gauge
mesh_workload_cert_expiry_seconds 80
"""


def test_merged_metrics_add_counters_histograms_and_connection_gauges():
    merged = _samples(merge_metrics([WORKER_1, WORKER_2]))
    assert merged[("istio_requests_total", (("response_code", "200"),))] == 8
    assert merged[("istio_requests_total", (("response_code", "503"),))] == 1
    assert merged[("istio_request_duration_milliseconds_bucket", (("le", "1"),))] == 3
    assert merged[("istio_request_duration_milliseconds_bucket", (("le", "+Inf"),))] == 9
    assert merged[("istio_request_duration_milliseconds_sum", ())] == 27.5
    assert merged[("istio_request_duration_milliseconds_count", ())] == 9
    assert merged[("mesh_downstream_cx_active", (("listener", "outbound"),))] == 5


def test_the_merged_certificate_expiry_is_the_soonest():
    assert _samples(merge_metrics([WORKER_1, WORKER_2]))[("mesh_workload_cert_expiry_seconds", ())] == 80


def test_worker_settings_round_trip_through_the_environment():
    worker = WorkerSettings(id=2, listen_fds={15001: 7, 15006: 8}, admin_fd=9, parent_pid=123)
    assert WorkerSettings.from_environ({"MESH_PROXY_WORKER": worker.to_environ()}) == worker
    assert WorkerSettings.from_environ({}) is None
