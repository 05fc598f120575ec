"""plugins/txmesh-datadog, piece by piece: the DogStatsD wire format, Istio's labels as tags, the aggregate
and its cap, the agent's addresses, the v0.4 spans, and the plugin's hooks in a real plugin manager.

The lines the plugin writes are parsed by the strict parser of the integration tests' DogStatsD receiver
(tests/integration/test_datadog_support.py); tests/integration/test_datadog.py runs the plugin in sidecars.
"""

from __future__ import annotations

import ast
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import txmesh_datadog
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from txmesh_datadog import aggregate, labels, parse_interval, parse_max_contexts, statsd, wire
from txmesh_datadog.addresses import (
    StatsdTarget,
    TraceTarget,
    parse_statsd_address,
    parse_trace_agent,
    statsd_target_from_env,
    trace_target_from_env,
)
from txmesh_datadog.traces import datadog_span, payload

from mesh import api
from mesh.api import Config
from mesh.plugins import DEFAULT_PLUGINS, fast_caller, make_plugin_manager
from mesh.proxy.context import RequestContext
from mesh.telemetry.peers import PeerMetadata
from mesh.telemetry.tracing import Span
from tests.harness import wait_for
from tests.integration.test_datadog_support import DogStatsDReceiver, check_payload, parse_datagram, parse_line

OWN = labels.own_workload("frontend", "shop", {"app": "frontend", "version": "v2"})
PEER = PeerMetadata("user-service", "shop", "user-service", "v1", "user-service", "v1")
CLUSTER = "outbound|80||user-service.shop.svc.cluster.local"


# -- wire ------------------------------------------------------------------------------------------------

def test_tags_keep_only_what_datadog_keeps():
    assert wire.tag("response_flags", "UF,URX") == "response_flags:UF_URX"
    assert wire.tag("destination_service", "a.b.svc.cluster.local") == "destination_service:a.b.svc.cluster.local"
    assert wire.tag("k", "x|y#z\nw é") == "k:x_y_z_w__"
    assert len(wire.tag("k", "v" * 300)) == wire.MAX_TAG_LENGTH


@pytest.mark.parametrize("text", ["env:prod,x|y", "9lives", "env:prod,,a b"])
def test_bad_constant_tags_are_refused_with_what_to_write(text):
    with pytest.raises(ValueError, match="is not a Datadog tag: write KEY:VALUE pairs"):
        wire.parse_tags(text)


def test_constant_tags():
    assert wire.parse_tags(" env:prod, team:payments ") == ("env:prod", "team:payments")


def test_distribution_values_are_packed_into_lines_that_fit():
    values = [f"{n}.125" for n in range(1000)]
    lines = wire.distribution_lines("txmesh.request.duration", ":".join(values), 0.25, "env:test,reporter:source",
                                    300)
    assert len(lines) > 1 and all(len(line) <= 300 for line in lines)
    parsed = [parse_line(line) for line in lines]
    assert [v for m in parsed for v in m.values] == [float(v) for v in values]
    assert {(m.type, m.rate, m.tags) for m in parsed} == {("d", 0.25, ("env:test", "reporter:source"))}


def test_rates_are_written_without_exponents():
    assert wire.format_rate(0.5) == "0.5"
    assert wire.format_rate(128 / 20_000_000) == "0.0000064"
    assert parse_line(wire.distribution_lines("m", "1", 128 / 20_000_000, "", 100)[0]).rate == 0.0000064


def test_a_value_longer_than_a_line_goes_alone():
    assert wire.distribution_lines("m", "1:" + "2" * 50 + ":3", 1.0, "", 20) == ["m:1|d", "m:" + "2" * 50 + "|d",
                                                                                  "m:3|d"]
    assert wire.distribution_lines("m", "9" * 50, 1.0, "", 20) == ["m:" + "9" * 50 + "|d"]


def test_datagrams_hold_whole_lines_up_to_the_size():
    lines = [wire.count_line("txmesh.request.count", n, "reporter:source,response_code:200") for n in range(200)]
    datagrams = wire.datagrams(lines, wire.UDP_MAX_BYTES)
    assert len(datagrams) > 1 and all(len(d) <= wire.UDP_MAX_BYTES for d in datagrams)
    parsed = [m for d in datagrams for m in parse_datagram(d, wire.UDP_MAX_BYTES)]
    assert [m.values[0] for m in parsed] == list(range(200))


# -- labels ------------------------------------------------------------------------------------------------

def test_outbound_tags_name_this_workload_and_the_peer_it_called():
    values = dict(zip(labels.REQUEST_TAGS, labels.request_values(OWN, "outbound", CLUSTER, None, "user-service",
                                                                 200, "", PEER)))
    assert values == {
        "reporter": "source", "source_workload": "frontend", "source_workload_namespace": "shop",
        "source_app": "frontend", "source_version": "v2", "source_canonical_service": "frontend",
        "source_canonical_revision": "v2", "destination_workload": "user-service",
        "destination_workload_namespace": "shop", "destination_service": "user-service.shop.svc.cluster.local",
        "destination_service_name": "user-service", "destination_service_namespace": "shop",
        "destination_app": "user-service", "destination_version": "v1",
        "destination_canonical_service": "user-service", "destination_canonical_revision": "v1",
        "connection_security_policy": "unknown", "request_protocol": "http", "response_code": "200",
        "response_flags": "-"}


def test_an_unknown_peer_is_unknown_but_for_its_service_namespace():
    values = dict(zip(labels.REQUEST_TAGS, labels.request_values(OWN, "outbound", CLUSTER, None, "x", 503,
                                                                 "UF,URX", None)))
    assert (values["destination_workload"], values["destination_workload_namespace"], values["destination_app"],
            values["response_flags"]) == ("unknown", "shop", "unknown", "UF,URX")
    no_route = dict(zip(labels.REQUEST_TAGS, labels.request_values(OWN, "outbound", None, None, "x", 404, "NR",
                                                                   None)))
    assert {no_route[name] for name in labels.REQUEST_TAGS[7:17]} == {"unknown"}
    passthrough = labels.request_values(OWN, "outbound", "PassthroughCluster", None, "x", 200, "", None)
    assert passthrough[9:12] == ("PassthroughCluster", "PassthroughCluster", "unknown")


def test_inbound_tags_name_the_verified_caller_and_this_workload():
    own = labels.own_workload("user-service", "shop", {"app": "user-service",
                                                       "service.istio.io/canonical-name": "users"})
    principal = "spiffe://cluster.local/ns/web/sa/frontend"
    values = dict(zip(labels.REQUEST_TAGS, labels.request_values(own, "inbound", "inbound|8080||", principal,
                                                                 "user-service", 200, "", None)))
    assert (values["reporter"], values["source_workload"], values["source_workload_namespace"]) == (
        "destination", "unknown", "web")
    assert (values["destination_service"], values["destination_canonical_service"],
            values["destination_canonical_revision"], values["connection_security_policy"]) == (
        "user-service.shop.svc.cluster.local", "users", "latest", "mutual_tls")
    plaintext = dict(zip(labels.REQUEST_TAGS, labels.request_values(own, "inbound", None, None, "10.0.0.1", 200, "",
                                                                    None)))
    assert (plaintext["source_workload_namespace"], plaintext["destination_service"],
            plaintext["connection_security_policy"]) == ("unknown", "unknown", "none")


@pytest.mark.parametrize("host, service", [
    ("reviews", "reviews.shop.svc.cluster.local"), ("reviews.web", "reviews.web.svc.cluster.local"),
    ("reviews.web.svc", "reviews.web.svc.cluster.local"), ("api.example.com", "api.example.com"),
    ("10.1.2.3", None), ("::1", None), ("", None)])
def test_inbound_hosts_are_expanded_as_kubernetes_dns_does(host, service):
    assert labels.inbound_service(host, "shop") == service


def test_tcp_tags_name_the_pseudo_cluster():
    outbound = dict(zip(labels.TCP_TAGS, labels.tcp_values(OWN, "outbound", "PassthroughCluster", "")))
    assert (outbound["reporter"], outbound["destination_service"], outbound["request_protocol"],
            outbound["response_flags"]) == ("source", "PassthroughCluster", "tcp", "-")
    inbound = dict(zip(labels.TCP_TAGS, labels.tcp_values(OWN, "inbound", "InboundPassthroughClusterIpv4", "UF")))
    assert (inbound["reporter"], inbound["destination_workload"], inbound["destination_service"],
            inbound["connection_security_policy"], inbound["response_flags"]) == (
        "destination", "frontend", "InboundPassthroughClusterIpv4", "none", "UF")


# -- aggregate --------------------------------------------------------------------------------------------

def _drained(aggregator) -> list[str]:
    return [line for lines in aggregator.drain(wire.UDP_MAX_BYTES) for line in lines]


def test_a_series_keeps_a_bounded_sample_that_stands_for_every_request():
    series = aggregate.RequestSeries("reporter:source")
    for n in range(1000):
        series.observe(float(n), n, 2 * n)
    assert series.count == 1000 and len(series.durations) == aggregate.MAX_SAMPLES
    assert all(size == 2 * received for received, size in zip(series.request_sizes, series.response_sizes))
    metrics = [parse_line(line) for line in series.lines(wire.UDP_MAX_BYTES)]
    assert [m.values for m in metrics if m.name == aggregate.REQUEST_COUNT] == [(1000,)]
    for name in (aggregate.REQUEST_DURATION, aggregate.REQUEST_SIZE, aggregate.RESPONSE_SIZE):
        lines = [m for m in metrics if m.name == name]
        assert round(sum(len(m.values) / m.rate for m in lines)) == 1000
    assert series.count == 0 and series.lines(wire.UDP_MAX_BYTES) == []


def test_past_the_cap_new_tag_sets_are_counted_as_other():
    aggregator = aggregate.Aggregator(OWN, ("env:test",), max_contexts=2)
    keys = [("outbound", CLUSTER, None, "user-service", code, "", PEER) for code in (200, 404, 500, 503)]
    for key in keys:
        (aggregator.requests.get(key) or aggregator.request_series(key)).observe(1.0, 0, 10)
    assert aggregator.request_series(keys[0]) is aggregator.requests[keys[0]]  # the same context again
    metrics = [parse_line(line) for line in _drained(aggregator)]
    counts = {m.tag_dict()["response_code"]: m.values[0] for m in metrics if m.name == aggregate.REQUEST_COUNT}
    assert counts == {"200": 1, "404": 1, "other": 2}
    assert [m.values for m in metrics if m.name == aggregate.OVERFLOW] == [(2,)]
    assert [m.tags for m in metrics if m.name == aggregate.OVERFLOW] == [("env:test",)]
    assert len(aggregator.contexts) == 2 and aggregator.overflowed == 2


def test_tcp_series_send_their_nonzero_counters():
    aggregator = aggregate.Aggregator(OWN)
    series = aggregator.tcp_series(("outbound", "PassthroughCluster", ""))
    series.counts[0] += 1
    series.counts[2] += 300
    metrics = [parse_line(line) for line in _drained(aggregator)]
    assert {(m.name, m.values) for m in metrics} == {(aggregate.TCP_OPENED, (1,)), (aggregate.TCP_SENT, (300,))}
    assert _drained(aggregator) == []


# -- addresses and options --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, target", [
    ("127.0.0.1:8125", StatsdTarget("udp", "127.0.0.1", 8125)), ("udp://agent", StatsdTarget("udp", "agent", 8125)),
    ("[::1]:9125", StatsdTarget("udp", "::1", 9125)), ("unix:///var/run/datadog/dsd.socket",
                                                        StatsdTarget("unix", path="/var/run/datadog/dsd.socket")),
    ("unixgram:///tmp/d.sock", StatsdTarget("unix", path="/tmp/d.sock")), ("/tmp/d.sock",
                                                                           StatsdTarget("unix", path="/tmp/d.sock"))])
def test_statsd_addresses(text, target):
    assert parse_statsd_address(text) == target


@pytest.mark.parametrize("text", ["agent:dogstatsd", "::1", "unix://relative", "", "host:0", "host:70000"])
def test_bad_statsd_addresses_say_what_to_write(text):
    with pytest.raises(ValueError, match="wants the agent's DogStatsD address: HOST:PORT"):
        parse_statsd_address(text)


def test_trace_agent_addresses():
    assert parse_trace_agent("agent") == TraceTarget(url="http://agent:8126")
    assert parse_trace_agent("http://10.0.0.1:9126/") == TraceTarget(url="http://10.0.0.1:9126")
    assert parse_trace_agent("[::1]:8126") == TraceTarget(url="http://[::1]:8126")
    assert parse_trace_agent("unix:///var/run/datadog/apm.socket") == TraceTarget(path="/var/run/datadog/apm.socket")
    with pytest.raises(ValueError, match="wants the agent's trace intake: http://HOST:PORT"):
        parse_trace_agent("https://agent:8126")


def test_the_datadog_variables_are_the_fallback():
    assert statsd_target_from_env({}) is None and trace_target_from_env({}) is None
    env = {"DD_AGENT_HOST": "10.0.0.7", "DD_TRACE_AGENT_PORT": "9126"}
    assert statsd_target_from_env(env) == StatsdTarget("udp", "10.0.0.7", 8125)
    assert trace_target_from_env(env) == TraceTarget(url="http://10.0.0.7:9126")
    env = {"DD_DOGSTATSD_URL": "unix:///d.sock", "DD_TRACE_AGENT_URL": "unix:///a.sock", "DD_AGENT_HOST": "x"}
    assert statsd_target_from_env(env) == StatsdTarget("unix", path="/d.sock")
    assert trace_target_from_env(env) == TraceTarget(path="/a.sock")
    with pytest.raises(ValueError, match=r"^\$DD_AGENT_HOST and \$DD_DOGSTATSD_PORT wants"):
        statsd_target_from_env({"DD_AGENT_HOST": "agent", "DD_DOGSTATSD_PORT": "x"})


def test_interval_and_cap_options():
    assert (parse_interval("2s"), parse_interval("500ms"), parse_interval("1.5")) == (2.0, 0.5, 1.5)
    for bad in ("0", "10ms", "2m", "soon"):
        with pytest.raises(ValueError, match="wants a duration from 50ms to 60s"):
            parse_interval(bad)
    assert parse_max_contexts("20") == 20
    with pytest.raises(ValueError, match="wants a whole number of tag sets"):
        parse_max_contexts("0")


# -- traces -------------------------------------------------------------------------------------------------

def _span(trace_id="4bf92f3577b34da6a3ce929d0e0e4736", kind="CLIENT", status="200", parent="00f067aa0ba902b7"):
    tags = {"http.status_code": status, "component": "proxy"}
    if status.startswith("5"):
        tags["error"] = "true"
    return Span(trace_id, "b7ad6b7169203331", parent, kind, "orders.default.svc.cluster.local:80/*",
                1_700_000_000_000_000, 1500, "client.default", "127.0.0.1", 8080, tags)


def test_a_span_in_the_agents_v04_form():
    span = datadog_span(_span(status="503"))
    assert span == {
        "trace_id": 0xa3ce929d0e0e4736, "span_id": 0xb7ad6b7169203331, "parent_id": 0x00f067aa0ba902b7,
        "name": "txmesh.proxy", "resource": "orders.default.svc.cluster.local:80/*", "service": "client.default",
        "type": "http", "start": 1_700_000_000_000_000_000, "duration": 1_500_000, "error": 1,
        "meta": {"http.status_code": "503", "component": "proxy", "span.kind": "client",
                 "_dd.p.tid": "4bf92f3577b34da6"},
        "metrics": {"_sampling_priority_v1": 1}}
    root = datadog_span(_span(trace_id="0" * 16 + "a3ce929d0e0e4736", kind="SERVER", parent=None))
    assert (root["parent_id"], root["type"], root["error"], "_dd.p.tid" in root["meta"]) == (0, "web", 0, False)


def test_a_payload_groups_spans_by_trace(monkeypatch):
    body, traces = payload([_span(), _span(trace_id="1" * 32), _span(kind="SERVER")])
    decoded = json.loads(body)
    assert traces == 2 and [len(trace) for trace in decoded] == [2, 1]
    monkeypatch.setattr("time.time", lambda: 1_700_000_000.0)
    checked = check_payload({"content-type": "application/json", "x-datadog-trace-count": "2"}, body)
    assert checked[0][1].meta["span.kind"] == "server"


# -- the plugin in a plugin manager --------------------------------------------------------------------------

@dataclass
class Connection:
    """What a sidecar hands the connection hooks (:class:`mesh.api.ConnectionView`): a TCP tunnel."""

    direction: str = "outbound"
    protocol: str = "tcp"
    source_address: str = "127.0.0.1"
    destination: tuple | None = ("10.0.0.9", 5432)
    upstream: tuple | None = ("10.0.0.9", 5432)
    peer: str | None = None
    start: float = 0.0
    duration: float = 0.25
    bytes_received: int = 80
    bytes_sent: int = 200
    requests: int = 0
    cluster: str | None = "PassthroughCluster"
    response_flags: str = ""


def _configured(options: dict, role="proxy", clock=None):
    plugin = txmesh_datadog.DatadogPlugin()
    pm = make_plugin_manager([name for name, _ in DEFAULT_PLUGINS], load_entry_points=False)
    pm.register(plugin, name="datadog")
    options = {"workload": "frontend", "namespace": "shop", "labels": {"app": "frontend"}, "datadog-tags": (),
               "datadog-max-contexts": 10, "datadog-flush-interval": 1.0, **options}
    pm.configure(Config(role, options, clock or Clock(), _Parent(), pm))
    return plugin, pm


class _Parent:
    """``config.service``: what the plugin adds its child services to."""

    def __init__(self):
        self.children = []

    def addService(self, child):
        self.children.append(child)


def test_idle_without_an_agent_or_outside_a_sidecar(monkeypatch):
    for variable in ("DD_AGENT_HOST", "DD_DOGSTATSD_URL", "DD_TRACE_AGENT_URL"):
        monkeypatch.delenv(variable, raising=False)
    for role, options in (("proxy", {}), ("control", {"datadog-statsd": StatsdTarget("udp", "127.0.0.1", 8125)})):
        plugin, pm = _configured(options, role)
        assert "datadog" in pm.idle and plugin.aggregator is None and plugin.traces is None


def test_the_hooks_count_requests_and_tunnels_and_the_flush_sends_them():
    receiver = DogStatsDReceiver().start()
    try:
        host, port = receiver.address.split(":")
        clock = Clock()
        plugin, pm = _configured({"datadog-statsd": StatsdTarget("udp", host, int(port))}, clock=clock)
        assert pm.get_plugin("datadog") is plugin and plugin.flusher.parent.children == [plugin.flusher]
        complete = fast_caller(pm.hook.mesh_request_complete)
        for code in (200, 200, 503):
            ctx = RequestContext.for_test(host="user-service", cluster=CLUSTER, response_code=code, bytes_sent=12)
            ctx.extra["peer_metadata"] = PEER
            complete(ctx=ctx, outcome=api.RequestOutcome(code, "", False, 0.004))
        connection = Connection()
        assert isinstance(connection, api.ConnectionView)
        fast_caller(pm.hook.mesh_connection_open)(connection=connection)
        fast_caller(pm.hook.mesh_connection_complete)(connection=connection)
        _finish(plugin.flusher.flush(), clock, receiver, plugin.flusher)
        wait_for(lambda: receiver.datagrams == plugin.flusher.sent, 5, what="the flushed datagrams")
        assert receiver.errors == []
        assert receiver.counts_by(aggregate.REQUEST_COUNT, "response_code", "destination_workload") == {
            ("200", "user-service"): 2, ("503", "user-service"): 1}
        assert receiver.count(aggregate.TCP_OPENED, destination_service="PassthroughCluster") == 1
        assert receiver.count(aggregate.TCP_SENT) == 200 and receiver.count(aggregate.TCP_RECEIVED) == 80
        assert plugin.flusher.sent >= 1 and plugin.flusher.lost == 0
    finally:
        receiver.stop()


def _finish(done, clock, receiver, flusher) -> None:
    """Run a flush (or stop) to its end on ``clock``: when it waits for room in the receiver's queue, let
    the receiver read what was sent, then let the flush's few milliseconds pass."""
    finished = []
    done.addBoth(finished.append)  # (``done.called`` is true already while it waits on a chained Deferred)
    clock.advance(0)
    while not finished:
        wait_for(lambda: receiver.datagrams == flusher.sent, 5, what="the receiver to read what was sent")
        clock.advance(statsd.RETRY_DELAY)


def test_a_flush_yields_to_the_reactor_and_waits_for_room_in_a_unix_socket():
    receiver = DogStatsDReceiver(tempfile.mkdtemp(prefix="dd-", dir="/tmp") + "/dsd.socket").start()
    try:
        clock = Clock()
        aggregator = aggregate.Aggregator(OWN)
        flusher = statsd.DogStatsDFlusher(clock, StatsdTarget("unix", path=receiver.path), aggregator, 1.0)
        flusher.startService()
        for code in range(200, 300):  # 100 series, about 50 datagrams: more than the socket's queue holds
            aggregator.request_series(("outbound", CLUSTER, None, "x", code, "", None)).observe(2.5, 1, 2)
        flushed = flusher.flush()
        assert not flushed.called  # the work is scheduled on the reactor, not done in the LoopingCall's call
        _finish(flushed, clock, receiver, flusher)
        assert flusher.lost == 0 and flusher.sent > 10
        for code in range(200, 210):
            aggregator.request_series(("outbound", CLUSTER, None, "x", code, "", None)).observe(2.5, 1, 2)
        _finish(flusher.stopService(), clock, receiver, flusher)  # the last flush, then the socket closes
        wait_for(lambda: receiver.count(aggregate.REQUEST_COUNT) == 110, 5, what="every request counted")
        assert receiver.errors == [] and flusher.lost == 0 and flusher.sent > 10
    finally:
        receiver.stop()


def test_a_missing_socket_loses_the_datagrams_and_says_why(tmp_path):
    clock, aggregator = Clock(), aggregate.Aggregator(OWN)
    flusher = statsd.DogStatsDFlusher(clock, StatsdTarget("unix", path=str(tmp_path / "absent")), aggregator, 1.0)
    aggregator.request_series(("outbound", CLUSTER, None, "x", 200, "", None)).observe(2.5, 1, 2)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        flusher.flush()
        clock.advance(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert flusher.lost == 1 and flusher.sent == 0
    (text,) = [formatEvent(event) for event in events if event.get("log_namespace") == "txmesh_datadog"]
    assert "DogStatsD to unix://" in text and "no such socket: is the agent running" in text


def test_it_imports_only_the_plugin_api():
    """Like any third-party plugin: mesh.api (and mesh.hookspecs), nothing else of txmesh."""
    for source in Path(txmesh_datadog.__file__).parent.glob("*.py"):
        tree = ast.parse(source.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert {name for name in imported if name == "mesh" or name.startswith("mesh.")} <= {
            "mesh.api", "mesh.hookspecs"}, source
