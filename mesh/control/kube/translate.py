"""Kubernetes Services, EndpointSlices and Pods as ServiceEntry documents (pure functions).

Every Service (of type ClusterIP, NodePort or LoadBalancer) becomes one
ServiceEntry, as Istio's Kubernetes registry sees it:

- ``hosts``: ``<svc>.<ns>.svc.<domain>`` (the short forms ``svc.ns.svc``,
  ``svc.ns`` and, in the same namespace, ``svc`` are the aliases the
  compiler gives every such host);
- ``addresses``: the ClusterIP(s); none for a headless Service, whose entry
  has the internal annotation ``mesh.txmesh.io/headless: "true"`` (its TCP
  ports get a listener per endpoint address, as Istio's Passthrough);
- ``ports``: the Service ports with Istio's protocol selection --
  ``appProtocol`` if set, else the port name's prefix before ``-``
  (``http``, ``http2``, ``grpc``, ``grpc-web``, ``tcp``, ``tls``, ...).
  HTTP, HTTP2 and gRPC ports are HTTP; tcp, tls and https ports are TCP,
  TLS and HTTPS (proxied as TCP, TLS ones routed by SNI); mongo, redis and
  mysql ports are TCP, as Istio proxies them without its protocol filters.
  UDP and SCTP ports (and ``udp-`` names) are left out, and a Service with
  no port left gets no ServiceEntry.  A port whose protocol cannot be told
  (no appProtocol, no known prefix) is one Istio would sniff: txmesh takes
  it as HTTP, except on Istio's well-known ports 25, 53, 3306 and 27017
  (SMTP, DNS, MySQL, MongoDB), which are TCP as in Istio.  An unnamed port
  is named ``port-<number>``; an integer
  ``targetPort`` is kept;
- ``location: MESH_INTERNAL``, ``resolution: STATIC``; the annotation
  ``networking.istio.io/exportTo`` becomes ``exportTo``;
- ``endpoints``: the first address of every *ready* endpoint of the
  Service's EndpointSlices (label ``kubernetes.io/service-name``):
  ``conditions.ready`` true or unset.  Terminating endpoints have ``ready``
  false and are left out, as Istio does outside persistent sessions; with
  ``spec.publishNotReadyAddresses`` every endpoint counts.  Each endpoint
  carries its Pod's labels (so ``security.istio.io/tlsMode: istio``, set by
  injection, turns on mTLS to it), the Pod's service account and the port
  name -> endpoint port map of its slice.  An endpoint whose Pod is not
  known yet is left out until the Pod is (its labels decide mTLS).

An ExternalName Service becomes a ``MESH_EXTERNAL`` ServiceEntry with
``resolution: DNS`` for the same host, on its TCP ports (without
``targetPort``), whose one endpoint is the ``externalName`` (resolved by
the sidecars), as Istio's registry made it before its ``Alias`` resolution;
without a TCP port it gets none (:func:`portless_external_names`).
"""

from __future__ import annotations

from mesh.config import hosts as hostnames
from mesh.config.resources import HEADLESS_ANNOTATION

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
REGISTRY_LABEL = "mesh.txmesh.io/registry"
EXPORT_TO_ANNOTATION = "networking.istio.io/exportTo"
NETWORKING = "networking.istio.io/v1"

#: Istio protocol names (appProtocol or port-name prefix) -> the ServiceEntry protocol txmesh proxies.
_PROTOCOLS = {"http": "HTTP", "http_proxy": "HTTP", "http2": "HTTP2", "grpc": "GRPC", "grpc-web": "HTTP",
              "kubernetes.io/h2c": "HTTP2", "kubernetes.io/ws": "HTTP", "kubernetes.io/wss": "HTTPS",
              "tcp": "TCP", "tls": "TLS", "https": "HTTPS", "mongo": "TCP", "redis": "TCP", "mysql": "TCP"}

#: Service port numbers Istio never sniffs (``wellKnownPorts`` of its pkg/config/kube/conversion.go:
#: SMTP, DNS, MySQL, MongoDB, all server-first or binary): TCP when neither appProtocol nor name tells.
WELL_KNOWN_TCP_PORTS = frozenset({25, 53, 3306, 27017})


def port_protocol(port: dict):
    """The ServiceEntry protocol of a Service port, or None when txmesh does not proxy it (UDP).

    As Istio's ``ConvertProtocol``: ``appProtocol`` if set, else the port
    name; ``grpc-web...`` is gRPC-Web, otherwise the part before the first
    ``-`` names the protocol (``http-web`` -> HTTP, ``tcp-db`` -> TCP).
    What Istio does not recognise it sniffs: HTTP here, except on the
    :data:`WELL_KNOWN_TCP_PORTS` (``port`` 25, 53, 3306, 27017), TCP as in Istio.
    """
    if (port.get("protocol") or "TCP").upper() != "TCP":
        return None
    name = (port.get("appProtocol") or port.get("name") or "").lower()
    if name.startswith("grpc-web"):
        name = "grpc-web"
    elif not name.startswith("kubernetes.io/"):
        name = name.partition("-")[0]
    if name == "udp":
        return None
    if name not in _PROTOCOLS and port.get("port") in WELL_KNOWN_TCP_PORTS:
        return "TCP"
    return _PROTOCOLS.get(name, "HTTP")


def port_name(port: dict) -> str:
    """The ServiceEntry port name of a Service (or EndpointSlice) port: its name, or ``port-<number>``."""
    return port.get("name") or f"port-{port.get('port')}"


def entry_name(service_name: str) -> str:
    """The name of the ServiceEntry generated for a Service."""
    return f"kubernetes-{service_name}"


def _ready(endpoint: dict, publish_not_ready: bool) -> bool:
    return publish_not_ready or (endpoint.get("conditions") or {}).get("ready") is not False


def _endpoints(service: dict, slices: list, pods: dict, ports: list) -> list:
    """The ServiceEntry endpoints of a Service from its EndpointSlices (see the module docstring)."""
    publish_not_ready = bool((service.get("spec") or {}).get("publishNotReadyAddresses"))
    wanted = {port_name(port) for port in ports}
    found = {}
    for eps in slices:
        if eps.get("addressType") not in ("IPv4", "IPv6"):
            continue
        port_map = {}
        for port in eps.get("ports") or []:
            name = port.get("name") or ""
            if not name and len(ports) == 1:
                name = port_name(ports[0])
            if name in wanted and port.get("port"):
                port_map[name] = port["port"]
        for endpoint in eps.get("endpoints") or []:
            addresses = endpoint.get("addresses") or []
            if not addresses or not _ready(endpoint, publish_not_ready):
                continue
            document = {"address": addresses[0]}
            target = endpoint.get("targetRef") or {}
            if target.get("kind") == "Pod":
                pod = pods.get((target.get("namespace") or service["metadata"]["namespace"], target.get("name")))
                if pod is None:
                    continue
                labels = (pod.get("metadata") or {}).get("labels") or {}
                if labels:
                    document["labels"] = dict(labels)
                document["serviceAccount"] = (pod.get("spec") or {}).get("serviceAccountName") or "default"
            if port_map:
                document["ports"] = dict(port_map)
            found.setdefault(addresses[0], document)
    return [found[address] for address in sorted(found)]


def _external_name_ports(spec: dict) -> list:
    """The ServiceEntry ports of an ExternalName Service: its TCP ports, without ``targetPort``
    (Kubernetes ignores it there: clients reach the external name on the Service port)."""
    found = [(port, port_protocol(port)) for port in spec.get("ports") or [] if port.get("port")]
    return [{"number": port["port"], "name": port_name(port), "protocol": protocol}
            for port, protocol in found if protocol is not None]


def _external_name_entry(name: str, namespace: str, metadata: dict, spec: dict, domain: str):
    """The ServiceEntry of an ExternalName Service, or None without ``externalName`` or a TCP port.

    As Istio's Kubernetes registry (before its ``Alias`` resolution): a ``MESH_EXTERNAL`` entry with
    resolution DNS whose one endpoint is ``externalName``, which the sidecars resolve, on the
    Service ports.  Kubernetes gives such a Service no ClusterIP, so it has no ``addresses``.
    """
    external, ports = spec.get("externalName"), _external_name_ports(spec)
    if not external or not ports:
        return None
    entry = {"hosts": [f"{name}.{namespace}.svc.{domain}"], "ports": ports, "location": "MESH_EXTERNAL",
             "resolution": "DNS", "endpoints": [{"address": external}]}
    export_to = (metadata.get("annotations") or {}).get(EXPORT_TO_ANNOTATION)
    if export_to:
        entry["exportTo"] = [part.strip() for part in export_to.split(",") if part.strip()]
    return {"apiVersion": NETWORKING, "kind": "ServiceEntry",
            "metadata": {"name": entry_name(name), "namespace": namespace, "labels": {REGISTRY_LABEL: "kubernetes"}},
            "spec": entry}


def portless_external_names(services) -> list:
    """``[(origin, externalName)]`` of the ExternalName Services that get no ServiceEntry for want of a TCP
    port (Istio has no listener or cluster for them either: their traffic is to an unknown destination)."""
    out = []
    for service in services:
        metadata, spec = service.get("metadata") or {}, service.get("spec") or {}
        if spec.get("type") == "ExternalName" and spec.get("externalName") and not _external_name_ports(spec):
            out.append((f"kubernetes:services/{metadata.get('namespace')}/{metadata.get('name')}",
                        spec["externalName"]))
    return out


def service_entry(service: dict, slices: list, pods: dict, domain: str = hostnames.DEFAULT_DOMAIN):
    """The ServiceEntry document of one Service, or None when it has none (no TCP port).

    ``slices`` are the EndpointSlices of that Service; ``pods`` maps
    ``(namespace, name)`` to Pod objects.
    """
    metadata, spec = service.get("metadata") or {}, service.get("spec") or {}
    name, namespace = metadata.get("name"), metadata.get("namespace") or "default"
    if not name:
        return None
    if spec.get("type") == "ExternalName":
        return _external_name_entry(name, namespace, metadata, spec, domain)
    kept = [(port, port_protocol(port)) for port in spec.get("ports") or [] if port.get("port")]
    kept = [(port, protocol) for port, protocol in kept if protocol is not None]
    ports = []
    for port, protocol in kept:
        document = {"number": port["port"], "name": port_name(port), "protocol": protocol}
        if isinstance(port.get("targetPort"), int):
            document["targetPort"] = port["targetPort"]
        ports.append(document)
    if not ports:
        return None
    entry = {"hosts": [f"{name}.{namespace}.svc.{domain}"], "ports": ports, "location": "MESH_INTERNAL",
             "resolution": "STATIC"}
    cluster_ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
    addresses = [address for address in cluster_ips if address and address != "None"]
    if addresses:
        entry["addresses"] = addresses
    export_to = (metadata.get("annotations") or {}).get(EXPORT_TO_ANNOTATION)
    if export_to:
        entry["exportTo"] = [part.strip() for part in export_to.split(",") if part.strip()]
    entry["endpoints"] = _endpoints(service, slices, pods, [port for port, _ in kept])
    document = {"apiVersion": NETWORKING, "kind": "ServiceEntry",
                "metadata": {"name": entry_name(name), "namespace": namespace,
                             "labels": {REGISTRY_LABEL: "kubernetes"}},
                "spec": entry}
    if not addresses and "None" in cluster_ips:
        document["metadata"]["annotations"] = {HEADLESS_ANNOTATION: "true"}  # per-pod TCP listeners
    return document


def service_entries(services, endpoint_slices, pods, domain: str = hostnames.DEFAULT_DOMAIN) -> list:
    """``[(origin, document)]``: the ServiceEntry of every Service that has one.

    ``origin`` names the Service (``kubernetes:services/NS/NAME``) for errors.
    """
    slices_of = {}
    for eps in endpoint_slices:
        metadata = eps.get("metadata") or {}
        service_name = (metadata.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if service_name:
            slices_of.setdefault((metadata.get("namespace"), service_name), []).append(eps)
    pods_by_key = {((pod.get("metadata") or {}).get("namespace"), (pod.get("metadata") or {}).get("name")): pod
                   for pod in pods}
    out = []
    for service in services:
        metadata = service.get("metadata") or {}
        key = (metadata.get("namespace"), metadata.get("name"))
        document = service_entry(service, slices_of.get(key, []), pods_by_key, domain)
        if document is not None:
            out.append((f"kubernetes:services/{key[0]}/{key[1]}", document))
    return out
