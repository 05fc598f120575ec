"""The bench's traced sidecar pairs (issue #15, telemetry on in both): what each proxy is told.

``envoy-pair-traced`` turns on Istio's default tracing in both Envoys (Zipkin, 1 %, B3 and W3C),
``txmesh-pair-traced`` gives both sidecars ``--zipkin-url`` of the run's Zipkin sink, and the sink
(bench.zipkin_sink) takes what Envoy really sends: a chunked POST.  The ``*-pair-telemetry`` cases
add what else Istio's default telemetry does: B3-only tracing and the metadata exchange's headers
on Envoy, the metrics port on txmesh.  Every txmesh sidecar of the bench runs the built-in plugins
only.
"""

import http.client
import json
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from bench import topologies
from bench.topologies import EnvoyPeerMetadata, EnvoyTracing, Proxy, envoy_bootstrap
from bench.zipkin_sink import make_server


def _hcm(bootstrap: dict) -> dict:
    return bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


@pytest.mark.parametrize("direction", ["OUTBOUND", "INBOUND"])
def test_traced_envoy_bootstrap_has_istio_zipkin_tracing(direction):
    bootstrap = envoy_bootstrap("envoy-client-traced", 1, 2, 3, tracing=EnvoyTracing(direction, 9411))

    tracing = _hcm(bootstrap)["tracing"]
    assert tracing["random_sampling"] == {"value": 1.0}
    assert tracing["spawn_upstream_span"] is False
    zipkin = tracing["provider"]["typed_config"]
    assert tracing["provider"]["name"] == "envoy.tracers.zipkin"
    assert zipkin["collector_endpoint"] == "/api/v2/spans"
    assert zipkin["collector_endpoint_version"] == "HTTP_JSON"
    assert zipkin["trace_context_option"] == "USE_B3_WITH_W3C_PROPAGATION"
    assert bootstrap["static_resources"]["listeners"][0]["traffic_direction"] == direction
    clusters = {cluster["name"]: cluster for cluster in bootstrap["static_resources"]["clusters"]}
    endpoint = clusters[zipkin["collector_cluster"]]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9411}


def test_untraced_envoy_bootstrap_has_no_tracing():
    bootstrap = envoy_bootstrap("envoy-client", 1, 2, 3)

    assert "tracing" not in _hcm(bootstrap)
    assert "traffic_direction" not in bootstrap["static_resources"]["listeners"][0]
    assert [cluster["name"] for cluster in bootstrap["static_resources"]["clusters"]] == ["upstream"]


class _RecordingWorkspace(topologies.Workspace):
    """Starts nothing: records each proxy's command line."""

    def __init__(self, root: Path):
        super().__init__(root, stack=None, venv_bin=root)
        self.argvs = {}

    def venv_tool(self, name):
        return name

    def certs(self):
        return self.root / "certs"

    def zipkin_sink(self):
        return 9411

    def start_proxy(self, name, argv, admin_port, exe_prefix, cwd=None, env=None, role="", ports=()):
        self.argvs[name] = argv
        return Proxy(name, 0, role, admin_port, ports)


def _option(argv: list, name: str) -> str:
    return argv[argv.index(name) + 1]


def _no_extra_options(monkeypatch):
    monkeypatch.setattr(topologies, "_telemetry_off_options", lambda twistd: ())
    monkeypatch.setattr(topologies, "_third_party_plugin_options", lambda python: ())


def test_txmesh_traced_pair_exports_to_the_sink(tmp_path, monkeypatch):
    _no_extra_options(monkeypatch)
    ws = _RecordingWorkspace(tmp_path)

    target = topologies.CASES["txmesh-pair-traced"](ws, 8080)

    assert target.zipkin_port == 9411
    assert set(ws.argvs) == {"txmesh-client-traced", "txmesh-server-traced"}
    for argv in ws.argvs.values():
        assert _option(argv, "--zipkin-url") == "http://127.0.0.1:9411/api/v2/spans"
        assert float(_option(argv, "--trace-sampling")) == 1.0


def test_untraced_txmesh_pair_exports_nothing(tmp_path, monkeypatch):
    _no_extra_options(monkeypatch)
    ws = _RecordingWorkspace(tmp_path)

    target = topologies.CASES["txmesh-pair"](ws, 8080)

    assert target.zipkin_port is None
    assert target.metrics_urls == []
    assert not any("--zipkin-url" in argv or "--metrics-port" in argv for argv in ws.argvs.values())


def test_txmesh_telemetry_pair_keeps_metrics_and_exports_spans(tmp_path, monkeypatch):
    monkeypatch.setattr(topologies, "_telemetry_off_options", lambda twistd: ("--metrics-port", "0"))
    monkeypatch.setattr(topologies, "_third_party_plugin_options", lambda python: ())
    ws = _RecordingWorkspace(tmp_path)

    target = topologies.CASES["txmesh-pair-telemetry"](ws, 8080)

    assert set(ws.argvs) == {"txmesh-client-telemetry", "txmesh-server-telemetry"}
    ports = set()
    for argv in ws.argvs.values():
        assert _option(argv, "--zipkin-url") == "http://127.0.0.1:9411/api/v2/spans"
        last = len(argv) - 1 - argv[::-1].index("--metrics-port")  # twistd: the last one given wins
        ports.add(int(argv[last + 1]))
    assert len(ports) == 2 and 0 not in ports
    assert sorted(target.metrics_urls) == sorted(f"http://127.0.0.1:{port}/stats/prometheus" for port in ports)


def test_worker_telemetry_pairs_run_two_workers_with_telemetry(tmp_path, monkeypatch):
    _no_extra_options(monkeypatch)
    ws = _RecordingWorkspace(tmp_path)

    target = topologies.CASES["txmesh-pair-w2-telemetry"](ws, 8080)

    assert set(ws.argvs) == {"txmesh-client-w2-telemetry", "txmesh-server-w2-telemetry"}
    for argv in ws.argvs.values():
        assert _option(argv, "--workers") == "2"
        assert _option(argv, "--zipkin-url") == "http://127.0.0.1:9411/api/v2/spans"
    assert len(target.metrics_urls) == 2


@pytest.mark.parametrize("role, adds, removes", [("client", "request", "response"),
                                                 ("server", "response", "request")])
def test_telemetry_envoy_bootstrap_emulates_the_metadata_exchange(role, adds, removes):
    bootstrap = envoy_bootstrap(f"envoy-{role}-telemetry", 1, 2, 3,
                                tracing=EnvoyTracing("OUTBOUND", 9411, "USE_B3"),
                                peer_metadata=EnvoyPeerMetadata(adds, role))

    route = _hcm(bootstrap)["route_config"]["virtual_hosts"][0]["routes"][0]
    added = {entry["header"]["key"]: entry["header"]["value"] for entry in route[f"{adds}_headers_to_add"]}
    assert set(added) == {"x-envoy-peer-metadata-id", "x-envoy-peer-metadata"}
    assert f"~{role}.default~" in added["x-envoy-peer-metadata-id"]
    assert sorted(route[f"{removes}_headers_to_remove"]) == sorted(added)
    assert f"{adds}_headers_to_remove" not in route and f"{removes}_headers_to_add" not in route
    assert _hcm(bootstrap)["tracing"]["provider"]["typed_config"]["trace_context_option"] == "USE_B3"


def test_envoy_bootstraps_without_telemetry_touch_no_header():
    route = _hcm(envoy_bootstrap("envoy-client", 1, 2, 3))["route_config"]["virtual_hosts"][0]["routes"][0]

    assert not [key for key in route if key.endswith(("_headers_to_add", "_headers_to_remove"))]


def test_bench_sidecars_leave_out_every_installed_plugin(tmp_path, monkeypatch):
    installed = sorted(ep.name for ep in entry_points(group="mesh.plugins"))
    options = topologies._third_party_plugin_options(sys.executable)
    assert options == tuple(part for name in installed for part in ("--disable-plugin", name))

    monkeypatch.setattr(topologies, "_telemetry_off_options", lambda twistd: ())
    monkeypatch.setattr(topologies, "_third_party_plugin_options", lambda python: options)
    ws = _RecordingWorkspace(tmp_path)
    topologies.CASES["txmesh"](ws, 8080)
    argv = ws.argvs["txmesh"]
    assert [argv[index + 1] for index, arg in enumerate(argv) if arg == "--disable-plugin"] == installed


def test_zipkin_sink_takes_a_chunked_post_and_serves_the_trace():
    server = make_server(0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        spans = [{"traceId": "0af7651916cd43dd8448eb211c80319c", "id": "b7ad6b7169203331", "kind": "CLIENT"}]
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
        connection.request("POST", "/api/v2/spans", body=iter([json.dumps(spans).encode()]),
                           headers={"content-type": "application/json"}, encode_chunked=True)
        response = connection.getresponse()
        response.read()
        assert response.status == 202
        connection.request("GET", "/api/v2/trace/0af7651916cd43dd8448eb211c80319c")
        assert json.loads(connection.getresponse().read()) == spans
        connection.request("GET", "/stats")
        assert json.loads(connection.getresponse().read()) == {"posts": 1, "spans": 1}
        connection.close()
    finally:
        server.shutdown()
        server.server_close()
