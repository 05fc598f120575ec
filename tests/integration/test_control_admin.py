"""mesh-control's admin port: loopback-only by default; ``--admin-address`` opens it (Prometheus in a cluster)."""

from __future__ import annotations

import socket

from tests.harness.net import http_request

OTHER_ADDRESS = "127.0.0.2"  # a loopback address the default binding (127.0.0.1) does not cover


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_admin_port_is_loopback_only_by_default(control_factory):
    control = control_factory()
    assert control.admin_request("/ready")[0] == 200
    assert refused(OTHER_ADDRESS, control.admin_port)


def test_admin_address_serves_metrics_to_other_hosts_with_limits(control_factory):
    control = control_factory(extra_args=["--admin-address", "0.0.0.0"])
    status, body = http_request(OTHER_ADDRESS, control.admin_port, "/metrics")
    assert status == 200 and b"mesh_control_" in body, body[:300]
    status, body = http_request(OTHER_ADDRESS, control.admin_port, "/ready", headers={"x-pad": "x" * 9000})
    assert status == 413, (status, body)
