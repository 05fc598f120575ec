"""The inbound ``destination_service`` labels, end to end: real sidecars, requests whose Host header is no
service name.

Istio reads the inbound service from the inbound cluster's metadata (``istio.services[0]``) and turns the
Host fallback off on inbound listeners, falling back to the workload's canonical service: a request that
reaches the app with ``Host: 127.0.0.1:PORT`` (a probe, a client without a sidecar) or ``Host:
shop.example.com`` (forwarded by an ingress gateway) counts for the service the app serves.

- ``api`` serves the ServiceEntry ``api`` of namespace ``shop``;
- ``worker`` is led to by no ServiceEntry: its canonical service (its ``app`` label).
"""

from __future__ import annotations

import pytest

from tests.harness import curl, free_port, wait_for
from tests.integration.test_proxy_support import endpoint, service_entry, write_config
from tests.integration.test_telemetry_support import series

NS = "shop"
API = f"api.{NS}.svc.cluster.local"


@pytest.fixture(scope="module")
def sidecars(tmp_path_factory, backend_factory, proxy_factory):
    api_app, worker_app = backend_factory("api"), backend_factory("worker")
    inbound = free_port()
    config = write_config(tmp_path_factory.mktemp("inbound-service-config"),
                          service_entry("api", [endpoint(("127.0.0.1", inbound), app="api")], namespace=NS))
    api = proxy_factory(config, "api", namespace=NS, app_port=api_app.port, inbound_port=inbound,
                        labels={"app": "api", "version": "v1"})
    worker = proxy_factory(config, "worker", namespace=NS, app_port=worker_app.port,
                           labels={"app": "worker", "version": "v2"})
    return api, worker


def _inbound_series(sidecar, count: int) -> list:
    """The ``reporter="destination"`` series of ``sidecar``'s istio_requests_total, once they count ``count``."""
    def ready():
        found = [(labels, value) for labels, value in series(sidecar, "istio_requests_total")
                 if labels["reporter"] == "destination"]
        return found if sum(value for _, value in found) >= count else None
    return wait_for(ready, 10, interval=0.2, what=f"{count} inbound requests counted")


@pytest.mark.parametrize("name, service", [
    ("api", (API, "api", NS)),  # the service its app serves
    ("worker", ("worker", "worker", NS)),  # no service leads to it: its canonical service
])
def test_inbound_requests_count_for_the_apps_service_whatever_their_host(sidecars, name, service):
    sidecar = dict(zip(("api", "worker"), sidecars))[name]
    hosts = (f"127.0.0.1:{sidecar.inbound_port}", "shop.example.com", "api")
    for host in hosts:
        assert curl(f"{sidecar.inbound_url}/get", host=host).status == 200, host
    found = _inbound_series(sidecar, len(hosts))
    assert {(labels["destination_service"], labels["destination_service_name"],
             labels["destination_service_namespace"]) for labels, _ in found} == {service}
    [(labels, value)] = found  # one series: the Host header is no part of the labels
    assert value == len(hosts)
    assert (labels["destination_workload"], labels["destination_workload_namespace"], labels["response_code"],
            labels["connection_security_policy"]) == (name, NS, "200", "none")
