"""DestinationRule ``connectionPool.tcp.tcpKeepalive`` on a real sidecar's upstream connections.

The settings are read from the sidecar's sockets themselves (``getsockopt`` on a copy of each descriptor,
:func:`tests.harness.keepalive_of_connections`), after a request has left a pooled connection open.
``kept`` sets all three settings, ``defaults`` an empty ``tcpKeepalive`` (on, the system's settings), and
``plain`` none (off, as in Istio without the field).  The TCP proxy's connections are checked in
tests/integration/test_tcp_routes.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import keepalive_of_connections, wait_for
from tests.integration.test_proxy_support import (
    cluster_name,
    destination_rule,
    endpoint,
    service_entry,
    write_config,
)


@pytest.fixture(scope="module")
def mesh(backend_factory, proxy_factory, tmp_path_factory):
    backends = {name: backend_factory(name) for name in ("kept", "defaults", "plain")}
    config = write_config(
        tmp_path_factory.mktemp("keepalive-config"),
        *(service_entry(name, [endpoint(backend)]) for name, backend in backends.items()),
        destination_rule("kept", "kept", traffic_policy={"connectionPool": {"tcp": {
            "tcpKeepalive": {"time": "7s", "interval": "3s", "probes": 4}}}}),
        destination_rule("defaults", "defaults", traffic_policy={"connectionPool": {"tcp": {"tcpKeepalive": {}}}}),
    )
    return proxy_factory(config, "client"), backends


def pooled_connections(proxy, backend) -> list[dict]:
    """After one request to ``backend``'s service, the keepalive settings of the sidecar's connections to it
    (the request's connection stays pooled)."""
    assert proxy.curl(backend.name, "/").status == 200
    return wait_for(lambda: keepalive_of_connections(proxy.pid, backend.port), 5,
                    what=f"the sidecar's pooled connection to {backend.name}")


def system_setting(name: str) -> int:
    return int(Path(f"/proc/sys/net/ipv4/tcp_keepalive_{name}").read_text())


def test_tcp_keepalive_settings_reach_the_upstream_sockets(mesh):
    proxy, backends = mesh
    connections = pooled_connections(proxy, backends["kept"])
    assert connections == [{"keepalive": 1, "time": 7, "interval": 3, "probes": 4}] * len(connections), connections


def test_an_empty_tcp_keepalive_turns_it_on_with_the_system_settings(mesh):
    proxy, backends = mesh
    expected = {"keepalive": 1, "time": system_setting("time"), "interval": system_setting("intvl"),
                "probes": system_setting("probes")}
    connections = pooled_connections(proxy, backends["defaults"])
    assert connections == [expected] * len(connections), connections


def test_without_tcp_keepalive_it_is_off(mesh):
    proxy, backends = mesh
    connections = pooled_connections(proxy, backends["plain"])
    assert [connection["keepalive"] for connection in connections] == [0] * len(connections), connections


def test_config_dump_shows_the_settings(mesh):
    proxy, _ = mesh
    clusters = {cluster["name"]: cluster for cluster in proxy.admin("/config_dump")["config"]["clusters"]}
    assert clusters[cluster_name("kept")]["tcp_keepalive"] == {"time": 7, "interval": 3, "probes": 4}
    assert clusters[cluster_name("defaults")]["tcp_keepalive"] == {"time": None, "interval": None, "probes": None}
    assert clusters[cluster_name("plain")]["tcp_keepalive"] is None
