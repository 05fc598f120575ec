"""The txmesh-datadog plugin (plugins/txmesh-datadog) in real sidecars, against stand-ins of a Datadog agent.

The stand-ins (tests/integration/test_datadog_support.py) are a DogStatsD receiver (UDP or a Unix
datagram socket) and a ``/v0.4/traces`` intake; both check the wire format strictly and keep every
problem, and each test asserts there was none.

- A mesh: ``frontend`` calls ``user-service`` (in namespace ``shop``, behind the demo app) over mTLS
  with certificates from mesh-control; both sidecars send DogStatsD (flushed every 200 ms) and their
  spans.  The DogStatsD counts match the traffic sent, and each tag set is the label set of the
  matching ``istio_requests_total`` series of the same sidecar's ``/stats/prometheus`` (less the
  principals, which the plugin leaves out), with the same count; the distributions stand for every
  request and their sizes sum to Prometheus's; each trace holds the client's and the server's span.
- Alone: a sidecar whose agent is absent (UDP to a closed port, a trace agent that refuses) serves as
  fast as ever and stops promptly; a sidecar whose Unix socket appears late delivers from then on,
  and past ``--datadog-max-contexts`` counts new tag sets under ``other``; its spans go over the trace
  agent's Unix socket.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import free_port, venv_bin, wait_for
from tests.integration.test_datadog_support import DogStatsDReceiver, TraceIntake
from tests.integration.test_identity_support import mesh_endpoint
from tests.integration.test_proxy_support import curl_many, endpoint, service_entry, virtual_service, write_config
from tests.integration.test_telemetry_support import scrape

NS = "shop"
SENT = {("source", "200"): 6, ("source", "503"): 3, ("source", "404"): 2,
        ("destination", "200"): 6, ("destination", "503"): 3}
CONSTANT_TAGS = ("env:test", "team:mesh")
#: Prometheus labels the plugin does not send as tags.
NOT_SENT = {"source_principal", "destination_principal", "grpc_response_status"}


def test_the_plugin_is_installed_through_its_entry_point():
    names = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="mesh.plugins")}
    assert names.get("datadog") == "txmesh_datadog:plugin", (
        f"mesh.plugins entry points: {names}; run `make bootstrap` to install plugins/txmesh-datadog")


@pytest.fixture(scope="module")
def agent():
    statsd, intake = DogStatsDReceiver().start(), TraceIntake().start()
    yield statsd, intake
    statsd.stop()
    intake.stop()


def _datadog_args(statsd, intake, *extra) -> list:
    return ["--datadog-statsd", statsd.address, "--datadog-trace-agent", intake.url,
            "--datadog-flush-interval", "200ms", "--datadog-tags", ",".join(CONSTANT_TAGS),
            "--trace-sampling", "100", *extra]


@pytest.fixture(scope="module")
def mesh(agent, control_factory, backend_factory, proxy_factory, tmp_path_factory):
    statsd, intake = agent
    control = control_factory()
    app = backend_factory("user-service")
    inbound_port = free_port()
    config = write_config(
        tmp_path_factory.mktemp("datadog-mesh"),
        service_entry("user-service", [mesh_endpoint(inbound_port, "user-service", app="user-service",
                                                     version="v1")], namespace=NS),
        virtual_service("user-service", ["user-service"], [
            {"route": [{"destination": {"host": "user-service"}}], "retries": {"attempts": 0}}], namespace=NS))
    server = proxy_factory(config, "user-service", namespace=NS, app_port=app.port, inbound_port=inbound_port,
                           labels={"app": "user-service", "version": "v1"},
                           extra_args=[*control.proxy_args(NS, "user-service"), *_datadog_args(statsd, intake)])
    client = proxy_factory(config, "frontend", namespace=NS, labels={"app": "frontend", "version": "v2"},
                           extra_args=[*control.proxy_args(NS, "frontend"), *_datadog_args(statsd, intake)])
    sent = Counter()
    for path, host, count in (("/", "user-service", 6), ("/status/503", "user-service", 3), ("/", "nowhere", 2)):
        sent.update(line.split()[0] for line in curl_many(client.outbound_url + path, count, host=host,
                                                          write_out="%{http_code}"))
    assert sent == {"200": 6, "503": 3, "404": 2}
    wait_for(lambda: _counts(statsd) == SENT, 10, interval=0.1, what="DogStatsD counts of every request sent")
    return {"server": server, "client": client, "statsd": statsd, "intake": intake}


def _counts(statsd) -> dict:
    return {key: value for key, value in statsd.counts_by("txmesh.request.count", "reporter", "response_code").items()}


def test_the_datagrams_are_well_formed(mesh):
    statsd = mesh["statsd"]
    assert statsd.errors == []
    assert statsd.datagrams > 0
    names = {(m.name, m.type) for m in statsd.snapshot()}
    assert names == {("txmesh.request.count", "c"), ("txmesh.request.duration", "d"),
                     ("txmesh.request.size", "d"), ("txmesh.response.size", "d")}
    for metric in statsd.snapshot():
        assert set(CONSTANT_TAGS) <= set(metric.tags)
        if metric.type == "c":
            assert metric.rate == 1.0 and all(isinstance(v, int) and v > 0 for v in metric.values)


def test_the_counts_match_the_traffic(mesh):
    assert _counts(mesh["statsd"]) == SENT


def _prometheus_series(proxy, family: str) -> dict:
    """``{frozenset(label items): value}`` of one sample name of the sidecar's ``/stats/prometheus``."""
    text = scrape(proxy.metrics_port, "/stats/prometheus").decode()
    return {frozenset((k, v) for k, v in sample.labels.items() if k not in NOT_SENT): sample.value
            for metrics in text_string_to_metric_families(text) for sample in metrics.samples
            if sample.name == family}


def _dogstatsd_series(statsd, name: str, reporter: str, value=sum) -> dict:
    """``{frozenset(Istio tag items): value of the lines}`` of one metric and reporter (constant tags left out)."""
    lines = {}
    for metric in statsd.snapshot():
        tags = {tag for tag in metric.tags if tag not in CONSTANT_TAGS}
        if metric.name == name and f"reporter:{reporter}" in tags:
            lines.setdefault(frozenset(tuple(tag.split(":", 1)) for tag in tags), []).append(metric)
    return {tags: value(metrics) for tags, metrics in lines.items()}


@pytest.mark.parametrize("side, reporter", [("client", "source"), ("server", "destination")])
def test_the_tags_are_the_prometheus_labels_of_the_same_sidecar(mesh, side, reporter):
    """Every tag set is the label set of one ``istio_requests_total`` series, with its count (the
    principals aside); flags are written with ``_`` for ``,``, as Datadog writes any other character."""
    counted = _dogstatsd_series(mesh["statsd"], "txmesh.request.count", reporter,
                                lambda metrics: sum(v for m in metrics for v in m.values))
    prometheus = _prometheus_series(mesh[side], "istio_requests_total")
    assert counted == {labels: value for labels, value in prometheus.items() if ("reporter", reporter) in labels}
    tags = dict(next(iter(counted)))
    if reporter == "destination":
        assert (tags["source_workload"], tags["destination_service"], tags["connection_security_policy"]) == (
            "frontend", f"user-service.{NS}.svc.cluster.local", "mutual_tls")


def test_the_distributions_stand_for_every_request_and_sum_as_prometheus(mesh):
    statsd, client = mesh["statsd"], mesh["client"]
    for name in ("txmesh.request.duration", "txmesh.request.size", "txmesh.response.size"):
        for (reporter, code), count in SENT.items():
            assert statsd.weighted_count(name, reporter=reporter, response_code=code) == count, (name, reporter, code)
    sizes = _dogstatsd_series(statsd, "txmesh.response.size", "source", lambda ms: sum(v for m in ms for v in m.values))
    prometheus = _prometheus_series(client, "istio_response_bytes_sum")
    assert sizes == {labels: value for labels, value in prometheus.items() if ("reporter", "source") in labels}
    durations = [v for m in statsd.snapshot() if m.name == "txmesh.request.duration" for v in m.values]
    assert all(0 < v < 10_000 for v in durations)


def test_each_trace_holds_the_client_and_the_server_span(mesh):
    intake = mesh["intake"]
    wait_for(lambda: len(intake.spans()) >= 20, 10, interval=0.1, what="11 client spans and 9 server spans")
    assert intake.errors == []
    spans = intake.spans()
    assert Counter(span.meta["span.kind"] for span in spans) == {"client": 11, "server": 9}
    by_trace = {}
    for span in spans:
        by_trace.setdefault((span.trace_id, span.meta.get("_dd.p.tid")), []).append(span)
    assert len(by_trace) == 11  # one trace per request the client sent
    for trace in by_trace.values():
        client = next(span for span in trace if span.meta["span.kind"] == "client")
        assert (client.service, client.type, client.name) == (f"frontend.{NS}", "http", "txmesh.proxy")
        assert len(client.meta["_dd.p.tid"]) == 16
        if client.meta["http.status_code"] == "404":
            assert len(trace) == 1 and client.resource.startswith("nowhere:")
            continue
        (server,) = [span for span in trace if span.meta["span.kind"] == "server"]
        assert server.parent_id == client.span_id and server.service == f"user-service.{NS}"
        assert server.error == (1 if server.meta["http.status_code"] == "503" else 0)
        assert client.resource == f"user-service.{NS}.svc.cluster.local:80/*"


# -- alone: an absent agent, a late Unix socket, the cardinality cap ----------------------------------------

@pytest.fixture(scope="module")
def orders_config(backend_factory, tmp_path_factory):
    backend = backend_factory("orders")
    return write_config(tmp_path_factory.mktemp("datadog-alone"), service_entry("orders", [endpoint(backend)]))


def test_an_absent_agent_never_touches_the_traffic(orders_config, proxy_factory):
    proxy = proxy_factory(orders_config, "lonely", extra_args=[
        "--datadog-statsd", f"127.0.0.1:{free_port('127.0.0.1')}",  # UDP to a port nobody reads
        "--datadog-trace-agent", f"http://127.0.0.1:{free_port('127.0.0.1')}",  # refuses connections
        "--datadog-flush-interval", "100ms", "--trace-sampling", "100"])
    started = time.monotonic()
    lines = curl_many(proxy.outbound_url + "/", 300, host="orders", write_out="%{http_code} %{time_total}")
    assert {line.split()[0] for line in lines} == {"200"}
    assert max(float(line.split()[1]) for line in lines) < 0.5
    assert time.monotonic() - started < 10
    wait_for(lambda: "datadog: sending spans to" in proxy.log_path.read_text(), 10, interval=0.1,
             what="the refused spans to be logged")
    stopping = time.monotonic()
    assert proxy.stop() in (0, -15)
    assert time.monotonic() - stopping < 8, "shutdown waits at most a few seconds for the trace agent"
    log = proxy.log_path.read_text()
    assert log.count("datadog: sending spans to") <= 2  # at most once per 10 s
    assert "DogStatsD to" not in log  # a UDP datagram to nowhere is not an error the sender sees


def test_a_late_unix_socket_and_the_cardinality_cap(orders_config, proxy_factory):
    directory = Path(tempfile.mkdtemp(prefix="dd-", dir="/tmp"))
    path = directory / "dsd.socket"
    intake = TraceIntake(str(directory / "apm.socket")).start()  # spans over the agent's Unix socket too
    proxy = proxy_factory(orders_config, "capped", extra_args=[
        "--datadog-statsd", f"unix://{path}", "--datadog-flush-interval", "100ms", "--datadog-max-contexts", "2",
        "--datadog-trace-agent", intake.url, "--trace-sampling", "100"])
    assert set(curl_many(proxy.outbound_url + "/", 20, host="orders", write_out="%{http_code}")) == {"200"}
    wait_for(lambda: f"DogStatsD to unix://{path} failed" in proxy.log_path.read_text(), 10, interval=0.1,
             what="the missing socket to be logged")
    assert "no such socket" in proxy.log_path.read_text()
    statsd = DogStatsDReceiver(str(path)).start()  # the agent starts: the 200s' context exists already
    try:
        for code, count in (("404", 4), ("500", 3)):  # a second context, then a third: over the cap
            lines = curl_many(proxy.outbound_url + f"/status/{code}", count, host="orders", write_out="%{http_code}")
            assert lines == [code] * count
        wait_for(lambda: statsd.count("txmesh.datadog.overflow") == 3, 10, interval=0.1,
                 what="3 requests counted in the overflow context")
        assert statsd.errors == []
        assert statsd.count("txmesh.request.count", response_code="404") == 4
        assert statsd.count("txmesh.request.count", response_code="500") == 0
        other = [m for m in statsd.snapshot() if m.name == "txmesh.request.count" and "response_code:other" in m.tags]
        assert sum(sum(m.values) for m in other) == 3
        assert {tag for m in other for tag in m.tags} == {
            "reporter:source", "request_protocol:http", *(f"{name}:other" for name in (
                "source_workload", "source_workload_namespace", "source_app", "source_version",
                "source_canonical_service", "source_canonical_revision", "destination_workload",
                "destination_workload_namespace", "destination_service", "destination_service_name",
                "destination_service_namespace", "destination_app", "destination_version",
                "destination_canonical_service", "destination_canonical_revision", "connection_security_policy",
                "response_code", "response_flags"))}
        assert statsd.weighted_count("txmesh.request.duration", response_code="other") == 3
        assert "datadog: 2 distinct tag sets reached (--datadog-max-contexts)" in proxy.log_path.read_text()
        wait_for(lambda: len(intake.spans()) == 27, 10, interval=0.1, what="a span for each of the 27 requests")
        assert intake.errors == []
    finally:
        statsd.stop()
        intake.stop()


def test_a_bad_address_is_a_usage_error(orders_config, tmp_path):
    proc = subprocess.run([venv_bin("twistd"), "-n", "--pidfile=", "mesh-proxy", "--config-dir", str(orders_config),
                           "--workload", "client", "--datadog-statsd", "agent:dogstatsd"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert ("--datadog-statsd wants the agent's DogStatsD address: HOST:PORT (UDP, e.g. 127.0.0.1:8125) or "
            "unix:///PATH") in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
