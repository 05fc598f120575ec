"""Compiling TCP, TLS and HTTPS service ports and VirtualService ``tcp``/``tls`` routes into an
:class:`~mesh.config.tables.L4Table` for one proxy, as Istio builds a sidecar's outbound TCP listeners
(pilot's ``buildSidecarOutboundTCPFilterChainOpts`` and ``...TLSFilterChainOpts``).

Every TCP-class port (:data:`mesh.config.resources.TCP_PROTOCOLS`) of a visible ServiceEntry gets a
listener: one per ServiceEntry ``address`` (``10.96.0.5_9000``), or, for a ServiceEntry without
addresses, the port's shared ``0.0.0.0_9000`` listener, which takes every destination address on that
port.  Its chains (:class:`~mesh.config.tables.L4Chain`) come from the VirtualService that routes the
service's host (the same one as for HTTP: exact host first, else the most specific wildcard):

- **TCP ports**: the ``tcp`` routes in order.  The static part of each match (``port``,
  ``sourceLabels``, ``sourceNamespace``, ``gateways``) is decided here, for this proxy and this port,
  as Istio does; a match left with ``destinationSubnets`` becomes a chain on those subnets, and the
  first route that matches without subnets (or has no match) ends the list.  Unless one did, the
  service's own cluster (``outbound|PORT||HOST``) is the last chain.
- **TLS and HTTPS ports**: the ``tls`` routes, one chain per match (``sniHosts`` and
  ``destinationSubnets``; a repeated pair is left out, as Istio does).  Without any, the default chain
  to the service's cluster; on a shared ``0.0.0.0`` listener it matches the service's host names as
  SNI, since the address cannot tell the services apart.  A ``tls`` route never falls back to the
  service: a server name no chain matches is closed (``NR``).

A headless Kubernetes Service (:attr:`~mesh.config.resources.ServiceEntry.headless`) gets, instead of the
shared listener, one listener per endpoint address on each of its TCP-class ports (``10.0.2.1_9092``), as
Istio does for a Passthrough service ("a listener for each instance"), except at this proxy's own
addresses; other destinations on that port are not captured by it.  Its chains are built as above, and a
connection they route to one of that host's clusters goes to the endpoint it was dialled at
(:attr:`~mesh.config.tables.L4Chain.original_dst`, Envoy's ``ORIGINAL_DST``), not a load-balanced one.

A destination without a port uses the listener's port if the service has it.  Unresolved
destinations are warnings (the connection is closed with ``NC``), as for HTTP routes.
"""

from __future__ import annotations

from dataclasses import replace

from mesh.config import hosts as hostnames
from mesh.config.dump import describe_action
from mesh.config.resources import MESH, TLS_PROTOCOLS
from mesh.config.tables import L4Chain, L4Listener, L4Table, RouteAction, cluster_name


def compile_l4(compiler, virtual_services) -> tuple:
    """``(L4Table, dump)`` of the services the compiler sees (a :class:`mesh.config.compile._Compiler`)."""
    return _L4Compiler(compiler, virtual_services).build()


class _L4Compiler:
    """One compilation of the TCP listeners; warns through the compiler."""

    def __init__(self, compiler, virtual_services):
        self.compiler = compiler
        self.workload = compiler.workload
        self.virtual_services = [vs for vs in virtual_services if vs.tcp or vs.tls]
        self.actions = {}  # (vs name, section, index, port) -> RouteAction (warned about once)

    def build(self) -> tuple:
        by_destination, shared = {}, {}
        http_ports = {port.number for service in self.compiler.services.values()
                      for port in service.entry.ports if not port.is_tcp}
        for host, service in self.compiler.services.items():
            if host.startswith("*"):
                continue  # a wildcard host has no address to listen on, and no name to match
            entry = service.entry
            vs = self._virtual_service(host)
            headless = entry.headless
            for index, port in enumerate(entry.ports):
                if not port.is_tcp:
                    continue
                tls = port.protocol in TLS_PROTOCOLS
                chains = self._chains(service, port, vs, tls, shared=not entry.addresses and not headless)
                where = (entry, ("spec", "ports", index))
                if headless:
                    for address in self._instance_addresses(service):
                        pinned = tuple(replace(chain, original_dst=(host, address)) for chain in chains)
                        self._add(by_destination, (address, port.number), tls, pinned, where,
                                  f"{address}:{port.number} is already a TCP port of")
                    continue
                for address in entry.addresses:
                    self._add(by_destination, (address, port.number), tls, chains, where,
                              f"{address}:{port.number} is already a TCP port of")
                if not entry.addresses:
                    if port.number in http_ports:
                        self.compiler._warn(*where, f"port {port.number} is a {port.protocol} port of a ServiceEntry "
                                            "without addresses, so every captured connection to that port that is not "
                                            "HTTP goes to it, whatever its address (as in Istio); give the "
                                            "ServiceEntry addresses")
                    self._add(shared, port.number, tls, chains, where, f"port {port.number} of a ServiceEntry without "
                              "addresses takes every connection to that port, and it is already the TCP port of")
        by_destination = {key: L4Listener(f"{key[0]}_{key[1]}", tls, tuple(chains))
                          for key, (tls, chains, _) in by_destination.items()}
        by_port = {number: L4Listener(f"0.0.0.0_{number}", tls, tuple(chains))
                   for number, (tls, chains, _) in shared.items()}
        table = L4Table(by_destination=by_destination, by_port=by_port)
        return table, [describe_listener(listener) for listener in (*by_destination.values(), *by_port.values())]

    def _instance_addresses(self, service) -> list:
        """The endpoint addresses of a headless service that get a listener: IP addresses, without this
        proxy's own (Istio skips the node's address: the app reaches itself directly)."""
        own = {address for address, _ in self.workload.inbound}
        return sorted({member.address for member in service.members
                       if hostnames.is_ip(member.address) and member.address not in own})

    def _add(self, listeners, key, tls, chains, where, taken) -> None:
        """Add a service port's chains to the listener at ``key``.

        Services share a listener when they can be told apart: TLS ones by server name, or the
        hosts of one ServiceEntry.  A chain that matches exactly what an earlier one matches is
        left out (the first wins, as in Istio); any other service is a conflict, warned about.
        """
        entry, path = where
        current = listeners.get(key)
        if current is None:
            current = listeners[key] = (tls, [], entry)
        elif current[2] is not entry and not (tls and current[0]):
            first = current[2]
            self.compiler._warn(entry, path, f"{taken} {first.namespace}/{first.name}, which keeps it; give one of "
                                             "them other addresses")
            return
        merged = current[1]
        taken_matches = {(chain.subnets, chain.sni) for chain in merged}
        merged.extend(chain for chain in chains if (chain.subnets, chain.sni) not in taken_matches)

    def _virtual_service(self, host):
        """The VirtualService that routes ``host``: the first that names it, else the most specific wildcard."""
        exact = next((vs for vs in self.virtual_services if host in vs.hosts), None)
        if exact is not None:
            return exact
        covering = [(len(pattern), vs) for vs in self.virtual_services for pattern in vs.hosts
                    if pattern.startswith("*") and hostnames.covers(pattern, host)]
        return max(covering, key=lambda item: item[0])[1] if covering else None

    def _chains(self, service, port, vs, tls, shared) -> tuple:
        routes = () if vs is None else vs.tls if tls else vs.tcp
        chains, seen = [], set()
        for route in routes:
            matches = [match for match in route.match if self._static_match(match, port.number)]
            if route.match and not matches:
                continue
            action = self._action(vs, "tls" if tls else "tcp", route, port.number)
            settings = self._tcp_proxy_settings(route)
            if tls:
                for match in matches:
                    key = (match.sni_hosts, match.destination_subnets)
                    if key not in seen:
                        seen.add(key)
                        chains.append(L4Chain(action, match.destination_subnets, _server_names(match.sni_hosts),
                                              **settings))
            elif not matches or any(not match.destination_subnets for match in matches):
                chains.append(L4Chain(action, **settings))
                return tuple(chains)  # a catch-all route: the ones after it are never reached
            else:
                chains.append(L4Chain(action, tuple(net for match in matches for net in match.destination_subnets),
                                      **settings))
        if chains and tls:
            return tuple(chains)
        default = RouteAction(name=f"{service.host}:{port.number}",
                              clusters=(cluster_name(port.number, "", service.host),), cumulative_weights=(100,))
        names = _server_names(hostnames.aliases(service.host, self.workload.namespace, self.compiler.domain)) \
            if tls and shared else None
        return (*chains, L4Chain(default, (), names, **_pool_settings(service)))

    def _static_match(self, match, port) -> bool:
        """The part of a match Istio decides for the proxy and the listener port (gateways: the sidecars'
        ``mesh``, or none)."""
        return ((match.port is None or match.port == port) and (not match.gateways or MESH in match.gateways)
                and self.compiler.from_this_workload(match))

    def _tcp_proxy_settings(self, route) -> dict:
        """The :class:`~mesh.config.tables.L4Chain` settings of a ``tcp``/``tls`` route: those of its
        first destination's service (Istio's ``buildOutboundNetworkFilters``), whatever the weights."""
        first = route.route[0].host if route.route else None
        service = self.compiler._service_for(first) if first else None
        return _pool_settings(service) if service is not None else {}

    def _action(self, vs, section, route, port) -> RouteAction:
        key = (vs.namespace, vs.name, section, route.index, port)
        action = self.actions.get(key)
        if action is None:
            clusters, cumulative, total = [], [], 0
            for index, destination in enumerate(route.route):
                name = self.compiler._destination_cluster(vs, route.index, index, destination, section, port)
                if destination.weight:
                    total += destination.weight
                    clusters.append(name)
                    cumulative.append(total)
            action = self.actions[key] = RouteAction(
                name=f"VirtualService/{vs.namespace}/{vs.name}/{section}[{route.index}]",
                clusters=tuple(clusters), cumulative_weights=tuple(cumulative))
        return action


def tcp_listener(compiler, name: str, port: int, routes) -> L4Listener:
    """The :class:`~mesh.config.tables.L4Listener` of a gateway's TCP server ``port``.

    ``routes`` holds ``(VirtualService, tcp route, its matches for this port)`` in order
    (:func:`mesh.config.gateway.compile_gateway` chooses them); the first route that matches
    without ``destinationSubnets`` ends the list.  There is no default chain: a connection no
    route takes is closed (``NR``), as Envoy's gateway listener without a filter chain does.
    """
    l4 = _L4Compiler(compiler, ())
    chains = []
    for vs, route, matches in routes:
        action = l4._action(vs, "tcp", route, port)
        settings = l4._tcp_proxy_settings(route)
        subnets = tuple(net for match in matches for net in match.destination_subnets)
        if not matches or any(not match.destination_subnets for match in matches):
            chains.append(L4Chain(action, **settings))
            break
        chains.append(L4Chain(action, subnets, **settings))
    return L4Listener(name, False, tuple(chains))


def _pool_settings(service) -> dict:
    """``idle_timeout`` and ``max_duration`` of the TCP proxy to ``service`` (a compiler's ``_Service``):
    ``connectionPool.tcp.idleTimeout`` and ``maxConnectionDuration`` of the top-level ``trafficPolicy`` of
    its DestinationRule, as Istio's ``tcp_proxy`` takes them (a subset's or port's policy does not count)."""
    policy = service.rule.traffic_policy if service.rule is not None else None
    pool = policy.connection_pool if policy is not None else None
    if pool is None:
        return {}
    return {"idle_timeout": pool.tcp_idle_timeout, "max_duration": pool.max_connection_duration}


def _server_names(names) -> tuple:
    """``(exact names, wildcard suffixes)`` of SNI host patterns (``*.example.com`` -> ``.example.com``)."""
    return (frozenset(name for name in names if not name.startswith("*")),
            tuple(sorted({name[1:] for name in names if name.startswith("*")}, key=len, reverse=True)))


def describe_listener(listener) -> dict:
    """An :class:`~mesh.config.tables.L4Listener` for ``/config_dump``."""
    return {"name": listener.name, "tls": listener.tls, "chains": [
        {"destination_subnets": [str(net) for net in chain.subnets],
         "server_names": None if chain.sni is None else sorted(chain.sni[0]) + ["*" + s for s in chain.sni[1]],
         "idle_timeout": chain.idle_timeout, "max_duration": chain.max_duration,
         "action": describe_action(chain.action),
         **({"original_dst": chain.original_dst[1]} if chain.original_dst else {})} for chain in listener.chains]}
