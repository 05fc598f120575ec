"""Compiling validated resources into one proxy's :class:`~mesh.config.tables.ProxyConfig`.

The compiler takes the point of view of one :class:`Workload`: it sees only
what ``exportTo`` lets the workload's namespace see and, for its outbound
traffic, what the ``Sidecar`` that applies to it imports
(:mod:`mesh.config.sidecar`); it gives short host
aliases only for its own namespace, and it prefers resources of its own
namespace when several claim the same host.

- **Clusters**: ``outbound|PORT||HOST`` for every ServiceEntry host and port,
  and ``outbound|PORT|SUBSET|HOST`` for every DestinationRule subset.
- **Routes**: a VirtualService's ``http`` list becomes one virtual host; a
  ServiceEntry host without one gets a default route to its first port.
- **TCP routes**: the TCP, TLS and HTTPS ports and the VirtualServices'
  ``tcp``/``tls`` lists become the outbound TCP listeners
  (:mod:`mesh.config.compile_l4`).
- **Security**: the AuthorizationPolicies, PeerAuthentications and
  RequestAuthentications that apply to the workload (see
  :mod:`mesh.config.security_compile`, :mod:`mesh.config.request_authn`), and a warning
  when its namespace's policies use selectors and none selects it
  (:func:`mesh.config.selection.unselected_warning`).
- **Cross-references** that do not resolve (a route to a host, port or subset
  nobody defines) still compile, as routes to clusters that do not exist (the
  proxy answers 503 ``NC``); each is recorded as a
  :class:`~mesh.config.errors.ConfigWarning` in ``ProxyConfig.warnings``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from mesh.config import hosts as hostnames
from mesh.config.compile_l4 import compile_l4
from mesh.config.dump import describe_action, describe_cluster
from mesh.config.errors import ConfigErrors, ConfigWarning
from mesh.config.gateway import MESH, bound, compile_gateway
from mesh.config.loader import load_dir
from mesh.config.predicates import compile_match, compile_matches
from mesh.config.request_authn import RequestAuthentication, compile_request_authn
from mesh.config.resources import (
    DEFAULT_LOAD_BALANCER,
    DEFAULT_RETRY,
    TCP_PROTOCOLS,
    TLS_PROTOCOLS,
    ConnectionPool,
    DestinationRule,
    ServiceEntry,
    VirtualService,
    WorkloadEndpoint,
    WorkloadEntry,
)
from mesh.config.route_extras import RouteExtras, sequence_ops
from mesh.config.security_compile import (
    DEFAULT_ROOT_NAMESPACE,
    applicable,
    compile_authz,
    compile_peer_authn,
    compile_tcp_authz,
)
from mesh.config.selection import selects, unselected_warning
from mesh.config.sidecar import sidecar_scope
from mesh.config.tables import (
    H2_PROTOCOLS,
    ClusterSpec,
    CompiledRoute,
    EndpointSpec,
    OutlierPolicy,
    ProxyConfig,
    RouteAction,
    RouteTable,
    VirtualHost,
    circuit_limits,
    cluster_name,
    upstream_protocol,
)
from mesh.config.validate import validate

_TLS_MODE_LABEL = ("security.istio.io/tlsMode", "istio")
_POLICY_SETTINGS = ("load_balancer", "connection_pool", "outlier_detection", "tls")


@dataclass(frozen=True)
class Workload:
    """The workload a proxy serves: the point of view of its compiled config.

    ``app_port`` is the port its inbound listener forwards to: the destination
    port AuthorizationPolicy ``ports`` and ``destination.port`` test (None:
    unknown, see :mod:`mesh.config.authz_predicates`).  ``inbound`` holds the
    ``(address, port)`` pairs at which peers reach its inbound listener: a
    ServiceEntry endpoint there is this workload (see ``_app_protocol``).
    ``gateway``: the proxy is a gateway (``mesh-proxy --gateway``); its config gets the
    routes of the Gateways that select it (:mod:`mesh.config.gateway`), whose ``credentialName``
    Secrets are mounted in ``credentials_dir``.
    """

    name: str
    namespace: str
    labels: dict = field(default_factory=dict)
    service_account: str | None = None
    app_port: int | None = None
    inbound: tuple = ()
    gateway: bool = False
    credentials_dir: str | None = None


def load_and_compile(config_dir, workload: Workload, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> tuple:
    """Load, validate and compile a config directory: ``(ProxyConfig, warnings)``.

    Raises :class:`~mesh.config.errors.ConfigErrors` listing every problem of
    every file when anything is invalid (nothing is compiled then).
    """
    loaded = load_dir(config_dir)
    objects, errors = validate(loaded.resources)
    if loaded.errors or errors:
        raise ConfigErrors(loaded.errors + errors)
    config = compile_proxy_config(objects, workload, root_namespace=root_namespace)
    return config, list(config.warnings)


def compile_proxy_config(objects, workload: Workload, domain: str = hostnames.DEFAULT_DOMAIN,
                         trust_domain: str = "cluster.local",
                         root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> ProxyConfig:
    """Compile validated objects (from :func:`mesh.config.validate.validate`) for ``workload``.

    ``root_namespace`` holds Istio's mesh-wide security policies.
    """
    return _Compiler(objects, workload, domain, trust_domain, root_namespace).build()


def _dns_host_members(entry: ServiceEntry, host: str) -> list:
    """The endpoint of a DNS ServiceEntry without endpoints: the host itself, which the sidecar
    resolves (Istio: "the host field will be used as the DNS name of the endpoint")."""
    if entry.resolution == "STATIC" or entry.endpoints or entry.workload_selector is not None:
        return []
    return [WorkloadEndpoint(address=host)]


def config_version(objects) -> str:
    """A short hash of the sources of ``objects`` (independent of their order and files)."""
    sources = sorted([obj.source.kind, obj.source.namespace, obj.source.name, obj.source.spec]
                     for obj in objects)
    canonical = json.dumps(sources, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclass
class _Service:
    """One host of a visible ServiceEntry, with its endpoints and DestinationRule."""

    host: str
    entry: ServiceEntry
    members: list
    rule: DestinationRule | None


class _Compiler:
    """One compilation; holds the warnings and the tables being built."""

    def __init__(self, objects, workload, domain, trust_domain, root_namespace):
        self.objects = list(objects)
        self.workload = workload
        self.domain = domain
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self.warnings = []
        self.clusters = {}
        self.route_dumps = {}
        self.port_route_dumps = {}  # virtual host name -> {port: route dumps} (see VirtualHost.ports)

    def build(self) -> ProxyConfig:
        scope = sidecar_scope(self.objects, self.workload, self.root_namespace, self._warn)
        entries = self._visible(ServiceEntry)
        rules = _RuleIndex([obj for obj in self.objects if isinstance(obj, DestinationRule)], self.root_namespace)
        self.local_services = self._services(entries, rules)
        virtual_services = [vs for vs in self._visible(VirtualService)
                            if scope is None or scope.imports_any(vs.namespace, vs.hosts)]
        self.services = self.local_services if scope is None else self._scoped_services(scope, virtual_services)
        for service in self.services.values():
            self._add_clusters(service)
        for_mesh = [vs for vs in virtual_services if bound(vs.gateways, MESH)]
        routes = self._route_table(for_mesh)
        l4, l4_dump = compile_l4(self, for_mesh)
        gateway, gateway_dump = compile_gateway(self, virtual_services) if self.workload.gateway else ({}, None)
        authz, authz_dump = compile_authz(self.objects, self.workload, self.root_namespace, self._warn)
        peer_authn, peer_authn_dump = compile_peer_authn(self.objects, self.workload, self.root_namespace,
                                                         self._warn)
        request_authn, request_authn_dump = compile_request_authn(
            applicable(self.objects, RequestAuthentication, self.workload, self.root_namespace))
        unselected = unselected_warning(self.objects, self.workload)
        if unselected is not None:
            self.warnings.append(unselected)
        dump = {
            "routes": self._dump_routes(routes),
            "clusters": [describe_cluster(spec) for _, spec in sorted(self.clusters.items())],
            "authz": authz_dump,
            "peer_authentication": peer_authn_dump,
            "request_authn": request_authn_dump,
            "tcp_listeners": l4_dump,
        }
        app_protocol = self._app_protocol()
        dump["app_protocol"] = app_protocol
        if gateway_dump is not None:
            dump["gateway"] = gateway_dump
        tcp_authz = compile_tcp_authz(self.objects, self.workload, self.root_namespace,
                                      self._warn if app_protocol in TCP_PROTOCOLS else None)
        app_service = self._app_service()
        outbound_policy = scope.sidecar.outbound_traffic_policy if scope is not None else None
        return ProxyConfig(version=config_version(self.objects), routes=routes, clusters=self.clusters,
                           authz=authz, peer_authentication=peer_authn, app_protocol=app_protocol,
                           l4=l4, tcp_authz=tcp_authz, app_service=app_service, request_authn=request_authn,
                           outbound_traffic_policy=outbound_policy,
                           gateway=gateway, sources=tuple(sorted({obj.source.file for obj in self.objects})),
                           dump=dump,
                           warnings=tuple(sorted(self.warnings, key=lambda w: (w.file, w.line))))

    def _scoped_services(self, scope, virtual_services) -> dict:
        """The services of :attr:`local_services` a Sidecar's ``scope`` imports: those of its egress hosts,
        then those its VirtualServices route to (:meth:`mesh.config.sidecar.EgressScope.inferred`)."""
        services = {host: service for host, service in self.local_services.items()
                    if scope.imports(service.entry.namespace, host)}
        local = self.local_services
        for host in scope.inferred(virtual_services, lambda host: [port.number for port in local[host].entry.ports]
                                   if host in local else None):
            services.setdefault(host, local[host])
        return services

    def _warn(self, obj, path: tuple, reason: str) -> None:
        """Report a warning about ``obj``'s field ``path``, once (several compile passes may find it)."""
        warning = obj.source.error(path, reason, cls=ConfigWarning)
        if warning not in self.warnings:
            self.warnings.append(warning)

    def _visible(self, cls) -> list:
        """Objects of ``cls`` exported to the workload's namespace, own namespace first."""
        namespace = self.workload.namespace
        found = [obj for obj in self.objects if isinstance(obj, cls)
                 and is_exported(obj.export_to, obj.namespace, namespace)]
        return sorted(found, key=lambda obj: (obj.namespace != namespace, obj.namespace, obj.name))

    # -- registry --------------------------------------------------------------------------

    def _services(self, entries, rules) -> dict:
        workload_entries = [obj for obj in self.objects if isinstance(obj, WorkloadEntry)]
        services = {}
        for entry in entries:
            members = list(entry.endpoints)
            if entry.workload_selector is not None:
                wanted = set(entry.workload_selector)
                members += [we.endpoint for we in sorted(workload_entries, key=lambda we: we.name)
                            if we.namespace == entry.namespace and wanted <= set(we.endpoint.labels)]
            for index, host in enumerate(entry.hosts):
                first = services.get(host)
                if first is not None:
                    self._warn(entry, ("spec", "hosts", index),
                               f"host '{host}' is already defined by ServiceEntry {first.entry.namespace}/"
                               f"{first.entry.name}, which takes precedence; this definition is ignored")
                    continue
                services[host] = _Service(host, entry, members or _dns_host_members(entry, host),
                                          self._rule_for(host, entry.namespace, rules))
        return services

    def _rule_for(self, host, service_namespace, rules: _RuleIndex) -> DestinationRule | None:
        """The DestinationRule for ``host``, as Istio's ``PushContext.destinationRule`` finds it.

        1. the rules of the client's namespace that it can see (a client in the root namespace:
           the root namespace's rules exported only to itself);
        2. else the rules of the service's namespace exported to the client's namespace;
        3. else those of the root namespace exported to it.

        Rules of any other namespace never apply.  In each namespace the most specific host wins
        (exact, else the longest wildcard), among all the rules of that step: when that host's rules
        are not exported to the client, the step gives none (as Istio).  The rules of one namespace
        for one host are merged (:class:`_RuleIndex`); what the merge leaves out is a warning.
        """
        client = self.workload.namespace
        steps = [(rules.local.get(client, {}), False) if client != rules.root else (rules.root_local, False),
                 (rules.exported.get(service_namespace, {}), True), (rules.exported.get(rules.root, {}), True)]
        for pool, exported in steps:
            rule_host = hostnames.most_specific(pool, host)
            if rule_host is None:
                continue
            entries = rules.consolidated(pool, rule_host)
            if exported:
                entries = [entry for entry in entries
                           if not entry.export_to or entry.export_to & {"*", client}]  # "." does not count here
            if not entries:
                continue
            chosen = entries[-1]  # Istio's SidecarScope.DestinationRule: the last rule without workloadSelector
            for ignored in entries[:-1]:
                for rule in (rule for rule in ignored.merged if rule not in chosen.merged):
                    self._warn(rule, ("spec", "exportTo"), (
                        f"DestinationRule {chosen.rule.namespace}/{chosen.merged[0].name} also applies to "
                        f"'{rule_host}' in namespace {client} and takes precedence: Istio merges the "
                        "DestinationRules of one host and namespace only when their exportTo are the same; "
                        f"this rule is ignored for namespace {client}; give them the same exportTo, or "
                        "write one rule"))
            for rule, path, reason in chosen.dropped:
                self._warn(rule, path, reason)
            return chosen.rule
        return None

    def _add_clusters(self, service: _Service) -> None:
        rule = service.rule
        subsets = [None] + list(rule.subsets if rule else ())
        for port in service.entry.ports:
            for subset in subsets:
                spec = self._cluster(service, port, subset)
                self.clusters[spec.name] = spec

    def _cluster(self, service: _Service, port, subset) -> ClusterSpec:
        settings = _merged_policy(service.rule, subset, port.number)
        balancer = settings["load_balancer"] or DEFAULT_LOAD_BALANCER
        pool = settings["connection_pool"] or ConnectionPool()
        members = service.members
        if subset is not None:
            members = [member for member in members if set(subset.labels) <= set(member.labels)]
        tls = settings["tls"]
        origination = _origination(tls, service.host)
        if origination is not None and port.protocol in TLS_PROTOCOLS:
            self._warn_double_tls(service, port, origination.mode)
        if origination is not None and not origination.names() and not origination.insecure_skip_verify:
            self._warn(service.rule, ("spec", "trafficPolicy"), (
                f"tls.mode {origination.mode} to host '{service.host}' (a wildcard or an IP address, so no server "
                "name comes from it) needs sni or subjectAltNames, since txmesh does not take them from each "
                "request's Host; set sni (and subjectAltNames), or "
                "insecureSkipVerify: true to skip the name check; until then the sidecar refuses these "
                "connections (503 UF)"))
        if tls is None and service.entry.location == "MESH_EXTERNAL" and any(
                _TLS_MODE_LABEL in member.labels for member in members):
            self._warn(service.entry, ("spec", "location"), (
                f"'{service.host}' is MESH_EXTERNAL (the default location), so, as in Istio, clients do not use "
                f"auto mTLS to its endpoints labelled {_TLS_MODE_LABEL[0]}: {_TLS_MODE_LABEL[1]}: they get "
                "plaintext; set location: MESH_INTERNAL for a service of the mesh (or tls.mode: ISTIO_MUTUAL in "
                "a DestinationRule)"))
        endpoints = tuple(
            EndpointSpec(address=member.address,
                         port=dict(member.ports).get(port.name) or port.target_port or port.number,
                         labels=member.labels, weight=member.weight,
                         identity=None if origination else self._identity(member, service.entry, tls),
                         origination=origination)
            for member in members)
        subset_name = subset.name if subset is not None else ""
        return ClusterSpec(
            name=cluster_name(port.number, subset_name, service.host), service=service.host,
            port=port.number, subset=subset_name, lb_policy=balancer.policy, hash_on=balancer.hash_on,
            endpoints=endpoints, connect_timeout=pool.connect_timeout,
            max_requests_per_connection=pool.max_requests_per_connection, idle_timeout=pool.idle_timeout,
            outlier=settings["outlier_detection"] or OutlierPolicy(), protocol=port.protocol,
            upstream_protocol=upstream_protocol(port.protocol, pool.use_client_protocol, pool.h2_upgrade_policy),
            max_concurrent_streams=pool.max_concurrent_streams,
            limits=circuit_limits(pool.max_connections, pool.max_pending_requests, pool.max_requests,
                                  pool.max_retries),
            resolution=service.entry.resolution, tcp_keepalive=pool.tcp_keepalive,
            max_connection_duration=pool.max_connection_duration)

    def _warn_double_tls(self, service: _Service, port, mode: str) -> None:
        """Once per rule and port: TLS originated on a TLS or HTTPS port, where the app speaks TLS itself."""
        warning = service.rule.source.error(
            ("spec", "trafficPolicy"), f"tls.mode {mode} applies to port {port.number} "
            f"of '{service.host}', whose protocol {port.protocol} means the app speaks TLS itself: the sidecar would "
            "wrap it in a second TLS; originate TLS on an HTTP port with targetPort (Istio's Egress TLS "
            "Origination), or use portLevelSettings so that this port has no tls", cls=ConfigWarning)
        if warning not in self.warnings:
            self.warnings.append(warning)

    def _identity(self, member, entry: ServiceEntry, tls) -> str | None:
        """The SPIFFE id an endpoint must present, or None for plaintext.

        ``tls.mode`` ISTIO_MUTUAL/DISABLE decides; without it (Istio's auto
        mTLS) endpoints labelled ``security.istio.io/tlsMode: istio`` get mTLS,
        unless the entry is ``MESH_EXTERNAL``: Istio's ``buildUpstreamTLSSettings``
        never turns auto mTLS on for a mesh-external service.
        """
        tls_mode = tls.mode if tls is not None else None
        if tls_mode == "DISABLE" or (tls_mode is None and (
                entry.location == "MESH_EXTERNAL" or _TLS_MODE_LABEL not in member.labels)):
            return None
        if member.service_account is None and entry.subject_alt_names:
            return entry.subject_alt_names[0]
        account = member.service_account or "default"
        return f"spiffe://{self.trust_domain}/ns/{entry.namespace}/sa/{account}"

    def _app_protocol(self) -> str | None:
        """The protocol of the workload's app port (see :attr:`ProxyConfig.app_protocol`).

        As Istio reads it from the Service ports that select a pod: the ports of the
        ServiceEntries of the workload's namespace that lead to it (:meth:`_ports_to_workload`).
        HTTP2 and GRPC are one protocol on the wire; when the ports disagree otherwise,
        the protocol is unknown (None) and a warning says so.
        """
        workload = self.workload
        if not workload.app_port:
            return None
        found = {}  # protocol -> the first entry that gave it
        entries = {id(service.entry): service for service in self.local_services.values()}  # one per entry
        for service in entries.values():
            if service.entry.namespace == workload.namespace:
                for port in self._ports_to_workload(service):
                    found.setdefault(port.protocol, service.entry)
        if len(found) > 1 and not set(found) <= H2_PROTOCOLS:
            first = next(iter(found.values()))
            self._warn(first, ("spec", "ports"), f"the ServiceEntries that lead to workload {workload.namespace}/"
                       f"{workload.name} give its app port {workload.app_port} different protocols "
                       f"({', '.join(sorted(found))}); its sidecar forwards each request with the protocol it came "
                       "in; give the ports one protocol (or name the app port with targetPort)")
            return None
        return next(iter(found), None) if len(found) < 2 else "HTTP2"

    def _app_service(self) -> str | None:
        """The host of the first ServiceEntry of the workload's namespace that leads to it (the
        ``destination_service`` of its inbound TCP connections), or None."""
        for host, service in self.local_services.items():
            if service.entry.namespace == self.workload.namespace and self._ports_to_workload(service):
                return host
        return None

    def _ports_to_workload(self, service: _Service) -> list:
        """The ports of ``service``'s ServiceEntry that lead to this workload.

        Those with an endpoint at the workload's inbound listener (:attr:`Workload.inbound`);
        else, when an endpoint's labels include all of the workload's labels or the entry's
        ``workloadSelector`` selects them, the ports whose endpoint port (or ``targetPort``)
        is the app port, or all of them when none is.
        """
        workload, entry, members = self.workload, service.entry, service.members

        def target(member, port):
            return dict(member.ports).get(port.name) or port.target_port or port.number

        exact = [port for port in entry.ports
                 if any((member.address, target(member, port)) in workload.inbound for member in members)]
        if exact:
            return exact
        labels = set(workload.labels.items())
        if not labels:
            return []
        mine = [member for member in members if labels <= set(member.labels)]
        if not mine and not (entry.workload_selector and selects(entry.workload_selector, workload.labels)):
            return []
        at_app_port = [port for port in entry.ports
                       if workload.app_port in {port.target_port, *(target(member, port) for member in mine)}]
        return at_app_port or list(entry.ports)

    def _service_for(self, host) -> _Service | None:
        name = hostnames.most_specific(self.services, host)
        return None if name is None else self.services[name]

    # -- routes ----------------------------------------------------------------------------

    def _route_table(self, virtual_services) -> RouteTable:
        claimed, patterns = {}, []
        for vs in virtual_services:
            if not vs.http:
                continue  # only tcp/tls routes: HTTP to its hosts takes the services' default routes
            vhost = None
            for index, host in enumerate(vs.hosts):
                owner = claimed.get(host) or next((v for p, v in patterns if p == host), None)
                if owner is not None:
                    self._warn(vs, ("spec", "hosts", index),
                               f"host '{host}' is already routed by {owner.name}, which takes precedence; "
                               "this VirtualService is ignored for it")
                    continue
                vhost = vhost or self._virtual_host(vs)
                if host.startswith("*"):
                    patterns.append((host, vhost))
                else:
                    claimed[host] = vhost
                    self._check_route_host(vs, index, host)
        primary, short, wildcards = dict(claimed), {}, {}
        for host, service in self.services.items():
            vhost = claimed.get(host) or _most_specific(patterns, host) or self._default_host(service)
            if host.startswith("*"):
                wildcards.setdefault(host[1:], vhost)
                continue
            primary[host] = vhost
            for index, address in enumerate(service.entry.addresses):
                if primary.setdefault(address, vhost) is not vhost:
                    self._warn(service.entry, ("spec", "addresses", index),
                               f"address {address} is already a host of {primary[address].name}; "
                               "requests to it are routed there")
        for host, vhost in primary.items():
            for alias in hostnames.aliases(host, self.workload.namespace, self.domain)[1:]:
                short.setdefault(alias, vhost)
        for pattern, vhost in patterns:
            wildcards.setdefault(pattern[1:], vhost)
        return RouteTable(exact={**short, **primary},
                          wildcards=tuple(sorted(wildcards.items(), key=lambda item: -len(item[0]))))

    def _check_route_host(self, vs, index, host) -> None:
        if hostnames.is_ip(host) or self._service_for(host) is not None:
            return
        hint = f"{host}.svc.{self.domain}"
        close = f"; did you mean '{hint}'?" if hint in self.services else ""
        self._warn(vs, ("spec", "hosts", index), f"no ServiceEntry visible to namespace "
                                                 f"{self.workload.namespace} defines host '{host}'{close}")

    def _default_host(self, service: _Service) -> VirtualHost:
        """The route of a host no VirtualService routes: to its service's cluster of the port the request
        was sent to (the first port for any other), as Istio's default route of each port."""
        entry = service.entry

        def routes(port: int) -> tuple:
            action = RouteAction(name=f"ServiceEntry/{entry.namespace}/{entry.name}",
                                 clusters=(cluster_name(port, "", service.host),),
                                 cumulative_weights=(100,), retry=DEFAULT_RETRY)
            return (CompiledRoute(None, action),), [{"match": "*", "action": describe_action(action)}]

        first, self.route_dumps[service.host] = routes(entry.ports[0].number)
        ports = _http_ports(service)
        if len(ports) < 2:
            return VirtualHost(name=service.host, routes=first)
        by_port = {port: routes(port) for port in ports}
        self.port_route_dumps[service.host] = {port: dumps for port, (_, dumps) in by_port.items()}
        return VirtualHost(name=service.host, routes=first, ports={port: built for port, (built, _) in by_port.items()})

    def _virtual_host(self, vs: VirtualService, gateway_ref: str = MESH, server_port: int | None = None) -> VirtualHost:
        """The routes of ``vs`` for the sidecars (``mesh``) or for the server port ``server_port`` of the Gateway
        ``gateway_ref``; for the sidecars, per port too when a destination without a port leads to a service with
        several (:class:`~mesh.config.tables.VirtualHost`)."""
        name = f"VirtualService/{vs.namespace}/{vs.name}" + ("" if gateway_ref == MESH else f"@{gateway_ref}")
        routes, self.route_dumps[name] = self._routes(vs, gateway_ref, server_port)
        if gateway_ref != MESH and server_port is not None:  # a gateway's routes for one server port
            self.port_route_dumps.setdefault(name, {})[server_port] = self.route_dumps[name]
            return VirtualHost(name=name, routes=routes)
        ports = self._route_ports(vs) if gateway_ref == MESH else ()
        if not ports:
            return VirtualHost(name=name, routes=routes)
        by_port = {port: self._routes(vs, gateway_ref, port) for port in ports}
        self.port_route_dumps[name] = {port: dumps for port, (_, dumps) in by_port.items()}
        return VirtualHost(name=name, routes=routes, ports={port: built for port, (built, _) in by_port.items()})

    def _routes(self, vs: VirtualService, gateway_ref: str, listener_port: int | None = None) -> tuple:
        """``(compiled routes, their dumps)`` of ``vs`` for a request sent to ``listener_port`` (None: a port
        of none of the services its destinations without a port lead to).  For a gateway, ``listener_port`` is
        the server's port, which decides the matches' ``port`` here (Istio's translateRoute)."""
        routes, dumps = [], []
        for http in vs.http:
            http = self._for_this_workload(http, gateway_ref, listener_port if gateway_ref != MESH else None)
            if http is None:
                continue
            action, destinations = self._action(vs, http, listener_port)
            for predicate, text, strip in _match_groups(http):
                if action.rewrite_prefix is not None and strip is not None:
                    action = dataclasses.replace(action, rewrite_strip=strip)
                routed = self._with_extras(vs, http, action, destinations, listener_port,
                                           whole_path=strip is None and http.rewrite_uri is not None)
                routes.append(CompiledRoute(predicate, routed))
                dumps.append({"match": text, "action": describe_action(routed)})
        return tuple(routes), dumps

    def _route_ports(self, vs: VirtualService) -> list:
        """The ports whose routes differ from the others': the HTTP ports of each service with several
        that a destination without a port (a route's or a mirror's) leads to."""
        ports = set()
        for http in vs.http:
            for destination in (*http.route, *(mirror for mirror, _ in http.mirrors)):
                service = self._service_for(destination.host) if destination.port is None else None
                service_ports = _http_ports(service) if service is not None else ()
                if len(service_ports) > 1:
                    ports.update(service_ports)
        return sorted(ports)

    def _for_this_workload(self, http, gateway_ref=MESH, server_port=None):
        """``http`` with only the matches that hold for this proxy, as Istio's ``sourceMatchHTTP``: a match
        with ``gateways`` when they include ``gateway_ref`` (its ``sourceLabels`` and ``sourceNamespace`` are
        then not looked at, as in Istio), any other when its ``sourceLabels`` and ``sourceNamespace`` hold for
        this workload; and, on a gateway server's port ``server_port``, whose ``port`` is that port or absent
        (the port is then decided: it is not tested per request).  None when it had matches and none is
        left, so the route is not in this proxy's table."""
        on_port = server_port is not None
        if not any(match.source_labels or match.source_namespace or match.gateways or (on_port and match.port)
                   for match in http.match):
            return http
        matches = tuple(dataclasses.replace(match, port=None) if on_port and match.port else match
                        for match in http.match
                        if (gateway_ref in match.gateways if match.gateways else self.from_this_workload(match))
                        and (not on_port or match.port in (None, server_port)))
        return dataclasses.replace(http, match=matches) if matches else None

    def from_this_workload(self, match) -> bool:
        """Whether a match's ``sourceLabels`` and ``sourceNamespace`` hold for this proxy's workload."""
        workload = self.workload
        return (all(workload.labels.get(name) == value for name, value in match.source_labels)
                and (match.source_namespace is None or match.source_namespace == workload.namespace))

    def _action(self, vs: VirtualService, http, listener_port: int | None = None) -> tuple:
        """``(RouteAction, [(cluster name, destination), ...])`` of an http route, without its extras, for a
        request sent to ``listener_port`` (see :meth:`_destination_cluster`).

        As Istio does, a lone destination's ``headers`` join the route's (one header parser, the
        route's operations first); the weighted destinations' go to :meth:`_variants`.
        """
        clusters, cumulative, total, destinations = [], [], 0, []
        for index, destination in enumerate(http.route):
            name = self._destination_cluster(vs, http.index, index, destination, listener_port=listener_port)
            if destination.weight:
                total += destination.weight
                clusters.append(name)
                cumulative.append(total)
                destinations.append((name, destination))
        request, response, authority = http.request_headers, http.response_headers, http.rewrite_authority
        if len(http.route) == 1 and _has_headers(http.route[0]):
            [only] = http.route
            request = sequence_ops((request, only.request_headers))
            response = sequence_ops((response, only.response_headers))
            authority = authority or only.authority
        for part in http.fault.without_percentage if http.fault else ():
            self._warn(vs, ("spec", "http", http.index, "fault", part),
                       f"fault.{part} has no percentage, so it applies to no request (as in Istio and Envoy); "
                       f"set percentage: {{value: 100}} to {part} every request")
        action = RouteAction(
            name=f"VirtualService/{vs.namespace}/{vs.name}/{http.name or f'http[{http.index}]'}",
            clusters=tuple(clusters), cumulative_weights=tuple(cumulative), timeout=http.timeout,
            retry=http.retry,
            rewrite_prefix=http.rewrite_uri.encode() if http.rewrite_uri is not None else None,
            rewrite_authority=authority.encode() if authority else None,
            request_headers=request, response_headers=response)
        return action, destinations

    def _with_extras(self, vs, http, action, destinations, listener_port, whole_path) -> RouteAction:
        """``action`` with the :class:`RouteExtras` the route needs, if any.

        ``whole_path``: ``rewrite.uri`` replaces the whole path, decided per request (a ``regex``
        uri match).
        """
        if whole_path:
            action = dataclasses.replace(action, rewrite_prefix=None)
        extras = RouteExtras(
            fault=http.fault, cors=http.cors, redirect=http.redirect, direct_response=http.direct_response,
            uri_regex=http.rewrite_regex, whole_path=http.rewrite_uri.encode() if whole_path else None,
            by_cluster=self._variants(vs, http, action, destinations) if len(http.route) > 1 else {},
            mirrors=tuple((self._destination_cluster(vs, http.index, index, destination, listener_port=listener_port,
                                                     path=("spec", "http", http.index, "mirrors", index,
                                                           "destination")), fraction)
                for index, (destination, fraction) in enumerate(http.mirrors)))
        return dataclasses.replace(action, extras=extras) if extras else action

    def _variants(self, vs, http, action, destinations) -> dict:
        """Cluster name -> the action of the weighted destination with ``headers`` that leads there.

        Envoy evaluates a weighted destination's header operations first, then the route's; the
        route's authority wins over the destination's.
        """
        variants = {}
        for name, destination in destinations:
            if not _has_headers(destination):
                continue
            authority = action.rewrite_authority or (destination.authority.encode() if destination.authority
                                                     else None)
            variant = dataclasses.replace(
                action, rewrite_authority=authority,
                request_headers=sequence_ops(destination.request_headers, action.request_headers),
                response_headers=sequence_ops(destination.response_headers, action.response_headers))
            if variants.setdefault(name, variant) != variant:
                self._warn(vs, ("spec", "http", http.index, "route"),
                           f"several destinations lead to cluster {name} with different headers; the first "
                           "one's apply to all of them")
        return variants

    def _destination_cluster(self, vs, route_index, index, destination, section="http", listener_port=None,
                             path=None) -> str:
        """The cluster name of a route destination; warns when it does not resolve.

        ``section`` is the route's list (``http``, ``tcp`` or ``tls``); a destination without a port goes
        to ``listener_port`` (the port the request or connection came to) when the service has it, as in
        Istio, else to the service's first port (warned about for a gateway's or a TCP route, whose
        listener port is one the service does not have; an http route of the sidecars has routes per
        port, :meth:`_virtual_host`).  ``path`` names the destination in warnings (default: the route's).
        """
        path = path or ("spec", section, route_index, "route", index, "destination")
        what = "requests" if section == "http" else "connections"
        subset = destination.subset or ""
        service = self._service_for(destination.host)
        if service is None:
            self._warn(vs, path + ("host",), f"no ServiceEntry visible to namespace {self.workload.namespace} "
                                             f"defines host '{destination.host}'; {what} routed here get "
                                             f"{'503 ' if section == 'http' else ''}(NC) until one does")
            return cluster_name(destination.port or listener_port or 80, subset, destination.host)
        ports = service.entry.ports
        if destination.port is None and listener_port in {service_port.number for service_port in ports}:
            port = listener_port
        elif destination.port is None:
            port = ports[0].number
            if len(ports) > 1 and (section != "http" or vs.gateways and MESH not in vs.gateways):
                self._warn(vs, path, f"no destination port, and '{service.host}' has several ports; using "
                                     f"the first ({port}); set destination.port.number")
        else:
            port = destination.port
            if port not in {service_port.number for service_port in ports}:
                self._warn(vs, path + ("port", "number"), f"'{service.host}' has no port {port}; its ports "
                           f"are {', '.join(str(p.number) for p in ports)}")
        if subset and subset not in {s.name for s in (service.rule.subsets if service.rule else ())}:
            self._warn(vs, path + ("subset",), f"no DestinationRule visible to namespace "
                                               f"{self.workload.namespace} defines subset '{subset}' of "
                                               f"'{service.host}'; {what} routed here get "
                                               f"{'503 ' if section == 'http' else ''}(NC)")
        return cluster_name(port, subset, service.host)

    def _dump_routes(self, table: RouteTable) -> list:
        domains = {}
        for name, vhost in table.exact.items():
            domains.setdefault(vhost.name, []).append(name)
        for suffix, vhost in table.wildcards:
            domains.setdefault(vhost.name, []).append("*" + suffix)
        return [{"name": name, "domains": sorted(domains.get(name, ())), "routes": routes,
                 **({"ports": {str(port): dumps for port, dumps in self.port_route_dumps[name].items()}}
                    if name in self.port_route_dumps else {})}
                for name, routes in sorted(self.route_dumps.items())]


def is_exported(export_to, owner_namespace, client_namespace) -> bool:
    """Whether a resource of ``owner_namespace`` with Istio's ``exportTo`` is visible in ``client_namespace``.

    Empty or ``*``: everywhere; ``.``: its own namespace; a name: that namespace; ``~``: nowhere.
    """
    if not export_to:
        return True
    return any(entry == "*" or entry == client_namespace or (entry == "." and owner_namespace == client_namespace)
               for entry in export_to)


@dataclass
class _MergedRule:
    """Istio's ``ConsolidatedDestRule``: the DestinationRules of one namespace and host merged into
    ``rule``, with the ``exportTo`` (a set) of the first; ``merged`` are those rules, in order, and
    ``dropped`` ``(rule, path, reason)`` the warnings about what the merge left out."""

    rule: DestinationRule
    export_to: frozenset
    merged: list
    dropped: list = field(default_factory=list)

    def add(self, rule: DestinationRule) -> None:
        """Merge ``rule`` in, as Istio's ``mergeDestinationRule``: its subsets whose name is new are
        appended; its ``trafficPolicy`` is taken only when the merged rule has none yet."""
        first = self.merged[0]
        merged, names, subsets = self.rule, {subset.name for subset in self.rule.subsets}, list(self.rule.subsets)
        for index, subset in enumerate(rule.subsets):
            if subset.name in names:
                self.dropped.append((rule, ("spec", "subsets", index, "name"), (
                    f"subset '{subset.name}' of '{rule.host}' is already defined by DestinationRule "
                    f"{first.namespace}/{first.name} (several DestinationRules of one host in one namespace are "
                    "merged, as in Istio: the first definition of a subset is kept); this subset is ignored")))
                continue
            names.add(subset.name)
            subsets.append(subset)
        merged = dataclasses.replace(merged, subsets=tuple(subsets))
        if merged.traffic_policy is None and rule.traffic_policy is not None:
            # the rule whose policy applies is the one warnings about that policy name
            merged = dataclasses.replace(merged, traffic_policy=rule.traffic_policy, source=rule.source)
        elif rule.traffic_policy is not None:
            owner = next(other for other in self.merged if other.traffic_policy is not None)
            self.dropped.append((rule, ("spec", "trafficPolicy"), (
                f"DestinationRule {owner.namespace}/{owner.name} also sets a trafficPolicy for '{rule.host}' and "
                "takes precedence (several DestinationRules of one host in one namespace are merged, as in "
                "Istio: the subsets of all of them, the trafficPolicy of the first that has one); this "
                "trafficPolicy is ignored; move it to that rule")))
        self.rule = merged
        self.merged.append(rule)


class _RuleIndex:
    """The DestinationRules as Istio's ``PushContext.setDestinationRules`` indexes them.

    In Istio's order (oldest first, then by name; txmesh, which does not know creation times, goes by
    name): ``local[namespace][host]``, the rules of a namespace that it sees itself (no ``exportTo``,
    or one with ``*``, ``.`` or its name); ``exported[namespace][host]``, those it exports (all but
    the rules exported only to their own namespace); ``root_local[host]``, the root namespace's rules
    exported only to itself.  :meth:`consolidated` merges one host's rules of one of these pools.
    """

    def __init__(self, rules, root_namespace: str):
        self.root = root_namespace
        self.local, self.exported, self.root_local = {}, {}, {}
        self._consolidated = {}
        for rule in sorted(rules, key=lambda rule: (rule.name, rule.namespace)):
            namespace, export_to = rule.namespace, set(rule.export_to)
            if not export_to or export_to & {"*", ".", namespace}:
                self.local.setdefault(namespace, {}).setdefault(rule.host, []).append(rule)
            if len(export_to) == 1 and export_to <= {".", namespace}:
                if namespace == root_namespace:
                    self.root_local.setdefault(rule.host, []).append(rule)
            else:
                self.exported.setdefault(namespace, {}).setdefault(rule.host, []).append(rule)

    def consolidated(self, pool: dict, host: str) -> list:
        """The :class:`_MergedRule` list of ``pool[host]``, as Istio's ``mergeDestinationRule`` builds it
        (with ``ENABLE_ENHANCED_DESTINATIONRULE_MERGE``, its default): a rule is merged into each earlier
        entry whose ``exportTo`` is the same set (or, non-empty, a subset of the rule's); it makes an
        entry of its own when the last entry it met was not merged with."""
        key = (id(pool), host)
        found = self._consolidated.get(key)
        if found is None:
            found = self._consolidated[key] = []
            for rule in pool[host]:
                export_to, separate = frozenset(rule.export_to), True
                for entry in found:
                    separate = not (export_to == entry.export_to or (entry.export_to and export_to > entry.export_to))
                    if not separate:
                        entry.add(rule)
                if separate:
                    found.append(_MergedRule(rule, export_to, [rule]))
        return found


def _http_ports(service: _Service) -> list:
    """The numbers of the service's ports that carry HTTP (not TCP, TLS or HTTPS), in order."""
    return [port.number for port in service.entry.ports if not port.is_tcp]


def _most_specific(patterns, host) -> VirtualHost | None:
    matching = [(pattern, vhost) for pattern, vhost in patterns if hostnames.covers(pattern, host)]
    return max(matching, key=lambda item: len(item[0]))[1] if matching else None


def _merged_policy(rule, subset, port: int) -> dict:
    """The four traffic settings for one port of one subset, merged as Istio does.

    Top-level policy, then its portLevelSettings for the port, then the
    subset's policy, then the subset's portLevelSettings; a more specific
    policy overrides a setting it sets, and a matching port-level entry
    replaces all four settings (unset ones return to their defaults).
    """
    settings = dict.fromkeys(_POLICY_SETTINGS)
    policies = (rule.traffic_policy if rule else None, subset.traffic_policy if subset else None)
    for policy in policies:
        if policy is None:
            continue
        for name in _POLICY_SETTINGS:
            value = getattr(policy, name)
            if value is not None:
                settings[name] = value
        for number, port_policy in policy.port_level:
            if number == port:
                settings = {name: getattr(port_policy, name) for name in _POLICY_SETTINGS}
    return settings


def _origination(tls, host: str):
    """The :class:`~mesh.config.resources.ClientTLS` with which the sidecar originates TLS to a service's
    endpoints (None: it does not), its SNI defaulting to the service's host as Istio's auto SNI does (the
    certificate is then checked against it); a wildcard or IP host gives no SNI (RFC 6066).  Without an SNI
    or ``subjectAltNames`` there is no name to check the certificate against: unless ``insecureSkipVerify``
    says to check none, the sidecar refuses such connections (:mod:`mesh.proxy.tls_origination`) and the
    compiler warns (Istio takes the name from each request's Host; txmesh does not)."""
    if tls is None or not tls.originates:
        return None
    if tls.sni is None and not host.startswith("*") and not hostnames.is_ip(host):
        return dataclasses.replace(tls, sni=host)
    return tls


def _match_groups(http) -> list:
    """``[(predicate, text, rewrite_strip)]`` for one http route.

    One predicate for the whole match list, unless ``rewrite.uri`` must strip
    a different length for different matches (prefix ``/a`` vs ``/abc``): then
    one per match, in order, so each carries its own strip.
    """
    strips = [_rewrite_strip(match) for match in http.match] or [1]
    if http.rewrite_uri is None or len(set(strips)) == 1:
        predicate, text = compile_matches(http.match)
        return [(predicate, text, strips[0])]
    return [(*compile_match(match), strip) for match, strip in zip(http.match, strips)]


def _rewrite_strip(match) -> int | None:
    """How much of the path ``rewrite.uri`` replaces: the matched prefix or exact path, or None for the
    whole path of a ``regex`` match (its length is known per request).

    Without a uri match, Envoy's implicit match is the prefix ``/``.
    """
    if match.uri is None:
        return 1
    return None if match.uri.kind == "regex" else len(match.uri.value)


def _has_headers(destination) -> bool:
    return bool(destination.request_headers or destination.response_headers or destination.authority)
