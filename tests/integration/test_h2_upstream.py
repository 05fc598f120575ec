"""HTTP/2 to upstreams: real sidecars in front of real HTTP/2 apps (tests/apps/h2_app.py, h2c).

One module-scoped set of processes:

- ``client``: a sidecar whose outbound listener the tests call (with HTTP/1.1 clients: curl, h2load
  ``--h1``); its ServiceEntries send ``grpc-app``, ``goaway-app`` and ``narrow-app`` straight to
  three h2c apps (ports of protocol HTTP2/GRPC: prior knowledge; TCP keepalive on the connections to
  ``grpc-app``; ``brief-app`` is ``grpc-app`` again, its connections allowed 1 s each), and
  ``grpc-behind`` and ``web-behind`` over mTLS to two server sidecars;
- ``grpc-server``: a sidecar in front of an h2c app, whose own ServiceEntry port is GRPC, so it
  speaks h2c to its app;
- ``web-server``: a sidecar in front of the HTTP/1.1 demo app; the client reaches it with
  DestinationRule ``h2UpgradePolicy: UPGRADE`` (ALPN h2 between the sidecars), and it speaks
  HTTP/1.1 to its app (port protocol HTTP).

The apps count their connections (``/stats``), which is how the tests see multiplexing.
"""

from __future__ import annotations

import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tests.harness import connections_to, free_port
from tests.harness.processes import ManagedProcess
from tests.harness.waiting import wait_for
from tests.integration.test_identity_support import h2load, issue_cert, make_ca, mesh_endpoint, spiffe
from tests.integration.test_proxy_support import destination_rule, virtual_service, write_config

NS = "shop"
H2_APP = Path(__file__).resolve().parents[1] / "apps" / "h2_app.py"
TLS_PEER = Path(__file__).resolve().parents[1] / "apps" / "tls_peer.py"
HTTP1_TRAILERS = Path(__file__).resolve().parents[1] / "apps" / "http1_trailers.py"
NETWORKING = "networking.istio.io/v1"


class H2App(ManagedProcess):
    """``python tests/apps/h2_app.py``: an h2c app that counts its connections (or another app of
    tests/apps that takes ``--port`` and says "listening" when ready: ``script``)."""

    kind = "h2-app"

    def __init__(self, name: str, *args, log_dir: Path, script: Path = H2_APP):
        self.port = free_port("127.0.0.1")
        super().__init__(name, [sys.executable, script, "--port", self.port, *args],
                         Path(log_dir) / f"app-{name}-{self.port}.log")

    def is_ready(self) -> bool:
        return "listening" in self.log_path.read_text()


class Http1Peer(ManagedProcess):
    """``python tests/apps/tls_peer.py``: an mTLS server that speaks HTTP/1.1 only (ALPN ``http/1.1``)."""

    kind = "tls-peer"

    def __init__(self, name: str, cert: Path, key: Path, bundle: Path, *, log_dir: Path):
        self.port = free_port("127.0.0.1")
        super().__init__(name, [sys.executable, TLS_PEER, "--port", self.port, "--cert", cert, "--key", key,
                                "--ca", bundle], Path(log_dir) / f"tls-peer-{name}-{self.port}.log")

    def is_ready(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True


def entry(name: str, protocol: str, endpoint: dict) -> dict:
    """A ServiceEntry ``name`` with one port 80 of ``protocol`` and one endpoint."""
    return {"apiVersion": NETWORKING, "kind": "ServiceEntry", "metadata": {"name": name, "namespace": NS},
            "spec": {"hosts": [name], "location": "MESH_INTERNAL", "resolution": "STATIC",
                     "ports": [{"number": 80, "name": "http", "protocol": protocol}], "endpoints": [endpoint]}}


def plain(port: int) -> dict:
    return {"address": "127.0.0.1", "ports": {"http": port}}


@pytest.fixture(scope="module")
def mesh(proxy_factory, backend_factory, process_log_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("h2-upstream")
    apps = {name: H2App(name, *args, log_dir=process_log_dir).start() for name, args in {
        "grpc-app": (), "goaway-app": ("--goaway-after", 25, "--goaway-refuse", 4),
        "narrow-app": ("--max-streams", 3), "grpc-server-app": ()}.items()}
    web_app = backend_factory("web-server")
    trailers_app = H2App("trailers-app", log_dir=process_log_dir, script=HTTP1_TRAILERS).start()
    ca = make_ca("h2-upstream test CA")
    bundle = work / "ca.pem"
    bundle.write_bytes(ca[1].public_bytes(Encoding.PEM))
    inbound = {"grpc-server": free_port(), "web-server": free_port()}
    old_peer = Http1Peer("old-peer", *issue_cert(work / "certs", "old-peer", ca, spiffe(NS, "old-peer")), bundle,
                         log_dir=process_log_dir).start()
    config = write_config(
        work / "config",
        entry("grpc-app", "HTTP2", plain(apps["grpc-app"].port)),
        entry("goaway-app", "GRPC", plain(apps["goaway-app"].port)),
        entry("narrow-app", "HTTP2", plain(apps["narrow-app"].port)),
        entry("brief-app", "HTTP2", plain(apps["grpc-app"].port)),
        entry("grpc-behind", "GRPC", mesh_endpoint(inbound["grpc-server"], "grpc-server", app="grpc-server")),
        entry("web-behind", "HTTP", mesh_endpoint(inbound["web-server"], "web-server", app="web-server")),
        entry("web-plain", "HTTP", mesh_endpoint(inbound["web-server"], "web-server")),
        entry("old-peer", "GRPC", mesh_endpoint(old_peer.port, "old-peer")),
        entry("trailers-app", "HTTP", plain(trailers_app.port)),
        destination_rule("web-behind", "web-behind", namespace=NS,
                         traffic_policy={"connectionPool": {"http": {"h2UpgradePolicy": "UPGRADE"}}}),
        destination_rule("grpc-app", "grpc-app", namespace=NS, traffic_policy={"connectionPool": {"tcp": {
            "tcpKeepalive": {"time": "13s", "interval": "4s", "probes": 6}}}}),
        destination_rule("brief-app", "brief-app", namespace=NS, traffic_policy={"connectionPool": {"tcp": {
            "maxConnectionDuration": "1s"}}}),
        virtual_service("goaway-app", ["goaway-app"], [{"route": [{"destination": {"host": "goaway-app"}}],
                                                         "retries": {"attempts": 0}}], namespace=NS),
        virtual_service("grpc-app", ["grpc-app"], [
            {"match": [{"uri": {"prefix": "/drop/retried"}}],
             "route": [{"destination": {"host": "grpc-app"}}], "retries": {"attempts": 2, "retryOn": "reset"}},
            {"route": [{"destination": {"host": "grpc-app"}}]}], namespace=NS),
    )

    def sidecar(name, **kwargs):
        cert, key = issue_cert(work / "certs", name, ca, spiffe(NS, name))
        return proxy_factory(config, name, namespace=NS, labels={"app": name},
                             extra_args=["--cert", cert, "--key", key, "--ca-bundle", bundle], **kwargs)

    servers = {"grpc-server": sidecar("grpc-server", app_port=apps["grpc-server-app"].port,
                                      inbound_port=inbound["grpc-server"]),
               "web-server": sidecar("web-server", app_port=web_app.port, inbound_port=inbound["web-server"])}
    return {"client": sidecar("client"), "apps": apps, "servers": servers}


def app_stats(mesh, name: str) -> dict:
    return mesh["client"].curl(name, "/stats").json()


def call(mesh, host: str, path: str = "/", **kwargs):
    return mesh["client"].curl(host, path, **kwargs)


# -- multiplexing -------------------------------------------------------------------------------------

def test_many_client_connections_share_few_upstream_connections(mesh):
    before = app_stats(mesh, "grpc-app")
    result = h2load(f"{mesh['client'].outbound_url}/many", args=[
        "--h1", "-c", 24, "-n", 480, "-H", ":authority: grpc-app", "-H", "x-delay-ms: 30"])
    assert result.succeeded == 480 and result.status["2xx"] == 480, result.output
    after = app_stats(mesh, "grpc-app")
    assert after["connections"] - before["connections"] <= 1, after  # 24 client connections, one HTTP/2 connection
    assert after["max_concurrent"] >= 12, f"the streams were not concurrent on one connection: {after}"


def test_request_reaches_the_app_as_http2_with_the_forwarded_headers(mesh):
    result = call(mesh, "grpc-app", "/echo?x=1", headers={"TE": "trailers", "X-Custom": "yes",
                                                            "Connection": "keep-alive"})
    assert result.status == 200, result
    seen = result.json()["headers"]
    assert seen[":authority"] == "grpc-app" and seen[":path"] == "/echo?x=1" and seen[":scheme"] == "http"
    assert seen["x-custom"] == "yes" and seen["te"] == "trailers"
    assert "x-request-id" in seen and "x-forwarded-for" not in seen  # sidecars append none (Istio's)
    assert seen["x-forwarded-proto"] == "http"  # the client sidecar's, kept by the app's (over mTLS)
    assert "connection" not in seen and "keep-alive" not in seen  # RFC 9113 section 8.2.2


def test_tcp_keepalive_reaches_the_http2_connections(mesh):
    assert call(mesh, "grpc-app", "/echo").status == 200
    connections = wait_for(lambda: connections_to(mesh["client"].pid, mesh["apps"]["grpc-app"].port), 5,
                           what="the client sidecar's HTTP/2 connection to grpc-app")
    assert all(connection["keepalive"] == {"time": 13, "interval": 4, "probes": 6}
               for connection in connections), connections


def test_an_http2_connection_goes_away_at_its_maximum_duration(mesh):
    """brief-app allows a connection 1 s: the one its request opened is closed (GOAWAY) when that is up."""
    client, port = mesh["client"], mesh["apps"]["grpc-app"].port
    before = {connection["local_port"] for connection in connections_to(client.pid, port)}
    assert call(mesh, "brief-app", "/echo").status == 200
    opened = wait_for(lambda: {connection["local_port"] for connection in connections_to(client.pid, port)} - before,
                      5, what="brief-app's connection")
    wait_for(lambda: not opened & {connection["local_port"] for connection in connections_to(client.pid, port)}, 5,
             what="brief-app's connection to go away after 1 s")


def test_a_peer_that_allows_few_streams_gets_more_connections(mesh):
    result = h2load(f"{mesh['client'].outbound_url}/narrow", args=[
        "--h1", "-c", 9, "-n", 90, "-H", ":authority: narrow-app", "-H", "x-delay-ms: 30"])
    assert result.succeeded == 90, result.output
    stats = app_stats(mesh, "narrow-app")
    assert stats["max_concurrent"] <= 3 and stats["open"] >= 3, stats  # 9 at once, 3 per connection


# -- bodies, flow control, trailers --------------------------------------------------------------------

def test_large_request_and_response_bodies_cross_the_flow_control_windows(mesh, tmp_path):
    upload = tmp_path / "upload.bin"
    upload.write_bytes(bytes(range(256)) * 12_000)  # ~3 MB: many times the app's 64 KiB window
    for framing in ({}, {"Transfer-Encoding": "chunked"}):
        result = call(mesh, "grpc-app", "/upload", data=upload, headers=framing, timeout=30)
        assert result.status == 200 and result.json()["body_bytes"] == upload.stat().st_size, result
    download = tmp_path / "download.bin"
    result = call(mesh, "grpc-app", "/bytes/4000000", output=download, timeout=30,
                  extra_args=["--limit-rate", "2M"])  # a slow client: the stream pauses, nothing is lost
    assert result.status == 200 and download.stat().st_size == 4_000_000, result


def test_response_trailers_reach_an_http1_client_in_the_last_chunk(mesh):
    result = call(mesh, "grpc-app", "/trailers", headers={"TE": "trailers"}, extra_args=["--raw"])
    assert result.status == 200, result
    assert result.body.endswith(b"\r\n0\r\ngrpc-status: 0\r\nx-body-bytes: 0\r\n\r\n"), result.body[-200:]


def test_trailers_of_an_http1_upstream_never_reach_the_next_response(mesh):
    """llhttp reports a chunked body's trailer fields as headers after the head: they are dropped (as
    Envoy's HTTP/1 codec drops them), and never prepended to the next response on the connection."""
    for count in (1, 2, 3):
        answer = call(mesh, "trailers-app", "/")
        assert answer.status == 200 and answer.body == b"request %d" % count, answer  # one pooled connection
        assert "x-trailer" not in answer.headers, answer


# -- failures -----------------------------------------------------------------------------------------

def test_a_reset_stream_fails_alone(mesh):
    slow = {"x-delay-ms": "400"}
    with ThreadPoolExecutor(8) as pool:
        others = [pool.submit(call, mesh, "grpc-app", f"/slow/{n}", headers=slow) for n in range(6)]
        wait_for(lambda: app_stats(mesh, "grpc-app")["open"] >= 1)
        reset = call(mesh, "grpc-app", "/reset", headers={"x-delay-ms": "100"})
        results = [future.result() for future in others]
    assert reset.status == 503 and reset.headers["x-mesh-flags"] == "UC", reset
    assert "reset the stream (INTERNAL_ERROR)" in reset.body.decode()
    assert [result.status for result in results] == [200] * 6, results
    assert len({result.json()["connection"] for result in results}) == 1  # all on the connection of the reset


def test_goaway_under_load_loses_nothing(mesh):
    """The app says GOAWAY every 25 requests with 4 streams above its last stream id; those are
    replayed on a new connection (the route allows no retries: replaying them costs none)."""
    before = app_stats(mesh, "goaway-app")
    result = h2load(f"{mesh['client'].outbound_url}/goaway", args=[
        "--h1", "-c", 10, "-n", 400, "-H", ":authority: goaway-app", "-H", "x-delay-ms: 5"])
    assert result.succeeded == 400 and result.status["2xx"] == 400, result.output
    after = app_stats(mesh, "goaway-app")
    assert after["connections"] - before["connections"] >= 400 // 25 - 1, after


def test_a_lost_connection_follows_the_retry_rules_of_http1(mesh):
    """Each request below makes the app cut its pooled connection twice: the first loss is replayed for
    free (as a stale HTTP/1.1 connection), the second only where the route retries on reset."""
    call(mesh, "grpc-app", "/warm")  # a pooled connection
    assert call(mesh, "grpc-app", "/drop/retried/2").status == 200
    lost = call(mesh, "grpc-app", "/drop/not-retried/2")
    assert lost.status == 503 and lost.headers["x-mesh-flags"] == "UC", lost
    assert "upstream connection closed" in lost.body.decode()
    assert call(mesh, "grpc-app", "/after-the-loss").status == 200  # a new connection


# -- between sidecars ---------------------------------------------------------------------------------

def test_a_grpc_port_reaches_its_app_over_h2c_through_two_sidecars(mesh):
    echoed = call(mesh, "grpc-behind", "/hello")
    assert echoed.status == 200, echoed
    assert echoed.json()["headers"]["x-forwarded-client-cert"].endswith(f"URI={spiffe(NS, 'client')}")
    result = call(mesh, "grpc-behind", "/trailers", headers={"TE": "trailers"}, extra_args=["--raw"])
    assert result.status == 200, result
    assert result.body.endswith(b"\r\n0\r\ngrpc-status: 0\r\nx-body-bytes: 0\r\n\r\n"), result.body[-200:]


def test_h2_upgrade_policy_multiplexes_http1_clients_between_sidecars(mesh):
    """HTTP/1.1 clients, an HTTP/1.1 app, and one HTTP/2 connection between the two sidecars."""
    result = h2load(f"{mesh['client'].outbound_url}/delay/20", args=[
        "--h1", "-c", 8, "-n", 160, "-H", ":authority: web-behind"])
    assert result.succeeded == 160, result.output
    assert call(mesh, "web-behind", "/who").json()["service"] == "web-server"  # the app spoke HTTP/1.1
    endpoint, = mesh["client"].admin("/clusters")["outbound|80||web-behind.shop.svc.cluster.local"]["endpoints"]
    assert endpoint["open_connections"] == 1, endpoint
    inbound = mesh["servers"]["web-server"].admin("/config_dump")["connections"]["inbound"]
    assert inbound["open"] == 1, inbound


def test_a_peer_that_chooses_http1_by_alpn_gets_http1(mesh):
    """The client offers ALPN h2 (a GRPC port) to a peer that speaks HTTP/1.1 only: the connection goes on
    in HTTP/1.1 and is pooled as such."""
    answers = [call(mesh, "old-peer", "/") for _ in range(3)]
    assert [answer.status for answer in answers] == [200] * 3, answers
    assert [answer.json()["request"] for answer in answers] == [1, 2, 3], answers  # one keep-alive connection
    endpoint, = mesh["client"].admin("/clusters")["outbound|80||old-peer.shop.svc.cluster.local"]["endpoints"]
    assert endpoint["open_connections"] == 1, endpoint


# -- HTTP/2 clients (the server codec, mesh.proxy.codec.h2_server) ------------------------------------

def test_an_http2_client_reaches_an_h2c_app_through_two_sidecars_with_trailers(mesh, tmp_path):
    headers = tmp_path / "headers"
    result = call(mesh, "grpc-behind", "/trailers", headers={"TE": "trailers"},
                  extra_args=["--http2-prior-knowledge", "-D", headers])
    assert result.status == 200 and result.info["http_version"] == "2", result
    assert result.json()["headers"][":method"] == "GET"
    assert "grpc-status: 0" in headers.read_text(), headers.read_text()  # the trailers, after the body


def test_http2_clients_share_one_connection_between_sidecars_and_reach_an_http1_app(mesh):
    """No DestinationRule: HTTP/2 requests offer ALPN h2 to the peer sidecar, which speaks HTTP/1.1 to its app."""
    result = h2load(f"{mesh['client'].outbound_url}/delay/20", args=[
        "-c", 6, "-m", 8, "-n", 240, "-H", ":authority: web-plain"])
    assert result.succeeded == 240, result.output
    endpoint, = mesh["client"].admin("/clusters")["outbound|80||web-plain.shop.svc.cluster.local"]["endpoints"]
    assert endpoint["open_connections"] == 1, endpoint
    echoed = call(mesh, "web-plain", "/who", extra_args=["--http2-prior-knowledge"])
    assert echoed.status == 200 and echoed.json()["service"] == "web-server", echoed
