"""The Sidecar resource with real processes: mesh-control --config-dir and sidecars fed by it.

- a Sidecar selecting the frontend imports user-service only: payment-service is unknown to its sidecar
  (404, not in its clusters), while a workload the Sidecar does not select reaches both
- a change to the Sidecar's egress hosts reaches the frontend's sidecar without a restart
- a root-namespace default Sidecar importing ``./*`` gives each sidecar its own namespace's services
  (``.`` is the workload's namespace, as in Istio), and the services a VirtualService it imports routes
  to: ``/pay`` on user-service reaches payment-service of another namespace
"""

from __future__ import annotations

import pytest

from tests.harness import wait_for
from tests.integration.test_distribution_support import ControlledProxy
from tests.integration.test_proxy_support import endpoint, route_to, service_entry, virtual_service, write_config

NETWORKING = "networking.istio.io/v1"


def sidecar(hosts) -> dict:
    return {"apiVersion": NETWORKING, "kind": "Sidecar", "metadata": {"name": "frontend", "namespace": "default"},
            "spec": {"workloadSelector": {"labels": {"app": "frontend"}}, "egress": [{"hosts": list(hosts)}]}}


@pytest.fixture(scope="module")
def mesh(control_factory, backend_factory, process_log_dir, tmp_path_factory):
    users, payments = backend_factory("user-service"), backend_factory("payment-service")
    services = (service_entry("user-service", [endpoint(users)]),
                service_entry("payment-service", [endpoint(payments)]))
    config = write_config(tmp_path_factory.mktemp("sidecar-config"), *services, sidecar(["./user-service"]))
    control = control_factory(extra_args=["--config-dir", str(config)])
    frontend = ControlledProxy(control, "frontend", labels={"app": "frontend"}, log_dir=process_log_dir).start()
    other = ControlledProxy(control, "backoffice", labels={"app": "backoffice"}, log_dir=process_log_dir).start()
    yield {"config": config, "services": services, "frontend": frontend, "other": other}
    other.stop()
    frontend.stop()
    control.stop()


def clusters(proxy) -> set:
    return {name.rpartition("|")[2] for name in proxy.admin("/clusters")}


def test_the_sidecar_narrows_what_the_selected_workload_reaches(mesh):
    frontend, other = mesh["frontend"], mesh["other"]
    assert frontend.curl("user-service", "/").status == 200
    assert frontend.curl("payment-service", "/").status == 404
    assert clusters(frontend) == {"user-service.default.svc.cluster.local"}
    assert other.curl("payment-service", "/").status == 200
    assert clusters(other) == {"user-service.default.svc.cluster.local", "payment-service.default.svc.cluster.local"}


def test_a_change_of_egress_hosts_reaches_the_sidecar_without_restart(mesh):
    frontend = mesh["frontend"]
    write_config(mesh["config"], *mesh["services"], sidecar(["./user-service", "./payment-service"]))
    wait_for(lambda: frontend.curl("payment-service", "/").status == 200, 10, what="payment-service imported")
    write_config(mesh["config"], *mesh["services"], sidecar(["./user-service"]))
    wait_for(lambda: frontend.curl("payment-service", "/").status == 404, 10, what="payment-service dropped")


USERS = "user-service.shop.svc.cluster.local"
PAYMENTS = "payment-service.billing.svc.cluster.local"


@pytest.fixture(scope="module")
def root_default(control_factory, backend_factory, process_log_dir, tmp_path_factory):
    """The mesh-wide default Sidecar (root namespace istio-system) imports ``./*``; user-service is in shop,
    payment-service in billing, and shop's VirtualService for user-service sends ``/pay`` to payment-service.
    A sidecar in each namespace."""
    users, payments = backend_factory("user-service"), backend_factory("payment-service")
    default = {"apiVersion": NETWORKING, "kind": "Sidecar",
               "metadata": {"name": "default", "namespace": "istio-system"}, "spec": {"egress": [{"hosts": ["./*"]}]}}
    routes = virtual_service("user-service", ["user-service"],
                             [route_to(PAYMENTS, match=[{"uri": {"prefix": "/pay"}}]), route_to("user-service")],
                             namespace="shop")
    config = write_config(tmp_path_factory.mktemp("root-sidecar-config"),
                          service_entry("user-service", [endpoint(users)], namespace="shop"),
                          service_entry("payment-service", [endpoint(payments)], namespace="billing"),
                          default, routes)
    control = control_factory(extra_args=["--config-dir", str(config)])
    shop = ControlledProxy(control, "web", namespace="shop", labels={"app": "web"}, log_dir=process_log_dir).start()
    billing = ControlledProxy(control, "ledger", namespace="billing", labels={"app": "ledger"},
                              log_dir=process_log_dir).start()
    yield {"shop": shop, "billing": billing}
    billing.stop()
    shop.stop()
    control.stop()


def test_dot_in_the_root_default_is_each_workloads_namespace(root_default):
    shop, billing = root_default["shop"], root_default["billing"]
    result = shop.curl("user-service", "/")
    assert result.status == 200 and result.headers["x-demo-service"] == "user-service", result
    assert billing.curl("payment-service", "/").status == 200
    assert billing.curl(USERS, "/").status == 404  # shop is not billing's '.'
    assert clusters(billing) == {PAYMENTS}


def test_the_destination_of_an_imported_virtual_service_is_imported(root_default):
    shop = root_default["shop"]
    result = shop.curl("user-service", "/pay/charge")
    assert result.status == 200 and result.headers["x-demo-service"] == "payment-service", result
    assert clusters(shop) == {USERS, PAYMENTS}
