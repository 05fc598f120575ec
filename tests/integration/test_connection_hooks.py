"""The response-header and connection hooks, called by a real sidecar for a third-party plugin.

The plugin is tests/plugins/txmesh_hooks.py, found through its ``mesh.plugins`` entry point (the test
writes the distribution's metadata).  ``mesh_response_headers`` is seen by curl on upstream and local
responses; ``mesh_connection_open`` and ``mesh_connection_complete`` come once each per connection, with
the bytes the client sent and received.  (TCP passthrough connections: tests/e2e/test_netns_passthrough.py.)
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tests.harness import curl, wait_for
from tests.integration.test_proxy_support import endpoint, service_entry, write_config

PLUGIN_DIR = Path(__file__).parents[1] / "plugins"


def hooks_plugin_env(tmp_path_factory, log: Path) -> dict:
    """The environment that makes a sidecar load tests/plugins/txmesh_hooks.py and log to ``log``."""
    dist = tmp_path_factory.mktemp("hooks-dist")
    info = dist / "txmesh_hooks-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: txmesh-hooks\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mesh.plugins]\nhooks = txmesh_hooks\n")
    pythonpath = os.pathsep.join(filter(None, [str(PLUGIN_DIR), str(dist), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": pythonpath, "TXMESH_HOOKS_LOG": str(log)}


def hook_events(log: Path) -> list:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def sidecar(backend_factory, proxy_factory, tmp_path_factory):
    app = backend_factory("hooks-app")
    log = tmp_path_factory.mktemp("hooks-log") / "hooks.jsonl"
    config = write_config(tmp_path_factory.mktemp("hooks-config"), service_entry("hooks-app", [endpoint(app)]))
    proxy = proxy_factory(config, "hooks-client", app_port=app.port, env=hooks_plugin_env(tmp_path_factory, log))
    assert "hooks" in proxy.admin("/config_dump")["plugins"]
    return proxy, log


def test_a_plugin_adds_and_removes_response_headers_as_curl_sees_them(sidecar):
    proxy, _ = sidecar
    url = f"http://127.0.0.1:{proxy.outbound_port}/"
    plain = curl(url, host="hooks-app")
    assert plain.status == 200 and "x-hook" not in plain.headers and "content-type" in plain.headers
    hooked = curl(url, host="hooks-app", headers={"x-hook-test": "1"})
    assert hooked.status == 200 and hooked.headers["x-hook"] == "200" and "content-type" not in hooked.headers
    local = curl(url, host="no-such-service", headers={"x-hook-test": "1"})  # a local reply: 404 NR
    assert local.status == 404 and local.headers["x-hook"] == "404" and "content-type" not in local.headers
    assert local.headers["x-mesh-flags"] == "NR" and local.headers["content-length"] == str(len(local.body))


def test_each_connection_is_reported_open_and_complete_once_with_its_bytes(sidecar):
    proxy, log = sidecar
    before = len(hook_events(log))
    request = b"GET /a HTTP/1.1\r\nHost: hooks-app\r\n\r\n"
    last = b"GET /b HTTP/1.1\r\nHost: hooks-app\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.outbound_port), timeout=10) as client:
        client.sendall(request + last)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200 ") == 2
    wait_for(lambda: [e for e in hook_events(log)[before:] if e["event"] == "complete"], timeout=5,
             what="mesh_connection_complete")
    events = hook_events(log)[before:]
    assert [event["event"] for event in events] == ["open", "complete"]
    opened, complete = events
    assert opened["id"] == complete["id"]
    assert (complete["direction"], complete["protocol"], complete["source_address"]) == (
        "outbound", "http/1.1", "127.0.0.1")
    assert (complete["destination"], complete["upstream"], complete["peer"]) == (None, None, None)
    assert complete["requests"] == 2
    assert complete["bytes_received"] == len(request + last) and complete["bytes_sent"] == len(received)
    assert opened["duration"] == 0.0 and complete["duration"] > 0 and complete["start"] == opened["start"]
