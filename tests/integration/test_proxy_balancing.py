"""Each DestinationRule load-balancing policy, observed through a real sidecar over the same two endpoints.

The services ``rr``, ``wrr``, ``lr``, ``rand`` and ``hash`` all have the endpoints ``lb-a`` and ``lb-b``; the service
``busy`` has only ``lb-b``.  Endpoint state (active requests) is per address and port, shared by every cluster
that contains the endpoint, so requests held open through ``busy`` load ``lb-b`` for ``lr`` too.

The peak-EWMA plugin, installed in the venv, would take over every policy but consistentHash: this module's
proxy runs with ``--disable-plugin peak_ewma`` (tests/integration/test_proxy_plugins.py covers the plugin).
"""

from __future__ import annotations

import socket
import struct
from collections import Counter

import pytest

from tests.harness import RawConnection, wait_for
from tests.integration.test_proxy_support import (
    cluster_name,
    curl_many,
    destination_rule,
    endpoint,
    endpoint_stats,
    lb,
    served_by,
    service_entry,
    write_config,
)

A, B = "lb-a", "lb-b"


@pytest.fixture(scope="module")
def mesh(backend_factory, proxy_factory, tmp_path_factory):
    a, b = backend_factory(A), backend_factory(B)
    both = [endpoint(a), endpoint(b)]
    # weighted endpoints of their own: see test_endpoint_weight_is_per_service for why
    wa, wb = backend_factory(A + "-w"), backend_factory(B + "-w")
    weighted = [dict(endpoint(wa), weight=3), dict(endpoint(wb), weight=1)]
    config = write_config(
        tmp_path_factory.mktemp("balancing-config"),
        service_entry("rr", both), destination_rule("rr", "rr", traffic_policy=lb("ROUND_ROBIN")),
        service_entry("wrr", weighted), destination_rule("wrr", "wrr", traffic_policy=lb("ROUND_ROBIN")),
        service_entry("rr-shared", [endpoint(wa), endpoint(wb)]),
        destination_rule("rr-shared", "rr-shared", traffic_policy=lb("ROUND_ROBIN")),
        service_entry("lr", both), destination_rule("lr", "lr", traffic_policy=lb("LEAST_REQUEST")),
        service_entry("rand", both), destination_rule("rand", "rand", traffic_policy=lb("RANDOM")),
        service_entry("hash", both),
        destination_rule("hash", "hash",
                         traffic_policy={"loadBalancer": {"consistentHash": {"httpHeaderName": "X-User"}}}),
        service_entry("busy", [endpoint(b)]),
    )
    proxy = proxy_factory(config, "client", extra_args=["--disable-plugin", "peak_ewma"])
    return proxy, a, b


def names(lines) -> list[str]:
    served_by(lines)  # all 200
    return [line.split(" ", 1)[1] for line in lines]


def test_round_robin_alternates_strictly(mesh):
    proxy, _, _ = mesh
    order = names(curl_many(proxy.outbound_url + "/", 40, host="rr"))
    assert all(first != second for first, second in zip(order, order[1:])), order
    assert Counter(order) == {A: 20, B: 20}


def test_round_robin_keeps_its_place_across_config_swaps(mesh):
    """Every swap rebuilds the clusters; the cursor must survive it.  It once restarted at the first
    endpoint on every push, so while pushes came often (sidecars announcing themselves) most requests
    went to one endpoint (a restart at a random place would pass here once in 32 runs).  Here one
    request goes between every two swaps: it must still alternate."""
    proxy, _, _ = mesh
    extra = proxy.config_dir / "zz-swap.yaml"
    order = []
    try:
        for swap in range(6):
            order += names(curl_many(proxy.outbound_url + "/", 1, host="rr"))
            version = proxy.admin("/config_dump")["version"]
            write_config(proxy.config_dir, service_entry(f"swap-{swap}", [endpoint(("127.0.0.1", 9))]),
                         name=extra.name)
            proxy.reload()
            wait_for(lambda old=version: proxy.admin("/config_dump")["version"] != old, 10, what="the swap to apply")
    finally:
        extra.unlink(missing_ok=True)
    assert all(first != second for first, second in zip(order, order[1:])), order


def test_round_robin_honours_endpoint_weights(mesh):
    proxy, _, _ = mesh
    order = names(curl_many(proxy.outbound_url + "/", 40, host="wrr"))
    assert Counter(order) == {A + "-w": 30, B + "-w": 10}
    # smooth weighted round robin interleaves: never more than three of A in a row
    assert "".join("a" if name == A + "-w" else "b" for name in order).find("aaaa") == -1, order


def test_endpoint_weight_is_per_service(mesh):
    """rr-shared has the endpoints of wrr with the default weight 1: it must alternate strictly (an endpoint
    shared by two services once took the weight of the service compiled last)."""
    proxy, _, _ = mesh
    order = names(curl_many(proxy.outbound_url + "/", 20, host="rr-shared"))
    assert Counter(order) == {A + "-w": 10, B + "-w": 10}, order


def _hold(proxy, count: int, host: str) -> list[RawConnection]:
    """Open ``count`` connections each with a long /delay request in flight through ``host``."""
    held = []
    for _ in range(count):
        connection = RawConnection("127.0.0.1", proxy.outbound_port)
        connection.send(f"GET /delay/20000 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        held.append(connection)
    return held


def _reset(connections) -> None:
    """Close with RST, so the proxy drops the exchanges at once (a FIN would be a half-close it answers)."""
    for connection in connections:
        connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()


def test_least_request_avoids_the_loaded_endpoint(mesh):
    proxy, a, b = mesh
    held = _hold(proxy, 3, "busy")  # three requests in flight on lb-b
    try:
        wait_for(lambda: endpoint_stats(proxy, cluster_name("busy"), b)["active_requests"] == 3, 5,
                 what="three held requests on lb-b")
        assert endpoint_stats(proxy, cluster_name("lr"), b)["active_requests"] == 3, "state is per endpoint"
        # With two endpoints, the two random choices are always both: the least loaded wins every time.
        assert names(curl_many(proxy.outbound_url + "/", 30, host="lr")) == [A] * 30
        # The same load does not move round robin: that is what tells the two policies apart.
        assert Counter(names(curl_many(proxy.outbound_url + "/", 10, host="rr"))) == {A: 5, B: 5}
    finally:
        _reset(held)
    wait_for(lambda: endpoint_stats(proxy, cluster_name("busy"), b)["active_requests"] == 0, 3,
             what="the held requests to end")
    # Unloaded again, ties are broken at random: both endpoints get traffic.
    assert set(names(curl_many(proxy.outbound_url + "/", 60, host="lr"))) == {A, B}


def test_random_spreads_without_alternating(mesh):
    proxy, _, _ = mesh
    requests = 400
    order = names(curl_many(proxy.outbound_url + "/", requests, host="rand"))
    counts = Counter(order)
    assert set(counts) == {A, B}
    assert abs(counts[A] - requests / 2) <= 5 * (requests ** 0.5) / 2, counts    # 5 sd of Binomial(400, .5)
    repeats = sum(first == second for first, second in zip(order, order[1:]))
    assert repeats >= 140, f"only {repeats} of {requests - 1} neighbours are equal: looks like alternation"


def test_consistent_hash_keeps_a_key_on_one_endpoint(mesh):
    proxy, _, _ = mesh
    users = [f"user-{i}" for i in range(30)]
    # interleaved, so that any rotating policy would move a user between endpoints
    requests = [(proxy.outbound_url + "/", {"x-user": user}) for _ in range(4) for user in users]
    order = names(curl_many(None, host="hash", requests=requests))
    by_user = {}
    for (_, headers), name in zip(requests, order):
        by_user.setdefault(headers["x-user"], set()).add(name)
    assert all(len(endpoints) == 1 for endpoints in by_user.values()), by_user
    spread = Counter(next(iter(endpoints)) for endpoints in by_user.values())
    assert set(spread) == {A, B}, f"30 keys all hashed to one endpoint: {spread}"
    # the header name compares case-insensitively; the value does not change with the request's casing of it
    again = names(curl_many(None, host="hash", requests=[(proxy.outbound_url + "/x", {"X-USER": "user-7"})] * 5))
    assert set(again) == by_user["user-7"]


def test_consistent_hash_without_the_header_falls_back_to_round_robin(mesh):
    proxy, _, _ = mesh
    order = names(curl_many(proxy.outbound_url + "/", 10, host="hash"))
    assert all(first != second for first, second in zip(order, order[1:])), order
