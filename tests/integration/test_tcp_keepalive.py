"""DestinationRule ``connectionPool.tcp.tcpKeepalive`` on a real sidecar's upstream connections.

The settings are read from the sidecar's sockets themselves (``getsockopt`` on a copy of each descriptor,
:func:`tests.harness.connections_to`), after a request has left a pooled connection open.
``kept`` sets all three settings, ``defaults`` an empty ``tcpKeepalive`` (on, the system's settings), and
``plain`` none (off, as in Istio without the field); ``split`` sets one for the service and another for
its subset ``v1`` (routed by ``/v1``), over the same endpoint.  The last test edits ``kept``'s rule on the
running sidecar.  The TCP proxy's connections are checked in tests/integration/test_tcp_routes.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.harness import connections_to, wait_for
from tests.integration.test_proxy_support import (
    cluster_name,
    destination_rule,
    endpoint,
    route_to,
    service_entry,
    virtual_service,
    write_config,
)


def keepalive(**settings) -> dict:
    return {"connectionPool": {"tcp": {"tcpKeepalive": settings}}}


@pytest.fixture(scope="module")
def mesh(backend_factory, proxy_factory, tmp_path_factory):
    backends = {name: backend_factory(name) for name in ("kept", "defaults", "plain", "split")}
    config = write_config(
        tmp_path_factory.mktemp("keepalive-config"),
        *(service_entry(name, [endpoint(backend, version="v1")]) for name, backend in backends.items()),
        destination_rule("kept", "kept", traffic_policy=keepalive(time="7s", interval="3s", probes=4)),
        destination_rule("defaults", "defaults", traffic_policy=keepalive()),
        destination_rule("split", "split", traffic_policy=keepalive(time="5s"), subsets=[
            {"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": keepalive(time="6s")}]),
        virtual_service("split", ["split"], [route_to("split", "v1", match=[{"uri": {"prefix": "/v1"}}]),
                                             route_to("split")]),
    )
    return proxy_factory(config, "client"), backends


def pooled_connections(proxy, backend, path="/") -> list[dict | None]:
    """After one request to ``backend``'s service, the keepalive settings of the sidecar's connections to it
    (the request's connection stays pooled; None: keepalive off)."""
    assert proxy.curl(backend.name, path).status == 200
    connections = wait_for(lambda: connections_to(proxy.pid, backend.port), 5,
                           what=f"the sidecar's pooled connection to {backend.name}")
    return [connection["keepalive"] for connection in connections]


def system_setting(name: str) -> int:
    return int(Path(f"/proc/sys/net/ipv4/tcp_keepalive_{name}").read_text())


def test_tcp_keepalive_settings_reach_the_upstream_sockets(mesh):
    proxy, backends = mesh
    connections = pooled_connections(proxy, backends["kept"])
    assert connections == [{"time": 7, "interval": 3, "probes": 4}] * len(connections), connections


def test_an_empty_tcp_keepalive_turns_it_on_with_the_system_settings(mesh):
    proxy, backends = mesh
    expected = {"time": system_setting("time"), "interval": system_setting("intvl"),
                "probes": system_setting("probes")}
    connections = pooled_connections(proxy, backends["defaults"])
    assert connections == [expected] * len(connections), connections


def test_without_tcp_keepalive_it_is_off(mesh):
    proxy, backends = mesh
    connections = pooled_connections(proxy, backends["plain"])
    assert connections == [None] * len(connections), connections


def test_config_dump_shows_the_settings(mesh):
    proxy, _ = mesh
    clusters = {cluster["name"]: cluster for cluster in proxy.admin("/config_dump")["config"]["clusters"]}
    assert clusters[cluster_name("kept")]["tcp_keepalive"] == {"time": 7, "interval": 3, "probes": 4}
    assert clusters[cluster_name("defaults")]["tcp_keepalive"] == {"time": None, "interval": None, "probes": None}
    assert clusters[cluster_name("plain")]["tcp_keepalive"] is None


def test_a_subset_keeps_its_own_settings_on_the_endpoint_it_shares_with_its_service(mesh):
    """The service's connections and its subset's go to one endpoint, each with its rule's settings (the
    subset's were once lost: the two clusters shared the endpoint's pool)."""
    proxy, backends = mesh
    pooled_connections(proxy, backends["split"])  # the service's cluster: time 5
    connections = pooled_connections(proxy, backends["split"], "/v1")  # subset v1's: time 6
    assert sorted(connection["time"] for connection in connections) == [5, 6], connections


def test_an_edited_rule_reaches_the_running_sidecars_connections(mesh):
    """After a push that changes ``kept``'s tcpKeepalive, the pooled connection made under the old settings
    is closed and the next one has the new ones (they were once kept until the endpoint left the config)."""
    proxy, backends = mesh
    pooled_connections(proxy, backends["kept"])
    version = proxy.admin("/config_dump")["version"]
    documents = list(yaml.safe_load_all((proxy.config_dir / "mesh.yaml").read_text()))
    write_config(proxy.config_dir, *(destination_rule("kept", "kept", traffic_policy=keepalive(time="9s"))
                                     if document["kind"] == "DestinationRule" and document["metadata"]["name"] == "kept"
                                     else document for document in documents))
    proxy.reload()
    wait_for(lambda: proxy.admin("/config_dump")["version"] != version, 10, what="the edited rule to apply")
    connections = pooled_connections(proxy, backends["kept"])
    assert [connection["time"] for connection in connections] == [9], connections
