"""Plugins: what ``meshctl plugins`` lists, and proof that the peak-EWMA plugin (plugins/txmesh-peak-ewma,
installed in the venv through its ``mesh.plugins`` entry point) really changes where a sidecar sends traffic.

The service ``mixed`` has two endpoints: a demo backend, and a tiny HTTP server in this test process that
answers every request after 200 ms.  Its DestinationRule asks for LEAST_REQUEST (Istio's default), the
policy peak EWMA refines.  Two proxies share the config: one with every plugin, one with
``--disable-plugin peak_ewma`` (the built-in LEAST_REQUEST then applies: with one request at a time every
endpoint has 0 active requests, so its picks are coin flips).  The service ``pinned`` has the same
endpoints with an explicit ROUND_ROBIN, which the plugin must leave alone.
"""

from __future__ import annotations

import importlib.metadata
import socket
import socketserver
import subprocess
import threading
import time

import pytest

from tests.harness import venv_bin
from tests.integration.test_proxy_support import (
    curl_many,
    destination_rule,
    endpoint,
    lb,
    served_by,
    service_entry,
    write_config,
)

SLOW_SECONDS = 0.2
REQUESTS = 20


class _SlowHandler(socketserver.BaseRequestHandler):
    """HTTP/1.1 keep-alive: every request (GET, no body) answered after SLOW_SECONDS."""

    def handle(self):
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = self.request.recv(65536)
                if not data:
                    return
                buffer += data
            _, _, buffer = buffer.partition(b"\r\n\r\n")
            time.sleep(SLOW_SECONDS)  # the behaviour under test: a slow endpoint
            body = b'{"service": "slow"}\n'
            self.request.sendall(b"HTTP/1.1 200 OK\r\nx-demo-service: slow\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))


class _SlowServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def slow_server():
    server = _SlowServer(("127.0.0.1", 0), _SlowHandler)
    thread = threading.Thread(target=server.serve_forever, name="slow-http", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def proxies(backend_factory, proxy_factory, tmp_path_factory, slow_server):
    fast = backend_factory("fast")
    config = write_config(
        tmp_path_factory.mktemp("plugins-config"),
        service_entry("mixed", [endpoint(fast), endpoint(slow_server.server_address)]),
        destination_rule("mixed", "mixed", traffic_policy=lb("LEAST_REQUEST")),
        service_entry("pinned", [endpoint(fast), endpoint(slow_server.server_address)]),
        destination_rule("pinned", "pinned", traffic_policy=lb("ROUND_ROBIN")),
    )
    with_plugin = proxy_factory(config, "client")
    without = proxy_factory(config, "client", extra_args=["--disable-plugin", "peak_ewma"])
    return with_plugin, without


def _meshctl_plugins(*args) -> dict:
    proc = subprocess.run([venv_bin("meshctl"), "plugins", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        name, origin_and_hooks = line.split(None, 1)
        rows[name] = origin_and_hooks
    return rows


def test_peak_ewma_is_installed_through_its_entry_point():
    names = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="mesh.plugins")}
    assert names.get("peak_ewma") == "txmesh_peak_ewma", (
        f"mesh.plugins entry points: {names}; run `make bootstrap` to install plugins/txmesh-peak-ewma")


def test_meshctl_plugins_lists_builtins_and_peak_ewma():
    rows = _meshctl_plugins()
    assert list(rows)[:3] == ["builtin.routing", "builtin.balancing", "builtin.retry"]
    assert rows["builtin.routing"].split() == ["builtin", "mesh_route"]
    assert rows["builtin.balancing"].split() == ["builtin", "mesh_pick_endpoint"]
    assert rows["builtin.retry"].split() == ["builtin", "mesh_retry_decision"]
    assert rows["peak_ewma"].startswith("txmesh-peak-ewma ")
    assert "mesh_pick_endpoint" in rows["peak_ewma"] and "mesh_request_complete" in rows["peak_ewma"]


def test_meshctl_plugins_leaves_out_a_disabled_plugin():
    assert "peak_ewma" not in _meshctl_plugins("--disable-plugin", "peak_ewma")


def test_meshctl_plugins_and_config_dump_list_the_same_plugins(proxies):
    """Every built-in (DEFAULT_PLUGINS) and every installed plugin, in registration order, in both."""
    with_plugin, without = proxies
    listed = list(_meshctl_plugins())
    dump = with_plugin.admin("/config_dump")
    assert dump["plugins"] == listed
    assert {"builtin.tracing", "builtin.metrics", "builtin.accesslog", "builtin.tap", "builtin.ca",
            "builtin.config_sources", "builtin.kubernetes_registry", "peak_ewma"} <= set(listed)
    # the control plane's plugins do nothing in a sidecar: listed, and idle
    assert dump["plugins_idle"]["builtin.ca"] == "control plane only"
    assert without.admin("/config_dump")["plugins"] == list(_meshctl_plugins("--disable-plugin", "peak_ewma"))


def test_proxies_report_their_plugins(proxies):
    with_plugin, without = proxies
    assert "peak_ewma" in with_plugin.admin("/config_dump")["plugins"]
    assert "peak_ewma" not in without.admin("/config_dump")["plugins"]


def test_least_request_without_the_plugin_keeps_using_the_slow_endpoint(proxies):
    _, without = proxies
    counts = served_by(curl_many(without.outbound_url + "/", REQUESTS, host="mixed", timeout=10))
    # coin flips: P(the slow endpoint gets fewer than 3 of 20) is about 2e-4
    assert counts.get("slow", 0) >= 3 and counts.get("fast", 0) >= 3, counts


def test_peak_ewma_leaves_an_explicit_round_robin_alone(proxies):
    with_plugin, _ = proxies
    counts = served_by(curl_many(with_plugin.outbound_url + "/", REQUESTS, host="pinned", timeout=10))
    assert counts == {"fast": REQUESTS // 2, "slow": REQUESTS // 2}


def test_peak_ewma_avoids_the_slow_endpoint(proxies):
    with_plugin, _ = proxies
    lines = curl_many(with_plugin.outbound_url + "/", 30, host="mixed", timeout=10)
    served_by(lines)  # all 200
    order = [line.split(" ", 1)[1] for line in lines]
    # An endpoint not measured yet costs the best known latency, so until both are measured the picks are
    # coin flips (the slow one may win a few).  Once both are measured (200 ms against about 1 ms) the
    # slow one must lose every comparison.
    both_measured = max(order.index("fast"), order.index("slow"))
    assert both_measured <= 12, order   # a run of 12 coin flips going one way: p = 2**-12
    assert order[both_measured + 1:] == ["fast"] * (len(order) - both_measured - 1), order



def test_slow_server_is_really_slow(slow_server):
    """Guard for the test double itself: a direct request takes SLOW_SECONDS."""
    with socket.create_connection(slow_server.server_address, timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"x-demo-service: slow" in sock.recv(4096)
        assert time.monotonic() - started >= SLOW_SECONDS
