"""Shared helpers of the Kubernetes control-plane tests (tests/integration/test_kube_*.py); no tests here.

Objects are written with the real ``kubernetes`` client to the test API server
(:class:`~tests.harness.KubeAPI`); mesh-control reads them through a :class:`~tests.harness.cable.Cable`
(a cuttable TCP forwarder), so a test can partition the control plane from the API server while it keeps
writing to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.harness import REPO_ROOT

CRDS = REPO_ROOT / "deploy" / "base" / "crds"
ISTIO = {"networking.txmesh.io": "networking.istio.io", "security.txmesh.io": "security.istio.io"}


def install_crds(api_client, istio: bool = False) -> None:
    """Create deploy/base/crds in the API server; with ``istio``, the same kinds in Istio's groups too."""
    from kubernetes import client

    extensions = client.ApiextensionsV1Api(api_client)
    for path in sorted(CRDS.glob("*.io.yaml")):
        crd = yaml.safe_load(path.read_text())
        extensions.create_custom_resource_definition(crd)
        if istio:
            group = ISTIO[crd["spec"]["group"]]
            crd["spec"]["group"] = group
            crd["metadata"]["name"] = f"{crd['spec']['names']['plural']}.{group}"
            extensions.create_custom_resource_definition(crd)


def kubeconfig_via(kube, port: int, path: Path) -> Path:
    """A kubeconfig for ``kube`` whose server is ``127.0.0.1:port`` (a Cable in front of it)."""
    config = json.loads(kube.write_kubeconfig(path).read_text())
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{port}"
    path.write_text(json.dumps(config))
    return path


def service(name: str, port: int, target_port: int) -> dict:
    """A ClusterIP Service with one HTTP port."""
    return {"metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port, "targetPort": target_port}]}}


def pod(name: str, labels: dict, service_account: str) -> dict:
    return {"metadata": {"name": name, "labels": labels},
            "spec": {"serviceAccountName": service_account, "containers": [{"name": "app", "image": "demo"}]}}


def endpoint_slice(service_name: str, name: str, port: int, endpoints) -> dict:
    """An EndpointSlice of ``service_name``; ``endpoints`` are ``(address, pod, ready)``."""
    return {"metadata": {"name": name, "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": endpoint_list(endpoints)}


def endpoint_list(endpoints) -> list:
    """EndpointSlice ``endpoints`` from ``(address, pod, ready)`` (ready None: condition unset)."""
    items = []
    for address, pod_name, ready in endpoints:
        item = {"addresses": [address], "targetRef": {"kind": "Pod", "name": pod_name}}
        if ready is not None:
            item["conditions"] = {"ready": ready}
        items.append(item)
    return items


def cluster_endpoints(proxy, host: str, port: int = 80) -> list:
    """The endpoint addresses (without port) of ``outbound|PORT||HOST`` in the sidecar's /clusters."""
    cluster = proxy.admin("/clusters").get(f"outbound|{port}||{host}", {})
    return sorted(endpoint["address"].rpartition(":")[0] for endpoint in cluster.get("endpoints", []))


def answering(proxy, host: str, requests: int = 12) -> set:
    """The names of the backends that answered ``requests`` requests through the sidecar."""
    names = set()
    for _ in range(requests):
        result = proxy.curl(host, "/")
        assert result.status == 200, result
        names.add(result.json()["service"])
    return names


def virtual_service(name: str, hosts, destination: str, group: str = "networking.txmesh.io", **route) -> dict:
    """A VirtualService custom object routing ``hosts`` to ``destination``."""
    return {"apiVersion": f"{group}/v1", "kind": "VirtualService", "metadata": {"name": name},
            "spec": {"hosts": list(hosts), "http": [{"route": [{"destination": {"host": destination}}], **route}]}}
