"""The worked example of docs/hooks.md, plugins/txmesh-example, in a real sidecar with curl.

The plugin is installed in the venv (``make bootstrap`` installs every plugins/*/) and found through
its ``mesh.plugins`` entry point.  With ``--example-header-value`` (its own option, from
``mesh_addoption``) every response carries ``x-example`` and ``x-example-connections`` (the
connections the sidecar accepted so far, from ``mesh_connection_open``), and the sidecar logs one line
per connection that ended (``mesh_connection_complete``) and the totals when it stops
(``mesh_unconfigure``).  Without the option the plugin is idle.  With ``MESH_TRACE_HOOKS=1`` the sidecar
logs every hook call, the example's included.
"""

from __future__ import annotations

import importlib.metadata

import pytest

from tests.harness import curl, wait_for
from tests.integration.test_proxy_support import endpoint, service_entry, write_config


def test_the_example_is_installed_through_its_entry_point():
    names = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="mesh.plugins")}
    assert names.get("example") == "txmesh_example:plugin", (
        f"mesh.plugins entry points: {names}; run `make bootstrap` to install plugins/txmesh-example")


@pytest.fixture(scope="module")
def config(backend_factory, tmp_path_factory):
    app = backend_factory("example-app")
    return write_config(tmp_path_factory.mktemp("example-config"), service_entry("example-app", [endpoint(app)]))


def test_the_option_adds_a_header_and_the_connections_are_counted(config, proxy_factory):
    proxy = proxy_factory(config, "example-client", extra_args=["--example-header-value", "hello"])
    assert "example" not in proxy.admin("/config_dump")["plugins_idle"]
    url = f"http://127.0.0.1:{proxy.outbound_port}/"
    first = curl(url, host="example-app")
    assert first.status == 200 and first.headers["x-example"] == "hello"
    assert first.headers["x-example-connections"] == "1"
    local = curl(url, host="no-such-service")  # a local reply (404 NR) gets the headers too
    assert local.status == 404 and local.headers["x-example"] == "hello"
    assert local.headers["x-example-connections"] == "2"
    wait_for(lambda: proxy.log_path.read_text().count("example: outbound http/1.1 connection from 127.0.0.1") == 2,
             10.0, interval=0.05, what="a log line for each of the two connections")
    line = next(line for line in proxy.log_path.read_text().splitlines() if "example: outbound" in line)
    assert "1 request(s)" in line and "bytes in" in line
    proxy.stop()
    assert "example: 2 connection(s) accepted, 2 ended" in proxy.log_path.read_text()


def test_without_the_option_the_plugin_is_idle(config, proxy_factory):
    proxy = proxy_factory(config, "example-idle")
    dump = proxy.admin("/config_dump")
    assert "example" in dump["plugins"]
    assert dump["plugins_idle"]["example"] == "needs mesh-proxy --example-header-value"
    response = curl(f"http://127.0.0.1:{proxy.outbound_port}/", host="example-app")
    assert response.status == 200 and "x-example" not in response.headers


def test_mesh_trace_hooks_logs_the_plugins_calls(config, proxy_factory):
    """pluggy's hook-call monitoring, asked for with MESH_TRACE_HOOKS=1: the hot path's calls are logged too."""
    proxy = proxy_factory(config, "example-traced", extra_args=["--example-header-value", "traced"],
                          env={"MESH_TRACE_HOOKS": "1"})
    assert curl(f"http://127.0.0.1:{proxy.outbound_port}/", host="example-app").status == 200
    wait_for(lambda: "finish mesh_connection_complete" in proxy.log_path.read_text(), 10.0, interval=0.05,
             what="the connection's hook calls in the log")
    traced = [line for line in proxy.log_path.read_text().splitlines() if "hook trace:" in line]
    for hook in ("mesh_configure", "mesh_route", "mesh_response_headers", "mesh_request_complete",
                 "mesh_connection_open"):
        assert any(f"{hook} [hook]" in line for line in traced), hook
    assert any("finish mesh_response_headers --> [[(b'x-example', b'traced')" in line for line in traced)
