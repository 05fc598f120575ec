"""A service with several HTTP ports, through a real sidecar: a request goes to the port it was sent to.

Istio builds the routes of each port, so a destination without a port (and the default route of a host
no VirtualService routes) goes to the cluster of the port the request was sent to. ``api`` has ports 9080
(its ``main`` backend) and 9090 (its ``admin`` backend, another process behind the same address);
``admin-api`` is the same with a VirtualService whose destination names no port.
"""

from __future__ import annotations

import pytest

from tests.integration.test_proxy_support import NETWORKING, virtual_service, write_config

MAIN, ADMIN = "api-main", "api-admin"


def two_port_service(name: str, backends: dict) -> dict:
    return {"apiVersion": NETWORKING, "kind": "ServiceEntry", "metadata": {"name": name, "namespace": "default"},
            "spec": {"hosts": [name], "location": "MESH_INTERNAL", "resolution": "STATIC",
                     "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"},
                               {"number": 9090, "name": "http-admin", "protocol": "HTTP"}],
                     "endpoints": [{"address": "127.0.0.1", "ports": {"http": backends[MAIN].port,
                                                                      "http-admin": backends[ADMIN].port}}]}}


@pytest.fixture(scope="module")
def proxy(backend_factory, proxy_factory, tmp_path_factory):
    backends = {name: backend_factory(name) for name in (MAIN, ADMIN)}
    config = write_config(
        tmp_path_factory.mktemp("ports-config"),
        two_port_service("api", backends), two_port_service("routed", backends),
        virtual_service("routed", ["routed"], [{"route": [{"destination": {"host": "routed"}}]}]))
    return proxy_factory(config, "client")


@pytest.mark.parametrize("host", ["api", "routed"], ids=["default-route", "virtual-service"])
@pytest.mark.parametrize("port, expected", [(9080, MAIN), (9090, ADMIN), (None, MAIN)])
def test_a_request_goes_to_the_port_it_was_sent_to(proxy, host, port, expected):
    result = proxy.curl(host if port is None else f"{host}:{port}", "/")
    assert result.status == 200, result
    assert result.headers["x-demo-service"] == expected
