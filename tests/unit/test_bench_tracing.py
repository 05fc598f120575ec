"""The bench's traced sidecar pairs (issue #15, telemetry on in both): what each proxy is told.

``envoy-pair-traced`` turns on Istio's default tracing in both Envoys (Zipkin, 1 %, B3 and W3C),
``txmesh-pair-traced`` gives both sidecars ``--zipkin-url`` of the run's Zipkin sink, and the sink
(bench.zipkin_sink) takes what Envoy really sends: a chunked POST.
"""

import http.client
import json
import threading
from pathlib import Path

import pytest

from bench import topologies
from bench.topologies import EnvoyTracing, Proxy, envoy_bootstrap
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


def test_txmesh_traced_pair_exports_to_the_sink(tmp_path, monkeypatch):
    monkeypatch.setattr(topologies, "_telemetry_off_options", lambda twistd: ())
    ws = _RecordingWorkspace(tmp_path)

    target = topologies.CASES["txmesh-pair-traced"](ws, 8080)

    assert target.zipkin_port == 9411
    assert set(ws.argvs) == {"txmesh-client-traced", "txmesh-server-traced"}
    for argv in ws.argvs.values():
        assert _option(argv, "--zipkin-url") == "http://127.0.0.1:9411/api/v2/spans"
        assert float(_option(argv, "--trace-sampling")) == 1.0


def test_untraced_txmesh_pair_exports_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(topologies, "_telemetry_off_options", lambda twistd: ())
    ws = _RecordingWorkspace(tmp_path)

    target = topologies.CASES["txmesh-pair"](ws, 8080)

    assert target.zipkin_port is None
    assert not any("--zipkin-url" in argv for argv in ws.argvs.values())


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
