"""builtin.metadata_exchange end to end: real sidecars with certificates from a real mesh-control, curl.

``frontend`` (a client sidecar, outbound only) calls ``user-service`` (a sidecar in front of the demo
app) over mTLS.  The sidecars exchange workload metadata in ``x-txmesh-peer-metadata``: both
reporters' ``istio_requests_total`` and both access logs name both workloads, neither app sees the
header, and a plaintext caller's forged header is stripped and not believed.  A third sidecar,
``legacy``, runs with ``--disable-plugin builtin.metadata_exchange``.
"""

from __future__ import annotations

import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.telemetry.metadata_exchange import encode
from mesh.telemetry.peers import PeerMetadata
from tests.harness import curl, free_port, wait_for
from tests.integration.test_identity_support import mesh_endpoint
from tests.integration.test_proxy_support import service_entry, write_config
from tests.integration.test_telemetry_support import access_log, scrape

NS = "shop"
USER_SERVICE = f"user-service.{NS}.svc.cluster.local"
HEADER = "x-txmesh-peer-metadata"


@pytest.fixture(scope="module")
def mesh(control_factory, backend_factory, proxy_factory, tmp_path_factory):
    control = control_factory()
    app_port, inbound_port = free_port(), free_port()
    config = write_config(tmp_path_factory.mktemp("exchange-config"), service_entry(
        "user-service", [mesh_endpoint(inbound_port, "user-service", app="user-service", version="v1")],
        namespace=NS))
    logs = tmp_path_factory.mktemp("exchange-logs")
    backend_factory("user-service", port=app_port)
    sidecars = {
        "server": proxy_factory(config, "user-service", namespace=NS, app_port=app_port, inbound_port=inbound_port,
                                labels={"app": "user-service", "version": "v1"},
                                extra_args=[*control.proxy_args(NS, "user-service"),
                                            "--access-log", logs / "server.log"]),
        "client": proxy_factory(config, "frontend", namespace=NS, labels={"app": "frontend", "version": "v2"},
                                extra_args=[*control.proxy_args(NS, "frontend"), "--access-log", logs / "client.log"]),
        "legacy": proxy_factory(config, "legacy", namespace=NS, labels={"app": "legacy"},
                                extra_args=[*control.proxy_args(NS, "legacy"), "--access-log", logs / "legacy.log",
                                            "--disable-plugin", "builtin.metadata_exchange"]),
    }
    return {"logs": logs, **sidecars}


def _request_id() -> str:
    return f"exchange-{uuid.uuid4().hex[:12]}"


def _call(sidecar, request_id):
    reply = sidecar.curl("user-service", "/", headers={"x-request-id": request_id})
    assert reply.status == 200, reply
    return reply


def _line(mesh, name, request_id) -> dict:
    path = mesh["logs"] / f"{name}.log"
    return wait_for(lambda: next((entry for entry in access_log(path) if entry["request_id"] == request_id), None),
                    10, what=f"the line of {request_id} in {path}")


def _requests(sidecar, reporter) -> list:
    """The labels of ``sidecar``'s istio_requests_total series of ``reporter`` with response_code 200."""
    text = scrape(sidecar.metrics_port, "/stats/prometheus").decode()
    return [sample.labels for family in text_string_to_metric_families(text) if family.name == "istio_requests"
            for sample in family.samples
            if sample.labels.get("reporter") == reporter and sample.labels.get("response_code") == "200"]


def _workloads(labels, side) -> tuple:
    return tuple(labels[f"{side}_{name}"] for name in ("workload", "workload_namespace", "app", "version",
                                                       "canonical_service", "canonical_revision"))


FRONTEND = ("frontend", NS, "frontend", "v2", "frontend", "v2")
#: What a plaintext caller claims (well-formed, and in the server's own namespace).
FORGED = encode(PeerMetadata("payments", NS, "payments", "v1", "payments", "v1")).decode()
USER = ("user-service", NS, "user-service", "v1", "user-service", "v1")


def test_the_server_learns_the_caller_and_its_app_never_sees_the_header(mesh):
    reply = _call(mesh["client"], _request_id())
    assert HEADER not in reply.json()["headers"]
    rows = wait_for(lambda: _requests(mesh["server"], "destination"), 10, what="a destination series")
    assert {_workloads(labels, "source") for labels in rows} == {FRONTEND}
    assert {_workloads(labels, "destination") for labels in rows} == {USER}


def test_the_client_learns_the_server_and_its_app_never_sees_the_header(mesh):
    reply = _call(mesh["client"], _request_id())
    assert HEADER not in reply.headers
    rows = _requests(mesh["client"], "source")
    assert {_workloads(labels, "destination") for labels in rows} == {USER}
    assert {_workloads(labels, "source") for labels in rows} == {FRONTEND}


def test_both_access_logs_name_both_workloads(mesh):
    request_id = _request_id()
    _call(mesh["client"], request_id)
    expected = {"source_workload": "frontend", "source_workload_namespace": NS,
                "destination_workload": "user-service", "destination_workload_namespace": NS}
    for name in ("server", "client"):
        line = _line(mesh, name, request_id)
        assert {key: line[key] for key in expected} == expected, (name, line)


def test_a_plaintext_callers_forged_metadata_is_stripped_and_not_believed(mesh):
    request_id = _request_id()
    reply = curl(mesh["server"].inbound_url + "/", host="user-service",
                 headers={"x-request-id": request_id, HEADER: FORGED})
    assert reply.status == 200 and HEADER not in reply.json()["headers"] and HEADER not in reply.headers
    line = _line(mesh, "server", request_id)
    assert (line["source_workload"], line["source_principal"]) == (None, None)
    assert "payments" not in {labels["source_workload"] for labels in _requests(mesh["server"], "destination")}


def test_a_sidecar_without_the_plugin_neither_tells_nor_learns(mesh):
    request_id = _request_id()
    reply = _call(mesh["legacy"], request_id)
    assert HEADER not in reply.json()["headers"] and HEADER not in reply.headers
    assert _line(mesh, "legacy", request_id)["destination_workload"] is None
    server = _line(mesh, "server", request_id)
    assert (server["source_workload"], server["source_principal"]) == (None, f"spiffe://cluster.local/ns/{NS}/sa/legacy")
