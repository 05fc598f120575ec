"""The Sidecar resource with real processes: mesh-control --config-dir and sidecars fed by it.

- a Sidecar selecting the frontend imports user-service only: payment-service is unknown to its sidecar
  (404, not in its clusters), while a workload the Sidecar does not select reaches both
- a change to the Sidecar's egress hosts reaches the frontend's sidecar without a restart
"""

from __future__ import annotations

import pytest

from tests.harness import wait_for
from tests.integration.test_distribution_support import ControlledProxy
from tests.integration.test_proxy_support import endpoint, service_entry, write_config

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
