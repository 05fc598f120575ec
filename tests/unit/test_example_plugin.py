"""plugins/txmesh-example, the worked example of docs/hooks.md, through a real plugin manager.

tests/integration/test_example_plugin.py runs it in a sidecar with curl.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import txmesh_example
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from mesh import api
from mesh.api import Config
from mesh.plugins import DEFAULT_PLUGINS, fast_caller, make_plugin_manager, plugin_options
from mesh.proxy.context import RequestContext
from mesh.proxy.tap import ProxyOptions

SOURCE = Path(txmesh_example.__file__)


@dataclass
class Connection:
    """What a sidecar hands the connection hooks (:class:`mesh.api.ConnectionView`)."""

    direction: str = "outbound"
    protocol: str = "http/1.1"
    source_address: str = "127.0.0.1"
    destination: tuple | None = None
    upstream: tuple | None = None
    peer: str | None = None
    start: float = 0.0
    duration: float = 0.25
    bytes_received: int = 80
    bytes_sent: int = 200
    requests: int = 1
    cluster: str | None = None
    response_flags: str = ""


def test_the_option_is_on_mesh_proxys_command_line():
    options = plugin_options(ProxyOptions, "proxy", argv=[])
    options.parseOptions(["--workload", "w", "--config-dir", ".", "--example-header-value", "hi"])
    assert options["example-header-value"] == "hi"
    assert "--example-header-value" in str(options)


def test_the_response_headers_name_the_value_and_count_connections():
    plugin = txmesh_example.ExamplePlugin()
    pm = make_plugin_manager([name for name, _ in DEFAULT_PLUGINS], load_entry_points=False)
    pm.register(plugin, name="example")
    pm.configure(Config("proxy", {"example-header-value": "hello"}, Clock(), None, pm))
    open_hook = fast_caller(pm.hook.mesh_connection_open)
    complete_hook = fast_caller(pm.hook.mesh_connection_complete)
    headers = fast_caller(pm.hook.mesh_response_headers)
    connection = Connection()
    assert isinstance(connection, api.ConnectionView)
    open_hook(connection=connection)
    open_hook(connection=Connection(protocol="tcp"))
    assert headers(ctx=RequestContext.for_test(), status=200, headers=()) == [
        [(b"x-example", b"hello"), (b"x-example-connections", b"2")]]
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        complete_hook(connection=connection)
        pm.unconfigure()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert (plugin.closed, plugin.bytes_received, plugin.bytes_sent) == (1, 80, 200)
    texts = [event["log_format"].format(**event) for event in events
             if event.get("log_namespace") == "txmesh_example"]
    assert texts == ["example: outbound http/1.1 connection from 127.0.0.1 closed after 0.250s: 1 request(s), "
                     "80 bytes in, 200 bytes out", "example: 2 connection(s) accepted, 1 ended"]


def test_without_the_option_or_outside_a_sidecar_it_is_idle():
    for role, options in (("proxy", {}), ("control", {"example-header-value": "x"})):
        plugin = txmesh_example.ExamplePlugin()
        pm = make_plugin_manager([name for name, _ in DEFAULT_PLUGINS], load_entry_points=False)
        pm.register(plugin, name="example")
        pm.configure(Config(role, options, Clock(), None, pm))
        assert pm.idle == {"example": (plugin, "needs mesh-proxy --example-header-value")}
        assert fast_caller(pm.hook.mesh_response_headers)(ctx=None, status=200, headers=()) == []


def test_it_imports_only_the_plugin_api():
    """The example shows what a third party may use: mesh.api (and mesh.hookspecs), nothing else of txmesh."""
    tree = ast.parse(SOURCE.read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {name for name in imported if name == "mesh" or name.startswith("mesh.")} <= {"mesh.api", "mesh.hookspecs"}
