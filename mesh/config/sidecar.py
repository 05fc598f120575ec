"""Istio's ``Sidecar`` resource: which services and routes a workload's sidecar can reach.

A Sidecar narrows a workload's outbound view to the hosts its ``egress``
listener imports, so a proxy in a large mesh holds (and is sent) only what it
calls.  :func:`sidecar_resource` validates one (the validator
:mod:`mesh.config.validate` dispatches to); :func:`sidecar_scope` picks the
Sidecar that applies to a workload, as Istio does:

1. a Sidecar of the workload's namespace whose ``workloadSelector`` selects it;
2. else the Sidecar of its namespace without a selector (the namespace default);
3. else the Sidecar without a selector in the root namespace (the mesh default);
4. else none: the workload sees everything exported to its namespace.

Istio leaves two Sidecars at one of those levels undefined; txmesh takes the
first by name and warns.  A gateway gets no Sidecar (Istio gives gateways a
default scope that imports everything).  The result is an
:class:`EgressScope`, or None when no Sidecar applies.

The scope is built for the workload's namespace, as Istio's
``ConvertToSidecarScope`` is for the proxy's config namespace: ``.`` in
``egress.hosts`` stands for that namespace, so a root-namespace default with
``./*`` imports each workload's own namespace.  Besides the services its
hosts import, a scope imports the services the VirtualServices it imports
route (or mirror) to (:meth:`EgressScope.inferred`).

What txmesh implements of the resource: ``workloadSelector``, one
``egress`` listener without ``port`` (absent: one that imports ``*/*``),
whose ``hosts`` are ``namespace/dnsName`` patterns, and
``outboundTrafficPolicy.mode`` (Istio's enum: ``REGISTRY_ONLY`` when the
field is given without ``mode``), which overrides the sidecar's
``--outbound-traffic-policy`` (as it overrides Istio's meshConfig).  Listener
ports, ``bind``, ``captureMode``, ``ingress`` listeners,
``inboundConnectionPool`` and ``egressProxy`` are errors that say what to do
instead; so is a Sidecar with neither ``egress`` nor
``outboundTrafficPolicy`` (Istio: "empty configuration").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mesh.config import hosts as hostnames
from mesh.config.fields import Fields
from mesh.config.gateway import bound
from mesh.config.resources import MESH, DestinationRule, ServiceEntry, VirtualService
from mesh.config.selection import format_labels, selects

_SPEC = {"workloadSelector", "egress", "outboundTrafficPolicy"}
_SPEC_UNSUPPORTED = {
    "ingress": "ingress listeners are not supported; the sidecar's inbound listener forwards to the app port "
               "given with mesh-proxy --app-port; remove ingress",
    "inboundConnectionPool": "set connection limits on the sidecar with mesh-proxy --max-connections; remove it",
}
_POLICY_UNSUPPORTED = {"egressProxy": "sending unknown destinations to an egress gateway is not supported; "
                                      "remove egressProxy (mode REGISTRY_ONLY blocks them)"}
_POLICY_MODES = ("ALLOW_ANY", "REGISTRY_ONLY")
_EGRESS = {"hosts"}
_EGRESS_UNSUPPORTED = {
    "port": "egress listeners on one port are not supported; one egress entry without port applies to "
            "every port; remove port",
    "bind": "the outbound listener's address is mesh-proxy --outbound-address; remove bind",
    "captureMode": "traffic capture is set up by meshctl iptables / the injector; remove captureMode",
}
#: ``namespace/`` parts with a meaning of their own (any namespace, the workload's, none).
_ANY, _OWN, _NONE = "*", ".", "~"
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")


@dataclass(frozen=True)
class EgressHost:
    """One ``egress.hosts`` entry: a namespace (a name, ``*``, ``~`` for none, or ``.``) and a host pattern.

    ``pattern`` is ``*``, a ``*.suffix`` wildcard or a fully qualified name,
    except under ``.``: that namespace is the workload's, known only when the
    scope is built (:meth:`resolve`), so a short name stays short until then
    (``domain`` completes it).
    """

    namespace: str
    pattern: str
    domain: str = hostnames.DEFAULT_DOMAIN

    def resolve(self, workload_namespace: str) -> EgressHost:
        """This entry for a workload of ``workload_namespace``: ``.`` replaced by that namespace."""
        if self.namespace != _OWN:
            return self
        return EgressHost(workload_namespace, hostnames.fqdn(self.pattern, workload_namespace, self.domain),
                          self.domain)

    def imports(self, namespace: str, host: str) -> bool:
        """Whether a service or VirtualService of ``namespace`` for ``host`` is imported (``.`` resolved)."""
        if self.namespace == _NONE or (self.namespace != _ANY and self.namespace != namespace):
            return False
        return hostnames.covers(self.pattern, host) or hostnames.covers(host, self.pattern)


@dataclass(frozen=True)
class Sidecar:
    """A validated ``Sidecar``: its selector (sorted label pairs, None for the namespace), egress hosts,
    and ``outboundTrafficPolicy.mode`` (None when absent)."""

    name: str
    namespace: str
    selector: tuple | None
    egress_hosts: tuple
    outbound_traffic_policy: str | None = None
    source: object = field(repr=False, compare=False, default=None)


@dataclass(frozen=True)
class EgressScope:
    """What one workload imports: the :class:`Sidecar` that applies to it, for a workload of ``namespace``
    (what ``.`` stands for), as a test on hosts."""

    sidecar: Sidecar
    namespace: str
    hosts: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "hosts", tuple(entry.resolve(self.namespace) for entry in self.sidecar.egress_hosts))

    def imports(self, namespace: str, host: str) -> bool:
        """Whether a resource of ``namespace`` naming ``host`` (a fully qualified name) is visible."""
        return any(entry.imports(namespace, host) for entry in self.hosts)

    def imports_any(self, namespace: str, hosts) -> bool:
        """Whether any of ``hosts`` (of a resource of ``namespace``) is imported."""
        return any(self.imports(namespace, host) for host in hosts)

    def inferred(self, virtual_services, service_ports) -> list:
        """The hosts this scope imports because its VirtualServices route to them (Istio's "infer more
        possible destinations from virtual services" in ``ConvertToSidecarScope``).

        ``virtual_services`` are those visible to the workload's namespace; the ones imported and
        bound to the sidecars count.  Their destinations: ``http`` routes and mirrors (of the routes
        with a match that can hold for this namespace's ``sourceNamespace``, or no match), ``tcp`` and
        ``tls`` routes.  ``service_ports(host)`` gives the port numbers of the service of exactly
        ``host`` the workload sees (the one of its own namespace, else of the first namespace by name
        that exports it there, as Istio picks), or None when there is none.  As Istio, a host whose
        destinations all name a port the service lacks is not imported.
        """
        wanted = {}
        for vs in virtual_services:
            if bound(vs.gateways, MESH) and self.imports_any(vs.namespace, vs.hosts):
                for destination in _destinations(vs, self.namespace):
                    wanted.setdefault(destination.host, set()).add(destination.port)
        out = []
        for host, ports in wanted.items():
            numbers = service_ports(host)
            if numbers is not None and (None in ports or ports & set(numbers)):
                out.append(host)
        return out

    def needed(self, objects, workload_namespace: str) -> list:
        """The objects a proxy of ``workload_namespace`` needs under this scope (what the control plane sends).

        ServiceEntries whose hosts are imported, every ServiceEntry of the
        workload's own namespace (its inbound side reads their ports), and the
        ServiceEntry of each host :meth:`inferred` from the VirtualServices; the
        VirtualServices imported; the DestinationRules for the hosts of the
        ServiceEntries kept.  Other kinds pass.
        """
        entries = {id(obj) for obj in objects if isinstance(obj, ServiceEntry)
                   and (obj.namespace == workload_namespace or self.imports_any(obj.namespace, obj.hosts))}
        by_host = {}  # host -> the ServiceEntry the workload sees for it (as the compiler picks it)
        for obj in sorted((obj for obj in objects if isinstance(obj, ServiceEntry)),
                          key=lambda obj: (obj.namespace != workload_namespace, obj.namespace, obj.name)):
            for host in obj.hosts:
                by_host.setdefault(host, obj)
        virtual_services = [obj for obj in objects if isinstance(obj, VirtualService)]
        for host in self.inferred(virtual_services, lambda host: [port.number for port in by_host[host].ports]
                                  if host in by_host else None):
            entries.add(id(by_host[host]))
        hosts = [host for obj in objects if id(obj) in entries for host in obj.hosts]

        def keep(obj) -> bool:
            if isinstance(obj, ServiceEntry):
                return id(obj) in entries
            if isinstance(obj, VirtualService):
                return self.imports_any(obj.namespace, obj.hosts)
            if isinstance(obj, DestinationRule):
                return any(hostnames.covers(obj.host, host) or hostnames.covers(host, obj.host) for host in hosts)
            return True

        return [obj for obj in objects if keep(obj)]


def sidecar_resource(resource, report, domain) -> Sidecar:
    """Validate a Sidecar (``domain`` completes short host names in ``egress.hosts``)."""
    f = Fields(report, ("spec",), resource.spec, _SPEC, _SPEC_UNSUPPORTED)
    selector = None
    if "workloadSelector" in f:
        selector = f.sub("workloadSelector", {"labels"}).labels("labels") or None
    spec = resource.spec if isinstance(resource.spec, dict) else {}
    if not any(spec.get(key) for key in ("egress", "ingress", "inboundConnectionPool")) \
            and spec.get("outboundTrafficPolicy") is None:
        f.error(None, "empty Sidecar (Istio rejects it: 'empty configuration provided'); set egress hosts, "
                      "or outboundTrafficPolicy")
    listeners = f.items("egress")
    if len(listeners) > 1:
        f.error("egress", "txmesh supports one egress listener (without port); merge the hosts into one entry")
    hosts = [] if listeners else [EgressHost(_ANY, "*")]  # Istio: no egress listener -> one for */*
    for path, item in listeners[:1]:
        egress = Fields(report, path, item, _EGRESS, _EGRESS_UNSUPPORTED)
        for host_path, text in egress.strings("hosts", required=True):
            entry = _egress_host(text, resource.namespace, domain)
            if isinstance(entry, str):
                report.add(host_path, entry)
            else:
                hosts.append(entry)
    policy = None
    if spec.get("outboundTrafficPolicy") is not None:  # null is absent, as in Istio
        # mode's zero value in Istio's API (OutboundTrafficPolicy.Mode) is REGISTRY_ONLY
        policy = f.sub("outboundTrafficPolicy", {"mode"}, _POLICY_UNSUPPORTED).enum("mode", _POLICY_MODES,
                                                                                    default="REGISTRY_ONLY")
    return Sidecar(name=resource.name, namespace=resource.namespace, selector=selector,
                   egress_hosts=tuple(dict.fromkeys(hosts)), outbound_traffic_policy=policy, source=resource)


def _egress_host(text: str, own_namespace: str, domain: str) -> EgressHost | str:
    """The :class:`EgressHost` of ``namespace/dnsName``, or why ``text`` is not one."""
    namespace, slash, name = text.partition("/")
    if not slash or not namespace or not name:
        return (f"invalid egress host '{text}': write namespace/dnsName, for example './*', "
                f"'istio-system/*' or '*/httpbin.org'")
    if namespace not in (_ANY, _NONE, _OWN) and not _NAMESPACE.match(namespace):
        return f"invalid namespace '{namespace}' in egress host '{text}'; use '*', '.', '~' or a namespace name"
    name = name.lower()
    if name != "*":
        problem = hostnames.check(name)
        if problem:
            return f"invalid host '{name}' in egress host '{text}': {problem}"
        if "." not in name and namespace != _OWN:  # under '.': completed in the workload's namespace (resolve)
            name = hostnames.fqdn(name, own_namespace if namespace in (_ANY, _NONE) else namespace, domain)
    return EgressHost(namespace=namespace, pattern=name, domain=domain)


def _destinations(vs: VirtualService, namespace: str):
    """The destinations of ``vs`` a workload of ``namespace`` may be routed to: those of its ``http``
    routes (and mirrors) that have no match or a match whose ``sourceNamespace`` is absent or
    ``namespace``, and of its ``tcp`` and ``tls`` routes."""
    for http in vs.http:
        if http.match and all(match.source_namespace not in (None, namespace) for match in http.match):
            continue
        yield from http.route
        yield from (mirror for mirror, _ in http.mirrors)
    for route in (*vs.tcp, *vs.tls):
        yield from route.route


def sidecar_scope(objects, workload, root_namespace: str, warn=None) -> EgressScope | None:
    """The :class:`EgressScope` of the Sidecar that applies to ``workload``, or None (see the module doc).

    ``warn(obj, path, reason)`` hears of Sidecars that tie with the one chosen.  A gateway
    (``workload.gateway``) gets none: Istio gives gateways a default scope that imports everything.
    """
    if workload.gateway:
        return None
    sidecars = sorted((obj for obj in objects if isinstance(obj, Sidecar)), key=lambda obj: obj.name)
    own = [obj for obj in sidecars if obj.namespace == workload.namespace]
    levels = ([obj for obj in own if obj.selector is not None and selects(obj.selector, workload.labels)],
              [obj for obj in own if obj.selector is None],
              [obj for obj in sidecars if obj.namespace == root_namespace and obj.selector is None])
    for level in levels:
        if not level:
            continue
        chosen = level[0]
        if warn is not None:
            for other in level[1:]:
                what = (f"also selects workload {workload.namespace}/{workload.name} "
                        f"({format_labels(workload.labels)})" if other.selector is not None
                        else f"is another Sidecar without workloadSelector in namespace {other.namespace}")
                warn(other, ("spec",), f"Sidecar {other.namespace}/{other.name} {what}; only "
                                       f"{chosen.namespace}/{chosen.name} (first by name) applies. Keep one")
        return EgressScope(chosen, workload.namespace)
    return None
