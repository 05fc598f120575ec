"""builtin.accesslog: the JSON line of a request or a TCP passthrough connection, and the buffered writer."""

from __future__ import annotations

import io
import json

import pytest
from twisted.internet.task import Clock

from mesh.config.tables import RouteAction
from mesh.proxy.tap import Options, makeService
from mesh.telemetry import accesslog
from mesh.telemetry.accesslog import AccessLog, LineFormatter
from mesh.telemetry.peers import PEER_METADATA, PeerMetadata
from tests.unit.test_telemetry_support import (
    CALLER_ID,
    INBOUND_CLUSTER,
    OWN_ID,
    PRODUCTPAGE,
    REVIEWS_CLUSTER,
    REVIEWS_ID,
    REVIEWS_V1,
    REVIEWS_V2,
    done,
    inbound,
    outbound,
    peers,
    report_tcp,
    tcp_connection,
)

#: Istio's default JSON access log (its EnvoyJSONLogFormatIstio), every field of it.
ISTIO_FIELDS = {"start_time", "route_name", "method", "path", "protocol", "response_code", "response_flags",
                "response_code_details", "connection_termination_details", "bytes_received", "bytes_sent", "duration",
                "upstream_service_time", "x_forwarded_for", "user_agent", "request_id", "authority", "upstream_host",
                "upstream_cluster", "upstream_local_address", "downstream_local_address", "downstream_remote_address",
                "requested_server_name", "upstream_transport_failure_reason"}
TXMESH_FIELDS = {"direction", "authz_policy", "source_principal", "destination_principal", "source_workload",
                 "source_workload_namespace", "destination_workload", "destination_workload_namespace", "trace_id"}
FIELDS = ISTIO_FIELDS | TXMESH_FIELDS


@pytest.fixture
def line():
    formatter = LineFormatter(peers(), PRODUCTPAGE)
    return lambda ctx, duration=0.0042: json.loads(formatter.format(ctx, done(ctx, duration)))


def test_an_outbound_line(line):
    ctx = outbound(200, path="/reviews/1?x=1", headers={"user-agent": "curl/8"}, bytes_sent=1234,
                   bytes_received=5, upstream_time=0.0031,
                   route=RouteAction(name="VirtualService/bookinfo/reviews", clusters=(REVIEWS_CLUSTER,),
                                     cumulative_weights=(1,)))
    ctx.headers["x-forwarded-for"] = "10.1.2.3"
    entry = line(ctx)
    assert set(entry) == FIELDS
    assert entry == {
        # Istio's fields, with Envoy's types: numbers, whole milliseconds, upstream_service_time a string
        "start_time": "2026-11-25T20:09:47.250Z", "method": "GET", "path": "/reviews/1?x=1", "protocol": "HTTP/1.1",
        "response_code": 200, "response_flags": "-", "response_code_details": None,
        "connection_termination_details": None, "upstream_transport_failure_reason": None,
        "bytes_received": 5, "bytes_sent": 1234, "duration": 4, "upstream_service_time": "3",
        "x_forwarded_for": "10.1.2.3", "user_agent": "curl/8", "request_id": "test", "authority": "reviews",
        "upstream_host": REVIEWS_V1, "upstream_cluster": REVIEWS_CLUSTER, "upstream_local_address": None,
        "downstream_local_address": None, "downstream_remote_address": "127.0.0.1", "requested_server_name": None,
        "route_name": "VirtualService/bookinfo/reviews",
        # txmesh's own (no metadata exchange here: the destination's workload is not known)
        "direction": "outbound", "authz_policy": None, "source_principal": OWN_ID, "destination_principal": REVIEWS_ID,
        "source_workload": "productpage", "source_workload_namespace": "bookinfo",
        "destination_workload": None, "destination_workload_namespace": None, "trace_id": None,
    }


def test_the_peers_workload_comes_from_the_metadata_exchange(line):
    ctx = outbound(200)
    ctx.extra[PEER_METADATA] = PeerMetadata("reviews-v1", "bookinfo", "reviews", "v1", "reviews", "v1")
    entry = line(ctx)
    assert (entry["source_workload"], entry["destination_workload"], entry["destination_workload_namespace"]) == \
        ("productpage", "reviews-v1", "bookinfo")
    ctx = inbound(200)
    ctx.extra[PEER_METADATA] = PeerMetadata("frontend", "shop", "frontend", "v2", "frontend", "v2")
    entry = line(ctx)
    assert (entry["source_workload"], entry["source_workload_namespace"], entry["destination_workload"]) == \
        ("frontend", "shop", "productpage")
    assert line(inbound(200))["source_workload"] is None


def test_plaintext_and_local_replies_have_nulls(line):
    entry = line(outbound(503, upstream_host=REVIEWS_V2, flags="UF,URX"))
    assert (entry["source_principal"], entry["destination_principal"]) == (None, None)
    assert (entry["response_flags"], entry["upstream_service_time"]) == ("UF,URX", None)
    entry = line(outbound(404, upstream_host=None, cluster=None, flags="NR"))
    assert (entry["upstream_host"], entry["upstream_cluster"], entry["route_name"]) == (None, None, None)


def test_an_inbound_line_names_the_caller(line):
    formatter = LineFormatter(peers(), PRODUCTPAGE)
    ctx = inbound(403, flags="RBAC", authz_policy="shop/deny-admin")
    entry = json.loads(formatter.format(ctx, done(ctx, detail="rbac_access_denied_matched_policy[shop/deny-admin]")))
    assert (entry["direction"], entry["upstream_cluster"], entry["authz_policy"]) == \
        ("inbound", INBOUND_CLUSTER, "shop/deny-admin")
    assert (entry["response_flags"], entry["response_code_details"]) == \
        ("RBAC", "rbac_access_denied_matched_policy[shop/deny-admin]")
    assert (entry["source_principal"], entry["destination_principal"]) == (CALLER_ID, OWN_ID)
    assert line(inbound(200, peer=None))["destination_principal"] is None


def test_hostile_strings_stay_one_line_of_ascii_json():
    formatter = LineFormatter(peers(), PRODUCTPAGE)
    nasty = 'a"b\\c\nd\x00é\U0001F600\udcff'
    ctx = outbound(200)
    ctx.path = ctx.request_id = ctx.headers["user-agent"] = nasty
    ctx.authority = b'h"\xff'
    text = formatter.format(ctx, done(ctx))
    assert "\n" not in text and text.isascii()
    entry = json.loads(text)
    assert (entry["path"], entry["user_agent"], entry["request_id"], entry["authority"]) == \
        (nasty, nasty, nasty, 'h"\xff')


@pytest.mark.parametrize("headers, extra, expected", [
    ({}, {"trace_id": "a" * 32}, "a" * 32),  # builtin.tracing's id wins
    ({"traceparent": f"00-{'b' * 32}-{'c' * 16}-01"}, {}, "b" * 32),
    ({"x-b3-traceid": "d" * 16}, {}, "d" * 16),
    ({"traceparent": "garbage"}, {}, None),
    ({}, {}, None),
])
def test_trace_id(line, headers, extra, expected):
    ctx = outbound(200, headers=headers)
    ctx.extra.update(extra)
    assert line(ctx)["trace_id"] == expected


def test_timestamps_follow_the_clock(line):
    ctx = outbound(200)
    for start, text in ((1795637387.0, "2026-11-25T20:09:47.000Z"), (1795637387.9999, "2026-11-25T20:09:47.999Z"),
                        (1795637388.75, "2026-11-25T20:09:48.750Z")):
        ctx.start = start
        assert line(ctx)["start_time"] == text


class Stream(io.BytesIO):
    """A BytesIO that remembers each write and survives close()."""

    def __init__(self):
        super().__init__()
        self.writes = []
        self.closed_by_log = False

    def write(self, data):
        self.writes.append(bytes(data))
        return len(data)

    def close(self):
        self.closed_by_log = True


def test_lines_wait_for_the_one_second_flush_and_are_written_whole():
    clock, stream = Clock(), Stream()
    log = AccessLog(clock, stream, peers(), PRODUCTPAGE)
    log.startService()
    for code in (200, 503):
        log.mesh_request_complete(outbound(code), done(outbound(code)))
    assert stream.writes == []
    clock.advance(1.0)
    [data] = stream.writes
    assert data.endswith(b"\n") and [json.loads(text)["response_code"] for text in data.splitlines()] == [200, 503]
    clock.advance(1.0)
    assert len(stream.writes) == 1  # nothing new, nothing written
    log.mesh_request_complete(outbound(204), done(outbound(204)))
    log.stopService()
    assert json.loads(stream.writes[-1])["response_code"] == 204 and stream.closed_by_log


def test_a_full_buffer_is_written_before_the_second_is_over(monkeypatch):
    monkeypatch.setattr(accesslog, "MAX_PENDING", 3)
    stream = Stream()
    log = AccessLog(Clock(), stream, peers(), PRODUCTPAGE)
    for _ in range(7):
        log.mesh_request_complete(outbound(200), done(outbound(200)))
    assert [data.count(b"\n") for data in stream.writes] == [3, 3]


def test_a_broken_request_or_disk_never_raises():
    log = AccessLog(Clock(), Stream(), peers(), PRODUCTPAGE)
    ctx = outbound(200)
    ctx.start = None
    log.mesh_request_complete(ctx, done(ctx))
    assert log._failed.failures == 1

    class Full(Stream):
        def write(self, data):
            raise OSError(28, "No space left on device")

    log = AccessLog(Clock(), Full(), peers(), PRODUCTPAGE)
    log.mesh_request_complete(outbound(200), done(outbound(200)))
    log.flush()  # logged, not raised


def test_a_tcp_passthrough_line_has_istios_fields_too():
    formatter = LineFormatter(peers(), PRODUCTPAGE)
    ended = tcp_connection(sent=24, received=19, upstream=("93.184.216.34", 5432), duration=1.5)
    entry = json.loads(formatter.format_tcp(ended))
    assert set(entry) == ISTIO_FIELDS | {"direction"}
    assert {name: value for name, value in entry.items() if value is not None} == {
        "start_time": "2026-11-25T20:09:47.250Z", "direction": "outbound", "protocol": "tcp", "response_code": 0,
        "response_flags": "-", "upstream_host": "93.184.216.34:5432", "upstream_cluster": "PassthroughCluster",
        "downstream_remote_address": "10.0.0.9", "downstream_local_address": "93.184.216.34:5432",
        "bytes_received": 19, "bytes_sent": 24, "duration": 1500,
    }
    http = json.loads(formatter.format(outbound(200), done(outbound(200))))
    assert http["protocol"] == "HTTP/1.1"  # how the two kinds of line are told apart


def test_a_refused_or_failed_tcp_connection_has_its_flag_and_no_upstream_host():
    formatter = LineFormatter(peers(), PRODUCTPAGE)
    entry = json.loads(formatter.format_tcp(tcp_connection(cluster="BlackHoleCluster", flags="UH", duration=0.0)))
    assert (entry["upstream_cluster"], entry["response_flags"], entry["upstream_host"], entry["bytes_sent"],
            entry["duration"]) == ("BlackHoleCluster", "UH", None, 0, 0)
    entry = json.loads(formatter.format_tcp(tcp_connection(flags="UF", destination=("10.98.0.2", 6999))))
    assert (entry["response_flags"], entry["downstream_local_address"], entry["upstream_host"]) == \
        ("UF", "10.98.0.2:6999", None)


def test_the_log_has_a_line_per_ended_tcp_connection_only():
    clock, stream = Clock(), Stream()
    log = AccessLog(clock, stream, peers(), PRODUCTPAGE)
    log.startService()
    report_tcp(log, 1, 0)  # opened: no line yet
    report_tcp(log, 0, 1, sent=3, received=4)
    report_tcp(log, 1, 1, flags="UO")
    clock.advance(1.0)
    [data] = stream.writes
    assert [(entry["protocol"], entry["response_flags"], entry["bytes_sent"])
            for entry in map(json.loads, data.splitlines())] == [("tcp", "-", 3), ("tcp", "UO", 0)]
    broken = tcp_connection()
    broken.start = None
    log.mesh_connection_complete(broken)  # counted and logged, never raised into the tunnel's code
    assert log._failed.failures == 1
    log.stopService()


@pytest.mark.parametrize("args, observers", [
    ([], ["builtin.accesslog", "builtin.metrics"]),
    (["--access-log", "off"], ["builtin.metrics"]),
    (["--disable-plugin", "builtin.accesslog"], ["builtin.metrics"]),
    (["--metrics-port", "0"], ["builtin.accesslog"]),
])
def test_tcp_connections_reach_the_telemetry_plugins_the_options_keep(tmp_path, args, observers):
    options = Options()
    options.parseOptions(["--config-dir", str(tmp_path), "--workload", "w", "--access-log", str(tmp_path / "a.log"),
                          *args])
    proxy = makeService(options)
    implementations = proxy.plugins.hook.mesh_connection_complete.get_hookimpls()
    assert sorted(impl.plugin_name for impl in implementations if impl.plugin_name.startswith("builtin.")) == observers
    for service in proxy:
        if isinstance(service, AccessLog):
            service.stopService()  # closes its file


def test_dry_run_results_add_istios_dynamic_metadata_fields(line):
    """Only to lines of requests that dry-run AuthorizationPolicies evaluated (ctx.authz_dry_run)."""
    ctx = inbound(200, authz_dry_run=(("deny", "denied", "bookinfo/staged"), ("allow", "denied", None)))
    entry = line(ctx)
    assert set(entry) == FIELDS | {
        "istio_dry_run_deny_shadow_engine_result", "istio_dry_run_deny_shadow_effective_policy_id",
        "istio_dry_run_allow_shadow_engine_result", "istio_dry_run_allow_shadow_effective_policy_id"}
    assert (entry["istio_dry_run_deny_shadow_engine_result"],
            entry["istio_dry_run_deny_shadow_effective_policy_id"]) == ("denied", "bookinfo/staged")
    assert (entry["istio_dry_run_allow_shadow_engine_result"],
            entry["istio_dry_run_allow_shadow_effective_policy_id"]) == ("denied", None)
    assert set(line(inbound(200))) == FIELDS
