"""What applies to a workload or a service, and why: the text of ``meshctl describe``.

Nothing here re-implements matching.  The workloads the control plane registered are added as the
WorkloadEntries the registry itself makes (:meth:`mesh.control.registry.Registration.document`),
each with a marker label, and the resources are compiled by the proxy's compiler
(:func:`mesh.config.compile.compile_proxy_config`): which ServiceEntries make a workload an
endpoint, which DestinationRule subsets it belongs to and which routes lead there are read off the
compiled clusters and routes.  Security comes from the same code: the PeerAuthentication chosen
(``compile_peer_authn``), the AuthorizationPolicies that apply and why
(:func:`mesh.config.selection.selected_by`), and the ones of its namespace that do not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.config import hosts as hostnames
from mesh.config.compile import Workload, compile_proxy_config
from mesh.config.loader import load_documents
from mesh.config.resources import DestinationRule, ServiceEntry
from mesh.config.security import AuthorizationPolicy, PeerAuthentication
from mesh.config.selection import format_labels, selected_by, selects
from mesh.config.validate import validate
from mesh.control.registry import Registration

#: The label that tells a described workload's endpoints apart in the compiled clusters.
MARKER = "meshctl.txmesh.io/describe"
#: The address of a pod described from its labels alone (RFC 5737 TEST-NET-1: never a real endpoint).
NO_ADDRESS = "192.0.2.1"


class DescribeError(Exception):
    """The workload or service is not known; the message says what to do."""


@dataclass
class Pod:
    """A workload as the control plane knows it (a ``/proxies`` row) or as given on the command line."""

    name: str
    namespace: str
    labels: dict = field(default_factory=dict)
    service_account: str = "default"
    address: str | None = None
    inbound_port: int | None = None  # None: no inbound listener, so an endpoint of nothing
    node: str | None = None
    identity: str | None = None

    @classmethod
    def from_row(cls, row: dict) -> Pod:
        identity = row.get("identity") or ""
        account = row.get("service_account") or identity.rpartition("/sa/")[2] or "default"
        return cls(name=row["workload"], namespace=row["namespace"], labels=dict(row.get("labels") or {}),
                   service_account=account, address=row.get("address"),
                   inbound_port=row.get("inbound_port") if row.get("app_port") else None, node=row.get("node"),
                   identity=identity or None)

    @property
    def workload(self) -> Workload:
        """The compiler's point of view of this pod."""
        return Workload(name=self.name, namespace=self.namespace, labels=dict(self.labels),
                        service_account=self.service_account)


def with_pods(objects, pods) -> tuple:
    """``(objects + a marked WorkloadEntry per pod with an inbound listener, {marker: pod})``."""
    ports = sorted({port.name for obj in objects if isinstance(obj, ServiceEntry) for port in obj.ports})
    documents, marked = [], {}
    for index, pod in enumerate(pods):
        if pod.inbound_port is None:
            continue
        marker = str(index)
        marked[marker] = pod
        documents.append(Registration(node=pod.node or pod.name, workload=pod.name, namespace=pod.namespace,
                                      service_account=pod.service_account, address=pod.address or NO_ADDRESS,
                                      inbound_port=pod.inbound_port,
                                      labels={**pod.labels, MARKER: marker}).document(ports))
    entries, _ = validate(load_documents(documents, "control plane registry").resources)
    return list(objects) + entries, marked


# -- meshctl describe pod ----------------------------------------------------------------------

def describe_pod(objects, pod: Pod, root_namespace: str) -> list:
    """The lines of ``meshctl describe pod``: services, subsets, routes, mTLS, policies, warnings."""
    everything, marked = with_pods(objects, [pod])
    mine = next(iter(marked), None)
    workload = pod.workload
    config = compile_proxy_config(everything, workload, root_namespace=root_namespace)
    clusters = config.dump["clusters"]
    member = {c["name"] for c in clusters if any(_is_pod(e, pod, mine) for e in c["endpoints"])}
    lines = [f"Pod {pod.name} (namespace {pod.namespace}{', node ' + pod.node if pod.node else ''})",
             f"  labels:   {format_labels(pod.labels)}",
             f"  identity: {pod.identity or f'spiffe://<trust domain>/ns/{pod.namespace}/sa/{pod.service_account}'}"]
    if pod.inbound_port is not None and pod.address:
        lines.append(f"  endpoint: {pod.address}:{pod.inbound_port} (its sidecar's inbound port)")
    lines += ["", *_services_of(everything, clusters, member, pod)]
    lines += ["", *_routes_to(config.dump["routes"], clusters, member, pod.namespace, "Routes to its services")]
    lines += ["", *_security(everything, config.dump, workload, root_namespace)]
    if config.warnings:
        lines += ["", "Config warnings (from this workload's point of view):"]
        lines += [f"  {warning}" for warning in config.warnings]
    return lines


def _is_pod(endpoint, pod, marker) -> bool:
    if marker is not None and endpoint["labels"].get(MARKER) == marker:
        return True
    return bool(pod.address) and endpoint["address"] == pod.address and endpoint["port"] == pod.inbound_port


def _services_of(objects, clusters, member, pod) -> list:
    services = sorted({c["service"] for c in clusters if c["name"] in member})
    if not services:
        why = ("it has no inbound listener (mesh-proxy without --app-port)" if pod.inbound_port is None else
               "no ServiceEntry of its namespace selects its labels (workloadSelector) or lists its address")
        return [f"Services: none: {why}"]
    lines = ["Services (this workload is an endpoint of):"]
    for service in services:
        entries = [e for e in objects if isinstance(e, ServiceEntry) and service in e.hosts]
        lines.append(f"  {service}: " + "; ".join(_entry_reason(e, pod) for e in entries))
        for cluster in clusters:
            if cluster["service"] == service and cluster["subset"]:
                labels = _subset_labels(objects, service, cluster["subset"])
                state = "member" if cluster["name"] in member else "not a member"
                lines.append(f"    port {cluster['port']} subset {cluster['subset']}: {state} "
                             f"(subset labels {labels})")
    return lines


def _entry_reason(entry, pod) -> str:
    where = f"ServiceEntry {entry.namespace}/{entry.name} ({_source(entry)})"
    if entry.workload_selector is not None and selects(entry.workload_selector, pod.labels):
        return f"{where}: workloadSelector {format_labels(entry.workload_selector)} matches its labels"
    return f"{where}: lists its address {pod.address}:{pod.inbound_port} as an endpoint"


def _subset_labels(objects, service, subset) -> str:
    for rule in objects:
        if isinstance(rule, DestinationRule) and hostnames.covers(rule.host, service):
            for candidate in rule.subsets:
                if candidate.name == subset:
                    return f"{format_labels(candidate.labels)}, DestinationRule {rule.namespace}/{rule.name}"
    return "unknown"


def _routes_to(routes, clusters, member, namespace, title, label=True) -> list:
    """Every compiled route that sends traffic to the services of the ``member`` clusters.

    With ``label``, each destination says whether it is one of the ``member`` clusters.
    """
    by_name = {c["name"]: c for c in clusters}
    wanted = {c["service"] for c in clusters if c["name"] in member}
    lines = []
    for vhost in routes:
        for route in vhost["routes"]:
            targets = [(target, by_name.get(target["name"])) for target in route["action"]["clusters"]]
            if not any(cluster and cluster["service"] in wanted for _, cluster in targets):
                continue
            parts = []
            for target, cluster in targets:
                mark = "" if not label else " (this workload)" if target["name"] in member else " (not this workload)"
                parts.append(f"{target['weight']}% to {_cluster_text(cluster, target['name'])}{mark}")
            lines.append(f"  {route['action']['name']} (match {route['match']}): {'; '.join(parts)}")
    header = f"{title} (as callers in namespace {namespace} see them):"
    return [header, *lines] if lines else [f"{header} none"]


def _cluster_text(cluster, name) -> str:
    if cluster is None:
        return f"{name} (no such cluster: 503 NC)"
    return f"subset {cluster['subset']}" if cluster["subset"] else f"{cluster['service']}:{cluster['port']}"


def _security(objects, dump, workload, root_namespace) -> list:
    peer = dump.get("peer_authentication") or {}
    levels = ", ".join(f"{level} level {name}" for level, name in (peer.get("policies") or {}).items())
    lines = [f"Inbound mTLS (PeerAuthentication): {peer.get('mode', 'PERMISSIVE')}"
             f"{' from ' + levels if levels else ' (no PeerAuthentication applies: the default)'}"]
    for port, mode in sorted((peer.get("port_modes") or {}).items()):
        lines.append(f"  port {port}: {mode}")
    rows = [row for row in selected_by(objects, workload, root_namespace) if row["kind"] == "AuthorizationPolicy"]
    authz = dump.get("authz") or {}
    rules = {entry["name"]: entry for action in ("allow", "deny") for entry in authz.get(action, [])}
    lines.append("AuthorizationPolicies:" if rows else "AuthorizationPolicies: none applies: every request is allowed")
    for row in rows:
        name = f"{row['namespace']}/{row['name']}"
        policy = _find(objects, AuthorizationPolicy, row["namespace"], row["name"])
        scope = {"workload": f"selector {row['selector']} matches", "namespace": "namespace-wide (no selector)",
                 "mesh": f"mesh-wide (root namespace {root_namespace})"}[row["scope"]]
        lines.append(f"  {policy.action:5} {name}: {scope}; rules: {_rules(rules.get(name))}")
    for obj in objects:
        if isinstance(obj, (AuthorizationPolicy, PeerAuthentication)) and obj.namespace == workload.namespace \
                and obj.selector is not None and not selects(obj.selector, workload.labels):
            lines.append(f"  not applied: {type(obj).__name__} {obj.namespace}/{obj.name}: its selector "
                         f"{format_labels(obj.selector)} does not match the labels")
    return lines


def _find(objects, cls, namespace, name):
    return next(obj for obj in objects if isinstance(obj, cls) and obj.namespace == namespace and obj.name == name)


def _rules(entry) -> str:
    if entry is None or not entry.get("rules"):
        return "none (matches nothing)"
    return " | ".join(rule_text(rule) for rule in entry["rules"])


def rule_text(rule) -> str:
    """One AuthorizationPolicy rule of ``/config_dump`` as text: ``from ... to ... when ...``."""
    parts = [f"{key} " + " OR ".join(" AND ".join(clause) for clause in rule.get(key, []))
             for key in ("from", "to") if rule.get(key)]
    parts += [f"when {condition}" for condition in rule.get("when", [])]
    return ", ".join(parts) or "any request"


def _source(obj) -> str:
    source = obj.source
    return f"{source.file}:{source.line}" if source.line else source.file


# -- meshctl describe service --------------------------------------------------------------------

def describe_service(objects, host: str, namespace: str, root_namespace: str, pods=()) -> list:
    """The lines of ``meshctl describe service``: definition, endpoints, subsets, routes, policies."""
    everything, marked = with_pods(objects, pods)
    viewer = Workload(name="meshctl-describe", namespace=namespace)
    config = compile_proxy_config(everything, viewer, root_namespace=root_namespace)
    clusters = config.dump["clusters"]
    known = sorted({c["service"] for c in clusters})
    service = next((name for name in (host, hostnames.fqdn(host, namespace)) if name in known), None)
    if service is None:
        raise DescribeError(f"no service {host!r} is visible to namespace {namespace} (known: "
                            f"{', '.join(known) or 'none'}); give -n NAMESPACE or the full host name")
    entries = [e for e in everything if isinstance(e, ServiceEntry) and service in e.hosts]
    lines = [f"Service {service}"]
    lines += [f"  defined by ServiceEntry {e.namespace}/{e.name} ({_source(e)}), ports "
              f"{', '.join(f'{p.number}/{p.name}' for p in e.ports)}"
              f"{', workloadSelector ' + format_labels(e.workload_selector) if e.workload_selector else ''}"
              for e in entries]
    mine = [c for c in clusters if c["service"] == service]
    lines += ["", "Endpoints:"]
    for cluster in mine:
        if cluster["subset"]:
            continue
        lines += [f"  port {cluster['port']}: {_endpoint_text(e, marked)}" for e in cluster["endpoints"]] or \
                 [f"  port {cluster['port']}: none (no endpoint, no selected WorkloadEntry or registered sidecar)"]
    subsets = [c for c in mine if c["subset"]]
    if subsets:
        lines += ["", "Subsets:"]
        lines += [f"  {c['subset']} (port {c['port']}, {_subset_labels(everything, service, c['subset'])}): "
                  f"{', '.join(_endpoint_text(e, marked) for e in c['endpoints']) or 'no endpoint matches'}"
                  for c in subsets]
    lines += ["", *_routes_to(config.dump["routes"], clusters, {c["name"] for c in mine}, namespace,
                              "Routes to it", label=False)]
    lines += ["", f"Policies of its endpoints (namespace {entries[0].namespace if entries else namespace}):"]
    lines += _endpoint_policies(everything, mine, entries, marked, root_namespace)
    return lines


def _endpoint_text(endpoint, marked) -> str:
    pod = marked.get(endpoint["labels"].get(MARKER))
    who = f"sidecar {pod.name}" if pod else format_labels(endpoint["labels"])
    tls = "mTLS" if endpoint.get("identity") else "plaintext"
    return f"{endpoint['address']}:{endpoint['port']} ({who}, {tls})"


def _endpoint_policies(objects, clusters, entries, marked, root_namespace) -> list:
    namespace = entries[0].namespace if entries else None
    seen, lines = set(), []
    for cluster in clusters:
        for endpoint in cluster["endpoints"]:
            labels = {k: v for k, v in endpoint["labels"].items() if k != MARKER}
            key = tuple(sorted(labels.items()))
            if key in seen or namespace is None:
                continue
            seen.add(key)
            pod = marked.get(endpoint["labels"].get(MARKER))
            workload = Workload(name=pod.name if pod else "endpoint", namespace=namespace, labels=labels)
            dump = compile_proxy_config(objects, workload, root_namespace=root_namespace).dump
            peer = (dump.get("peer_authentication") or {}).get("mode", "PERMISSIVE")
            authz = dump.get("authz") or {}
            names = [f"{action.upper()} {entry['name']}" for action in ("deny", "allow")
                     for entry in authz.get(action, [])]
            lines.append(f"  {format_labels(labels)}: mTLS {peer}; AuthorizationPolicies: "
                         f"{', '.join(names) or 'none (every request allowed)'}")
    return lines or ["  no endpoints"]
