"""Shared helpers of the sidecar integration tests (tests/integration/test_proxy_*.py); no tests here.

- YAML builders: :func:`service_entry`, :func:`destination_rule`, :func:`virtual_service`, :func:`write_config`
- :func:`curl_many`: many requests in ONE curl process (one keep-alive connection, or ``--parallel``),
  so that statistical tests of 1000 requests take a second, not a minute
- :func:`endpoint_stats`: one endpoint's row of the admin ``/clusters`` page
"""

from __future__ import annotations

import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import yaml

NETWORKING = "networking.istio.io/v1"


def endpoint(backend, **labels) -> dict:
    """A ServiceEntry endpoint for a :class:`~tests.harness.Backend` (or an ``(address, port)`` pair)."""
    address, port = (backend.address, backend.port) if hasattr(backend, "port") else backend
    entry = {"address": address, "ports": {"http": port}}
    if labels:
        entry["labels"] = labels
    return entry


def service_entry(name: str, endpoints, *, namespace: str = "default", hosts=None, port: int = 80,
                  addresses=None) -> dict:
    """A STATIC ServiceEntry with one HTTP port named ``http``; ``endpoints`` as built by :func:`endpoint`."""
    spec = {
        "hosts": list(hosts or [name]),
        "location": "MESH_INTERNAL",
        "resolution": "STATIC",
        "ports": [{"number": port, "name": "http", "protocol": "HTTP"}],
        "endpoints": list(endpoints),
    }
    if addresses:
        spec["addresses"] = list(addresses)
    return {"apiVersion": NETWORKING, "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def destination_rule(name: str, host: str, *, namespace: str = "default", traffic_policy=None,
                     subsets=None) -> dict:
    spec = {"host": host}
    if traffic_policy:
        spec["trafficPolicy"] = traffic_policy
    if subsets:
        spec["subsets"] = subsets
    return {"apiVersion": NETWORKING, "kind": "DestinationRule",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def lb(policy: str) -> dict:
    """A trafficPolicy with ``loadBalancer.simple: policy``."""
    return {"loadBalancer": {"simple": policy}}


def virtual_service(name: str, hosts, http, *, namespace: str = "default") -> dict:
    return {"apiVersion": NETWORKING, "kind": "VirtualService",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"hosts": list(hosts), "http": list(http)}}


def route_to(host: str, subset: str | None = None, **extra) -> dict:
    """One ``http`` entry routing everything (or ``match=...``) to ``host`` (and ``subset``)."""
    destination = {"host": host}
    if subset:
        destination["subset"] = subset
    return {"route": [{"destination": destination}], **extra}


def write_config(directory: Path, *documents, name: str = "mesh.yaml") -> Path:
    """Write resources as one multi-document YAML file in ``directory`` (created); return the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return directory


def curl_many(url: str, count: int = 0, *, host: str, headers=None,
              write_out: str = "%{http_code} %header{x-demo-service}", parallel: int = 0, timeout: float = 30.0,
              requests=None) -> list[str]:
    """Send ``count`` GETs of ``url`` with one curl process; return one ``write_out`` line per request.

    ``requests`` instead gives ``[(url, {header: value})]``, one entry per request (``headers`` apply to all).
    Sequential requests share one keep-alive connection (curl reuses it), in order; ``parallel=N`` sends
    up to N at once (``--parallel``; lines then come in completion order).
    """
    requests = list(requests) if requests is not None else [(url, {})] * count
    common = {"Host": host, **(headers or {})}
    blocks = []
    for one_url, own in requests:
        lines = [f'url = "{one_url}"', 'output = "/dev/null"', f'write-out = "{write_out}\\n"',
                 f"max-time = {timeout}"]
        lines += [f'header = "{name}: {value}"' for name, value in {**common, **own}.items()]
        blocks.append("\n".join(lines) + "\n")
    with tempfile.TemporaryDirectory(prefix="txmesh-curl-many-") as tmp:
        config = Path(tmp, "curl.config")
        config.write_text("next\n".join(blocks))
        argv = ["curl", "-sS", "-K", str(config)]
        if parallel:
            argv += ["--parallel", "--parallel-immediate", "--parallel-max", str(parallel)]
        proc = subprocess.run(argv, capture_output=True, timeout=timeout + 10, stdin=subprocess.DEVNULL)
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == len(requests), \
        f"curl gave {len(lines)} results for {len(requests)} requests: {proc.stderr.decode()[-2000:]}"
    return lines


def served_by(lines) -> Counter:
    """Counter of the x-demo-service names in ``curl_many`` lines of ``"STATUS NAME"``; asserts all were 200."""
    statuses = Counter(line.split(" ", 1)[0] for line in lines)
    assert set(statuses) == {"200"}, f"not all 200: {statuses}"
    return Counter(line.split(" ", 1)[1] for line in lines)


def cluster_endpoints(proxy, cluster: str) -> dict:
    """``{"ip:port": endpoint row}`` of one cluster from the admin ``/clusters`` page."""
    clusters = proxy.admin("/clusters")
    assert cluster in clusters, f"no cluster {cluster!r} in /clusters: {sorted(clusters)}"
    return {row["address"]: row for row in clusters[cluster]["endpoints"]}


def endpoint_stats(proxy, cluster: str, backend) -> dict:
    """The ``/clusters`` row of ``backend``'s endpoint in ``cluster``."""
    address = f"{backend.address}:{backend.port}" if hasattr(backend, "port") else "%s:%d" % tuple(backend)
    return cluster_endpoints(proxy, cluster)[address]


def cluster_name(host: str, port: int = 80, subset: str = "", namespace: str = "default") -> str:
    """Istio's ``outbound|PORT|SUBSET|FQDN`` for a short service name of ``namespace``."""
    return f"outbound|{port}|{subset}|{host}.{namespace}.svc.cluster.local"


