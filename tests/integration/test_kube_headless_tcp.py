"""A headless Kubernetes Service on a TCP port, through real sidecars: a connection dialled at a pod's address
reaches that pod (through its sidecar, with mTLS), as Istio's per-instance listeners and ORIGINAL_DST do, and
another address on that port is not captured by the Service.

::

    this test (the app) -> client sidecar (--outbound-address 0.0.0.0, --outbound-tcp-port KAFKA)
        127.0.0.2:KAFKA -> kafka-0's sidecar (inbound, mTLS) -> banner "220 kafka-0 ready"
        127.0.0.3:KAFKA -> kafka-1's sidecar (inbound, mTLS) -> banner "220 kafka-1 ready"
        127.0.0.4:KAFKA -> no listener: closed (NR)

The ServiceEntry is the one :func:`mesh.control.kube.translate.service_entries` makes of the Service
(``clusterIP: None``), its EndpointSlices and Pods.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from mesh.control.kube.translate import service_entries
from tests.harness import free_port, wait_for
from tests.integration.test_identity_support import (
    TLS_MODE_ISTIO,
    issue_cert,
    make_ca,
    spiffe,
    static_identity_args,
)
from tests.integration.test_proxy_support import write_config
from tests.integration.test_tcp_routes import TcpPeers
from tests.integration.test_telemetry_support import total

NS = "data"
KAFKA = free_port()  # the Service port, the client sidecar's explicit TCP listener
PODS = {"kafka-0": "127.0.0.2", "kafka-1": "127.0.0.3"}
OUTSIDE = "127.0.0.4"  # an address on that port that is no pod of the Service


def _kube_objects(inbound: dict) -> tuple:
    service = {"metadata": {"name": "kafka", "namespace": NS},
               "spec": {"clusterIP": "None", "selector": {"app": "kafka"},
                        "ports": [{"name": "tcp-kafka", "port": KAFKA, "targetPort": KAFKA}]}}
    pods = [{"metadata": {"name": name, "namespace": NS, "labels": {"app": "kafka", **TLS_MODE_ISTIO}},
             "spec": {"serviceAccountName": "kafka"}} for name in PODS]
    # one slice per pod: each sidecar's inbound port is the endpoint port of its slice
    slices = [{"metadata": {"name": f"kafka-{name}", "namespace": NS,
                            "labels": {"kubernetes.io/service-name": "kafka"}},
               "addressType": "IPv4", "ports": [{"name": "tcp-kafka", "port": inbound[name], "protocol": "TCP"}],
               "endpoints": [{"addresses": [address], "hostname": name, "conditions": {"ready": True},
                              "targetRef": {"kind": "Pod", "name": name, "namespace": NS}}]}
              for name, address in PODS.items()]
    return [service], slices, pods


@pytest.fixture(scope="module")
def mesh(proxy_factory, tmp_path_factory, process_log_dir):
    work = tmp_path_factory.mktemp("kube-headless")
    ca = make_ca("headless test mesh")
    bundle = work / "ca.pem"
    bundle.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    apps = {name: free_port() for name in PODS}
    inbound = {name: free_port() for name in PODS}
    for name in PODS:
        TcpPeers(name, "--banner", apps[name], "--name", name, log_dir=process_log_dir).start()
    documents = [document for _, document in service_entries(*_kube_objects(inbound))]
    config = write_config(work / "config", *documents)
    certs = {account: issue_cert(work, account, ca, spiffe(namespace, account))
             for namespace, account in (("shop", "client"), (NS, "kafka"))}

    def sidecar(workload, namespace, account, outbound, app_port=None, inbound_port=None, tcp_ports=(), **labels):
        args = static_identity_args(*certs[account], bundle, account, outbound, tcp_ports)
        return proxy_factory(config, workload, namespace=namespace, app_port=app_port, inbound_port=inbound_port,
                             labels=labels, extra_args=args)

    proxies = {name: sidecar(name, NS, "kafka", address, apps[name], inbound[name], app="kafka")
               for name, address in PODS.items()}
    proxies["client"] = sidecar("client", "shop", "client", "0.0.0.0", tcp_ports=(KAFKA,), app="client")
    return {"proxies": proxies, "work": Path(work)}


def _banner(host: str) -> bytes:
    received = b""
    with socket.create_connection((host, KAFKA), timeout=5) as sock:
        while b"\n" not in received:
            data = sock.recv(1024)
            if not data:
                break
            received += data
    return received


def test_a_connection_to_a_pod_address_reaches_that_pod_through_its_sidecar(mesh):
    for _ in range(6):
        for name, address in PODS.items():
            assert _banner(address) == f"220 {name} ready\r\n".encode(), (name, address)
    for name in PODS:
        server = mesh["proxies"][name]
        wait_for(lambda server=server: total(server, "istio_tcp_connections_opened_total", reporter="destination",
                                             connection_security_policy="mutual_tls") >= 6,
                 timeout=5, what=f"{name}'s mTLS connections")
    dump = mesh["proxies"]["client"].admin("/config_dump")
    listeners = {listener["name"]: [chain.get("original_dst") for chain in listener["chains"]]
                 for listener in _find(dump, "tcp_listeners")}
    assert listeners == {f"{address}_{KAFKA}": [address] for address in PODS.values()}

def test_another_address_on_the_port_is_not_the_headless_service(mesh):
    assert _banner(OUTSIDE) == b""  # no listener at 127.0.0.4: closed (NR), not a load-balanced pod


def _find(value, key):
    """The first value of ``key`` in a nested JSON document."""
    if isinstance(value, dict):
        if key in value:
            return value[key]
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            found = _find(item, key)
            if found is not None:
                return found
    return None
