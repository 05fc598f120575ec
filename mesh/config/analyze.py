"""Cross-resource checks for ``meshctl analyze``: problems no single resource shows.

:func:`validate` checks each resource alone; :func:`analyze` looks at the
valid resources together, mesh-wide (not from one proxy's point of view, as
the compiler's warnings do), and returns a
:class:`~mesh.config.errors.ConfigWarning` per finding, printed
``FILE:LINE: Kind/namespace/name: field: reason`` like validation errors:

- **unknown host**: a VirtualService destination host that no ServiceEntry
  defines (or none exported to the VirtualService's namespace);
- **unknown subset**: a destination subset that the clients of the route do
  not get: no DestinationRule that applies to them defines it (see "Seen from
  the clients' namespaces" below);
- **empty subset**: a DestinationRule subset whose labels match no endpoint
  of the host (ServiceEntry endpoints and selected WorkloadEntries);
- **DestinationRule for an unknown host**;
- **conflicting VirtualServices**: two VirtualServices of the sidecars for one
  host (only one applies to a client; which one depends on the client's
  namespace; on a gateway they are merged);
- **unknown gateway**: a VirtualService (or match) ``gateways`` entry that no
  Gateway defines;
- **AuthorizationPolicy selector that matches nothing**: no workload known
  from the files (WorkloadEntries, and ServiceEntry endpoints, which belong to
  the ServiceEntry's namespace) in the policy's namespace -- or, for the root
  namespace, anywhere -- has all the selector's labels;
- **STRICT mTLS towards a workload without a sidecar**, and **towards a
  workload reached through a MESH_EXTERNAL ServiceEntry**, see below;
- with the proxies connected to the control plane (``meshctl analyze
  --control-admin``): each **proxy that no selector of its namespace's
  policies matches** (:func:`mesh.config.selection.unselected_warning`), and
  proxies count as workloads for "matches nothing".  :func:`selection`
  tells which resource selects which proxy.

Seen from the clients' namespaces
---------------------------------
Which DestinationRule a client gets, and whether it sends mTLS to an endpoint,
depend on the client's namespace (a DestinationRule applies only from the
client's namespace, the service's namespace or the root namespace, in that
order, with ``exportTo``; the rules of one namespace and host are merged).
Analyze does not redo that reasoning: for each namespace the files know (those
of the resources, the names in their ``exportTo`` and ``sourceNamespace``, and
those of the connected proxies) it compiles the config of a sidecar of that
namespace with no labels (:func:`mesh.config.compile.compile_proxy_config`)
and reads its clusters: the subsets it has for a host, and, per endpoint,
whether it sends mTLS (an identity) or not.  A route counts for the namespaces whose sidecars
use its VirtualService (as the compiler chose it; a VirtualService bound to
a Gateway, every namespace it is exported to) and that its ``sourceNamespace``
matches allow.  Findings name the namespaces concerned when not all of them
are.

What "has no sidecar" means with files only
-------------------------------------------
A workload (a ServiceEntry endpoint or a WorkloadEntry) *has a sidecar* when
it is labelled ``security.istio.io/tlsMode: istio``: that is the label the
mesh's auto-mTLS reads (Istio's injector sets it on every injected pod), and
clients send mTLS to an endpoint only when it has it and its ServiceEntry is
``MESH_INTERNAL`` (or a DestinationRule sets ``tls.mode: ISTIO_MUTUAL``).  A
PeerAuthentication whose effective mode is STRICT (after workload > namespace
> mesh precedence) for a workload without a sidecar is reported, because

- as a *server*, its clients do not originate mTLS to it, so every call is
  refused -- unless a DestinationRule that applies to every client namespace
  forces ``ISTIO_MUTUAL`` for it;
- as a *client* (a plain process of the same namespace), it cannot present a
  certificate to the STRICT workloads of the policy.

A workload *with* a sidecar whose clients reach it through a ``MESH_EXTERNAL``
ServiceEntry (the default location) without ``tls.mode: ISTIO_MUTUAL`` is
reported too when it is STRICT: as in Istio, clients use no auto mTLS to a
mesh-external service, so they send it plaintext, which STRICT refuses.

A DestinationRule ``tls.mode: DISABLE`` for a host whose endpoints are STRICT
is reported too, when some client namespace does send them plaintext (not when
merging leaves that ``trafficPolicy`` out): STRICT refuses it.

Workloads that join by announcing themselves to the control plane (HELLO)
are not in the files: pass the control plane's admin port (``--control-admin``)
so that their labels count, or expect "matches nothing" findings for
selectors that only they match.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.config import hosts as hostnames
from mesh.config.compile import Workload, compile_proxy_config, is_exported
from mesh.config.errors import ConfigWarning
from mesh.config.gateway import MESH, Gateway, bound
from mesh.config.resources import DestinationRule, ServiceEntry, VirtualService, WorkloadEntry
from mesh.config.security import AuthorizationPolicy, PeerAuthentication
from mesh.config.security_compile import DEFAULT_ROOT_NAMESPACE, compile_peer_authn
from mesh.config.selection import (
    POLICY_KINDS,
    format_labels,
    selected_by,
    selector_of,
    selects,
    unselected_warning,
)

SIDECAR_LABEL = ("security.istio.io/tlsMode", "istio")


@dataclass(frozen=True)
class _Workload:
    """An endpoint known from the files, with the resource (and field) that declares it."""

    namespace: str
    labels: frozenset
    owner: object
    path: tuple
    description: str
    address: str = ""
    entries: tuple = ()  # the ServiceEntries it is an endpoint of (its own, or those selecting it)

    @property
    def has_sidecar(self) -> bool:
        return SIDECAR_LABEL in self.labels


def analyze(objects, root_namespace: str = DEFAULT_ROOT_NAMESPACE, proxies=()) -> list:
    """Cross-resource findings about validated objects, sorted by file and line.

    ``proxies``: ``(node, Workload)`` pairs of the proxies connected to the
    control plane, with the labels they announced.
    """
    return _Analysis(list(objects), root_namespace, list(proxies)).run()


def selection(objects, proxies, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> list:
    """Which proxy each resource selects: ``[(kind, namespace/name, selector text, [nodes])]``.

    Every AuthorizationPolicy and PeerAuthentication (selector text
    ``namespace-wide``/``mesh-wide`` without a selector) and every
    ServiceEntry with a ``workloadSelector``, sorted by kind and name;
    ``proxies`` as for :func:`analyze`.
    """
    selecting = {}
    for node, workload in proxies:
        for row in selected_by(objects, workload, root_namespace):
            selecting.setdefault((row["kind"], row["namespace"], row["name"]), []).append(node)
    rows = []
    for obj in objects:
        selector = selector_of(obj)
        if not isinstance(obj, POLICY_KINDS) and selector is None:
            continue
        if selector is not None:
            shown = format_labels(selector)
        else:
            shown = "mesh-wide" if obj.namespace == root_namespace else "namespace-wide"
        kind = type(obj).__name__
        rows.append((kind, f"{obj.namespace}/{obj.name}", shown,
                     sorted(selecting.get((kind, obj.namespace, obj.name), []))))
    return sorted(rows)


def _warning(obj, path: tuple, reason: str) -> ConfigWarning:
    return obj.source.error(path, reason, cls=ConfigWarning)


def _where(obj) -> str:
    return f"{type(obj).__name__} {obj.namespace}/{obj.name} ({obj.source.file}:{obj.source.line})"


def _namespaces(names) -> str:
    names = sorted(names)
    return f"namespace{'s' if len(names) > 1 else ''} {', '.join(names)}"


class _ClientView:
    """What the compiler gives a sidecar of one namespace (no labels): the VirtualServices it routes
    with, the subsets it has per service host, and how it reaches each endpoint."""

    def __init__(self, config):
        vhosts = [*config.routes.exact.values(), *(vhost for _, vhost in config.routes.wildcards)]
        self.virtual_services = {vhost.name for vhost in vhosts}
        self.subsets, self.endpoints = {}, {}
        for cluster in config.clusters.values():
            self.subsets.setdefault(cluster.service, set()).add(cluster.subset)
            for endpoint in cluster.endpoints:
                key = (cluster.service, endpoint.address, frozenset(endpoint.labels))
                self.endpoints.setdefault(key, []).append(endpoint)

    def service_for(self, host: str) -> str | None:
        """The service host that serves ``host`` (itself, else the longest wildcard covering it), or None."""
        return hostnames.most_specific(self.subsets, host)


class _Analysis:
    def __init__(self, objects, root_namespace, proxies):
        self.objects = objects
        self.root_namespace = root_namespace
        self.proxies = proxies
        self.entries = self._of(ServiceEntry)
        self.rules = self._of(DestinationRule)
        self.virtual_services = self._of(VirtualService)
        self.workload_entries = self._of(WorkloadEntry)
        self.findings = []
        self.workloads = self._workloads()
        self.client_namespaces = self._client_namespaces()
        self._views = {}

    def _of(self, cls) -> list:
        return sorted((obj for obj in self.objects if isinstance(obj, cls)),
                      key=lambda obj: (obj.namespace, obj.name))

    def warn(self, obj, path, reason):
        self.findings.append(_warning(obj, path, reason))

    def run(self) -> list:
        self._virtual_service_destinations()
        self._conflicting_virtual_services()
        self._gateway_references()
        self._destination_rules()
        self._authorization_selectors()
        self._strict_without_sidecar()
        self._unselected_proxies()
        unique = {(str(f)): f for f in self.findings}
        return sorted(unique.values(), key=lambda f: (f.file, f.line, str(f)))

    # -- the registry as the files describe it ------------------------------------------------
    def _workloads(self) -> list:
        found = []
        for entry in self.entries:
            for index, endpoint in enumerate(entry.endpoints):
                found.append(_Workload(entry.namespace, frozenset(endpoint.labels), entry,
                                       ("spec", "endpoints", index),
                                       f"endpoint {endpoint.address} of ServiceEntry {entry.namespace}/{entry.name}",
                                       endpoint.address, (entry,)))
        for we in self.workload_entries:
            selecting = tuple(entry for entry in self.entries
                              if entry.namespace == we.namespace and entry.workload_selector is not None
                              and set(entry.workload_selector) <= set(we.endpoint.labels))
            found.append(_Workload(we.namespace, frozenset(we.endpoint.labels), we, ("spec",),
                                   f"WorkloadEntry {we.namespace}/{we.name} ({we.endpoint.address})",
                                   we.endpoint.address, selecting))
        return found

    def _client_namespaces(self) -> list:
        """The namespaces whose sidecars are looked at: those of the resources, those their ``exportTo``
        and ``sourceNamespace`` name, and those of the connected proxies."""
        names = {obj.namespace for obj in self.objects} | {workload.namespace for _, workload in self.proxies}
        for obj in self.objects:
            names.update(name for name in getattr(obj, "export_to", None) or () if name not in {"*", ".", "~"})
        names.update(match.source_namespace for vs in self.virtual_services for http in vs.http
                     for match in http.match if match.source_namespace)
        return sorted(names)

    def _view(self, namespace: str) -> _ClientView:
        """The compiled config of a sidecar of ``namespace`` without labels, as the compiler builds it."""
        view = self._views.get(namespace)
        if view is None:
            client = Workload(name="meshctl-analyze", namespace=namespace)
            view = self._views[namespace] = _ClientView(
                compile_proxy_config(self.objects, client, root_namespace=self.root_namespace))
        return view

    def _members(self, entry: ServiceEntry) -> list:
        """Label sets of the endpoints of a ServiceEntry (its own and the WorkloadEntries it selects)."""
        members = [frozenset(endpoint.labels) for endpoint in entry.endpoints]
        if entry.workload_selector is not None:
            wanted = set(entry.workload_selector)
            members += [frozenset(we.endpoint.labels) for we in self.workload_entries
                        if we.namespace == entry.namespace and wanted <= set(we.endpoint.labels)]
        return members

    def _entries_for(self, host: str, namespace: str | None = None) -> list:
        """ServiceEntries defining ``host`` (exactly or by wildcard), visible to ``namespace`` if given."""
        return [entry for entry in self.entries
                if any(hostnames.covers(pattern, host) or pattern == host for pattern in entry.hosts)
                and (namespace is None or is_exported(entry.export_to, entry.namespace, namespace))]

    def _route_clients(self, vs, http) -> list:
        """The client namespaces whose sidecars use the http route ``http`` of ``vs``."""
        sources = {match.source_namespace for match in http.match}
        gateways = [ref for ref in vs.gateways if ref != MESH]
        name = f"VirtualService/{vs.namespace}/{vs.name}"
        return [namespace for namespace in self.client_namespaces
                if (not sources or None in sources or namespace in sources)
                and ((bound(vs.gateways, MESH) and name in self._view(namespace).virtual_services)
                     or (gateways and is_exported(vs.export_to, vs.namespace, namespace)))]

    # -- checks -------------------------------------------------------------------------------
    def _virtual_service_destinations(self):
        for vs in self.virtual_services:
            for http in vs.http:
                for index, destination in enumerate(http.route):
                    path = ("spec", "http", http.index, "route", index, "destination")
                    host = destination.host
                    if hostnames.is_ip(host):
                        continue
                    if not self._entries_for(host):
                        self.warn(vs, path + ("host",), f"routes to unknown host '{host}': no ServiceEntry "
                                  "defines it; requests routed here get 503 (NC). Add a ServiceEntry or fix "
                                  "the host")
                        continue
                    if not self._entries_for(host, vs.namespace):
                        self.warn(vs, path + ("host",), f"routes to host '{host}', whose ServiceEntry is not "
                                  f"exported to namespace {vs.namespace} (exportTo); requests get 503 (NC)")
                        continue
                    if destination.subset:
                        self._route_subset(vs, http, path + ("subset",), host, destination.subset)

    def _route_subset(self, vs, http, path, host, subset):
        """A route to ``subset`` of ``host``: the client namespaces of the route that do not get it."""
        reached, lacking, defined = [], [], set()
        for namespace in self._route_clients(vs, http):
            view = self._view(namespace)
            service = view.service_for(host)
            if service is None:
                continue  # the host is not visible there: another finding (for the VirtualService's namespace)
            reached.append(namespace)
            if subset not in view.subsets[service]:
                lacking.append(namespace)
                defined |= view.subsets[service] - {""}
        if not lacking:
            return
        every = len(lacking) == len(reached)
        them = "its clients" if every else "them"
        elsewhere = [rule for rule in self.rules if (hostnames.covers(rule.host, host) or rule.host == host)
                     and subset in {s.name for s in rule.subsets}]
        if defined:
            known = f"; {'defined subsets' if every else 'subsets they get'}: {', '.join(sorted(defined))}"
        elif elsewhere or not every:
            known = f"; no DestinationRule that applies to {them} defines subsets for it"
        else:
            known = "; no DestinationRule defines subsets for it"
        if elsewhere:
            known += (f"; {', '.join(_where(rule) for rule in elsewhere)} defines it but does not apply to {them}: "
                      "a DestinationRule applies only from the client's namespace, else the service's namespace, "
                      f"else the root namespace ({self.root_namespace}), as exportTo allows, and rules of one host "
                      "and namespace with different exportTo are not merged")
        if every:
            self.warn(vs, path, f"routes to unknown subset '{subset}' of '{host}'{known}; requests routed here "
                                "get 503 (NC)")
        else:
            self.warn(vs, path, f"routes to subset '{subset}' of '{host}', which clients in {_namespaces(lacking)} "
                                f"do not get{known}; their requests routed here get 503 (NC)")

    def _conflicting_virtual_services(self):
        owners = {}
        for vs in self.virtual_services:
            if not bound(vs.gateways, MESH):
                continue  # a gateway merges the VirtualServices of one host
            for index, host in enumerate(vs.hosts):
                first = owners.setdefault(host, vs)
                if first is not vs:
                    self.warn(vs, ("spec", "hosts", index), f"host '{host}' is also routed by {_where(first)}; "
                              "only one VirtualService applies per host (which one depends on the client's "
                              "namespace): merge their http routes into one")

    def _gateway_references(self):
        known = {gateway.ref for gateway in self._of(Gateway)}
        for vs in self.virtual_services:
            places = [(("spec", "gateways"), vs.gateways)]
            places += [(("spec", "http", http.index, "match", index, "gateways"), match.gateways)
                       for http in vs.http for index, match in enumerate(http.match)]
            for path, refs in places:
                for ref in refs:
                    if ref != MESH and ref not in known:
                        self.warn(vs, path, f"binds gateway '{ref}', which no Gateway defines, so no gateway serves "
                                            "these routes; add the Gateway or fix the name (NAME is a Gateway of the "
                                            "VirtualService's namespace, NAMESPACE/NAME of another)")

    def _destination_rules(self):
        for rule in self.rules:
            entries = [entry for entry in self.entries
                       if any(hostnames.covers(rule.host, host) or host == rule.host
                              or hostnames.covers(host, rule.host) for host in entry.hosts)]
            if not entries:
                self.warn(rule, ("spec", "host"), f"no ServiceEntry defines host '{rule.host}'; this "
                          "DestinationRule applies to nothing")
                continue
            members = [labels for entry in entries for labels in self._members(entry)]
            for index, subset in enumerate(rule.subsets):
                wanted = set(subset.labels)
                if not any(wanted <= labels for labels in members):
                    labels = ", ".join(f"{k}={v}" for k, v in subset.labels) or "(none)"
                    self.warn(rule, ("spec", "subsets", index, "labels"),
                              f"subset '{subset.name}' ({labels}) matches no endpoint of '{rule.host}' "
                              f"({len(members)} endpoint(s) known); requests routed to it get 503 (UH)")
            mode = rule.traffic_policy.tls_mode if rule.traffic_policy is not None else None
            if mode == "DISABLE":
                self._plaintext_to_strict(rule, entries)

    def _authorization_selectors(self):
        for policy in self._of(AuthorizationPolicy):
            if policy.selector is None:
                continue

            def in_scope(namespace, policy=policy):
                return policy.namespace == self.root_namespace or namespace == policy.namespace

            scope = [dict(w.labels) for w in self.workloads if in_scope(w.namespace)]
            proxies = [workload.labels for _, workload in self.proxies if in_scope(workload.namespace)]
            if not any(selects(policy.selector, labels) for labels in scope + proxies):
                where = "any namespace" if policy.namespace == self.root_namespace else \
                    f"namespace {policy.namespace}"
                known = f"known from the files ({len(scope)} workload(s): ServiceEntry endpoints and WorkloadEntries"
                if self.proxies:
                    known += f"; and {len(proxies)} proxy(ies) connected to the control plane"
                self.warn(policy, ("spec", "selector"), f"selector ({format_labels(policy.selector)}) matches no "
                          f"workload of {where} {known}); the policy applies to nothing")

    def _unselected_proxies(self):
        for node, workload in self.proxies:
            warning = unselected_warning(self.objects, workload, describe=f"proxy {node} (workload "
                                                                          f"{workload.namespace}/{workload.name})")
            if warning is not None:
                self.findings.append(warning)

    def _effective_strict(self, workload: _Workload):
        """The PeerAuthentication that makes ``workload`` STRICT (on any port), or None."""
        view = Workload(name="analyze", namespace=workload.namespace, labels=dict(workload.labels))
        result, dump = compile_peer_authn(self.objects, view, self.root_namespace, lambda *args: None)
        if result.mode != "STRICT" and "STRICT" not in dict(result.port_modes).values():
            return None
        chosen = dump["policies"]
        name = chosen.get("workload") or chosen.get("namespace") or chosen.get("mesh")
        return next((p for p in self._of(PeerAuthentication) if f"{p.namespace}/{p.name}" == name), None)

    def _reached(self, workload: _Workload) -> dict:
        """``{client namespace: [(entry, EndpointSpec), ...]}``: how the sidecars of each namespace reach
        ``workload`` (every cluster of every host of its ServiceEntries), as compiled for them."""
        reached = {}
        for namespace in self.client_namespaces:
            view = self._view(namespace)
            ways = [(entry, endpoint) for entry in workload.entries for host in entry.hosts
                    for endpoint in view.endpoints.get((host, workload.address, workload.labels), ())]
            if ways:
                reached[namespace] = ways
        return reached

    def _sent_plaintext(self, workload: _Workload) -> bool:
        """Whether the sidecars of some namespace send ``workload`` plaintext (no mTLS, no TLS origination):
        a ``tls.mode: DISABLE`` that merging leaves out, or that applies to no client, does not."""
        return any(endpoint.identity is None and endpoint.origination is None
                   for ways in self._reached(workload).values() for _, endpoint in ways)

    def _strict_without_sidecar(self):
        for workload in self.workloads:
            policy = self._effective_strict(workload)
            if policy is None:
                continue
            path = ("spec", "mtls", "mode") if policy.mode == "STRICT" else ("spec", "portLevelMtls")
            reached = self._reached(workload)
            if not workload.has_sidecar:
                plaintext = [namespace for namespace, ways in reached.items()
                             if any(endpoint.identity is None for _, endpoint in ways)]
                if reached and not plaintext:
                    continue  # a DestinationRule makes every client send mTLS anyway (ISTIO_MUTUAL)
                clients = "clients" if len(plaintext) == len(reached) else f"clients in {_namespaces(plaintext)}"
                self.warn(policy, path, f"STRICT mTLS applies to {workload.description}, which has no sidecar (no "
                                        f"label {SIDECAR_LABEL[0]}: {SIDECAR_LABEL[1]}): {clients} send it "
                                        "plaintext, which STRICT refuses, and it cannot call STRICT workloads "
                                        "itself. Label it if it runs a sidecar, or use PERMISSIVE for it")
                continue
            for entry in workload.entries:
                if entry.location != "MESH_EXTERNAL":
                    continue
                plaintext = [namespace for namespace, ways in reached.items()
                             if any(way is entry and endpoint.identity is None and endpoint.origination is None
                                    for way, endpoint in ways)]
                if not plaintext:
                    continue
                clients = "its clients" if len(plaintext) == len(reached) else f"clients in {_namespaces(plaintext)}"
                self.warn(policy, path, f"STRICT mTLS applies to {workload.description}, but {clients} reach it "
                                        f"through {_where(entry)}, which is MESH_EXTERNAL (the default location): "
                                        "as in Istio, clients use no auto mTLS to a mesh-external service, so they "
                                        "send it plaintext, which STRICT refuses. Set location: MESH_INTERNAL on "
                                        "that ServiceEntry (or tls.mode: ISTIO_MUTUAL in a DestinationRule for "
                                        "it), or use PERMISSIVE for it")

    def _plaintext_to_strict(self, rule, entries):
        for entry in entries:
            for index, endpoint in enumerate(entry.endpoints):
                workload = _Workload(entry.namespace, frozenset(endpoint.labels), entry,
                                     ("spec", "endpoints", index), "", endpoint.address, (entry,))
                policy = self._effective_strict(workload)
                if policy is not None and self._sent_plaintext(workload):
                    self.warn(rule, ("spec", "trafficPolicy", "tls", "mode"),
                              f"tls.mode DISABLE makes clients send plaintext to endpoint {endpoint.address} "
                              f"of '{entry.hosts[0]}', where {_where(policy)} requires STRICT mTLS: every "
                              "request is refused. Remove tls.mode DISABLE or relax the PeerAuthentication")
                    return
