"""The txmesh-otlp plugin (plugins/txmesh-otlp): the sidecar's spans over OTLP/HTTP to a tiny receiver.

The receiver accepts ``POST /v1/traces`` and keeps the protobuf bodies; the test decodes them with
``opentelemetry-proto`` (a dependency of the plugin) to check that they hold the same spans
``builtin.tracing`` records.  The plugin is configured by its option (``--otlp-endpoint``) or by
environment (``MESH_OTLP_ENDPOINT``), and the SDK's batch delay is cut to 200 ms
(``OTEL_BSP_SCHEDULE_DELAY``) so the test need not wait 5 s.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import time

import pytest

from tests.harness import Proxy, free_port, venv_bin, wait_for
from tests.integration.test_proxy_support import curl_many, endpoint, service_entry, write_config
from tests.integration.test_tracing_support import Collector

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def test_otlp_plugin_is_installed_through_its_entry_point():
    names = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="mesh.plugins")}
    assert names.get("otlp") == "txmesh_otlp:plugin", (
        f"mesh.plugins entry points: {names}; run `make bootstrap` to install plugins/txmesh-otlp")


@pytest.fixture(scope="module")
def receiver():
    collector = Collector(status=200).start()
    yield collector
    collector.stop()


@pytest.fixture(scope="module")
def config(backend_factory, tmp_path_factory):
    backend = backend_factory("orders")
    return write_config(tmp_path_factory.mktemp("otlp-config"), service_entry("orders", [endpoint(backend)]))


@pytest.fixture(scope="module")
def started(process_log_dir):
    proxies = []

    def start(config, env, *extra_args):
        proxy = Proxy(config, "client", extra_args=["--trace-sampling", "100", *extra_args], log_dir=process_log_dir)
        proxy.env.update({"OTEL_BSP_SCHEDULE_DELAY": "200", **env})
        proxies.append(proxy)
        return proxy.start()

    yield start
    for proxy in proxies:
        proxy.stop()


def _export_requests(receiver):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    requests = []
    for path, headers, body in list(receiver.posts):
        content_type = {name.lower(): value for name, value in headers.items()}.get("content-type")
        assert path == "/v1/traces" and content_type == "application/x-protobuf", (path, headers)
        requests.append(ExportTraceServiceRequest.FromString(body))
    return requests


def test_spans_are_exported_over_otlp_http(receiver, config, started):
    proxy = started(config, {"MESH_OTLP_ENDPOINT": receiver.url("")})
    lines = curl_many(proxy.outbound_url + "/", 20, host="orders",
                      headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
    assert set(lines) == {"200 orders"}
    wait_for(lambda: sum(len(s.spans) for r in _export_requests(receiver) for rs in r.resource_spans
                         for s in rs.scope_spans) >= 20, 10.0, interval=0.1, what="20 spans over OTLP")
    assert all(len(body) > 0 for _, _, body in receiver.posts)
    spans = [(rs.resource, span) for r in _export_requests(receiver) for rs in r.resource_spans
             for ss in rs.scope_spans for span in ss.spans]
    resource, span = spans[0]
    resource_attributes = {a.key: a.value.string_value for a in resource.attributes}
    assert resource_attributes["service.name"] == "client.default"
    assert span.trace_id.hex() == TRACE and span.parent_span_id.hex() == PARENT and len(span.span_id) == 8
    assert span.kind == span.SPAN_KIND_CLIENT
    assert span.name == "orders.default.svc.cluster.local:80/*"
    assert span.end_time_unix_nano > span.start_time_unix_nano > (time.time() - 60) * 1e9
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["http.status_code"].string_value == "200"
    assert attributes["http.response.status_code"].int_value == 200
    assert attributes["upstream_cluster"].string_value == "outbound|80||orders.default.svc.cluster.local"
    assert len({s.span_id for _, s in spans}) == len(spans)  # one span per request


def test_the_endpoint_can_be_given_as_an_option(config, started):
    """``--otlp-endpoint`` (the plugin's own option, from ``mesh_addoption``) with no environment variable."""
    collector = Collector(status=200).start()
    try:
        proxy = started(config, {}, "--otlp-endpoint", collector.url(""))
        assert "otlp" not in proxy.admin("/config_dump")["plugins_idle"]
        assert set(curl_many(proxy.outbound_url + "/", 5, host="orders")) == {"200 orders"}
        wait_for(lambda: sum(len(s.spans) for r in _export_requests(collector) for rs in r.resource_spans
                             for s in rs.scope_spans) >= 5, 10.0, interval=0.1, what="5 spans over OTLP")
    finally:
        collector.stop()


def test_a_bad_otlp_endpoint_is_a_usage_error(config, tmp_path):
    proc = subprocess.run([venv_bin("twistd"), "-n", "--pidfile=", "mesh-proxy", "--config-dir", str(config),
                           "--workload", "client", "--otlp-endpoint", "collector:4318"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert "--otlp-endpoint wants the collector's base URL, http://HOST:4318, not 'collector:4318'" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_dead_otlp_endpoint_does_not_affect_requests_or_shutdown(config, started):
    dead = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    proxy = started(config, {"MESH_OTLP_ENDPOINT": dead, "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})  # seconds
    started_at = time.monotonic()
    lines = curl_many(proxy.outbound_url + "/", 300, host="orders", write_out="%{http_code} %{time_total}")
    assert {line.split()[0] for line in lines} == {"200"}
    assert max(float(line.split()[1]) for line in lines) < 0.5
    assert time.monotonic() - started_at < 10
    # the SDK thread retries with backoff until its 1 s timeout, then reports the failure once
    wait_for(lambda: "OTLP export to" in proxy.log_path.read_text(), 10.0, interval=0.1,
             what="the failed OTLP export to be logged")
    stopping = time.monotonic()
    assert proxy.stop() in (0, -15)  # twistd re-raises the SIGTERM it handled
    assert time.monotonic() - stopping < 8, "shutdown waits at most a few seconds for the exporter"
    assert proxy.log_path.read_text().count("OTLP export to") <= 2  # at most once per 10 s


def test_the_plugin_is_idle_without_an_endpoint(receiver, config, started):
    before = len(receiver.posts)
    proxy = started(config, {})
    assert set(curl_many(proxy.outbound_url + "/", 5, host="orders")) == {"200 orders"}
    dump = proxy.admin("/config_dump")
    assert "otlp" in dump["plugins"]
    assert dump["plugins_idle"]["otlp"] == "no --otlp-endpoint (nor $MESH_OTLP_ENDPOINT)"
    time.sleep(0.5)
    assert len(receiver.posts) == before
