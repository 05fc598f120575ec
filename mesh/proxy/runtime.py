"""The config in force, and the routers that read it per request.

:class:`ProxyRuntime` holds one :class:`Snapshot` (compiled config plus live
clusters).  Applying a new config builds the next snapshot completely and then
swaps it in with one assignment, so a request sees either the old config or
the new one, never a mix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mesh.config.security_tables import NO_ALLOW_MATCHED
from mesh.config.tables import ClusterSpec, EndpointSpec, RouteAction, upstream_protocol
from mesh.plugins import fast_caller
from mesh.proxy.clusters import ClusterManager
from mesh.proxy.outcome import LocalReply


@dataclass(frozen=True)
class Snapshot:
    """A compiled :class:`mesh.config.tables.ProxyConfig` and its live clusters."""

    config: object
    clusters: dict


class ProxyRuntime:
    """Owns the current :class:`Snapshot` and the cluster manager behind it.

    ``local_clusters`` are clusters the proxy always has whatever the config
    says: the inbound cluster of the local app, which speaks the app port's
    protocol (:attr:`mesh.config.tables.ProxyConfig.app_protocol`; unknown:
    the protocol of each request).  ``authenticator`` (a
    :class:`mesh.proxy.authn.Authenticator`, or None) is told of each config,
    to fetch the key sets its RequestAuthentications name.  ``dns`` (a
    :class:`mesh.proxy.dns.DnsEndpoints`, or None) resolves the host-name
    endpoints of DNS clusters and calls :meth:`refresh_endpoints` when they change.
    """

    def __init__(self, pool_factory, local_clusters=(), authenticator=None, dns=None):
        self.manager = ClusterManager(pool_factory)
        self.local_clusters = {spec.name: spec for spec in local_clusters}
        self.authenticator = authenticator
        self.dns = dns
        self.gateway = None  # a gateway proxy's mesh.proxy.gateway.GatewayListeners, told of each config
        self.snapshot = None

    def apply(self, config) -> Snapshot:
        snapshot = self._build(config)
        if self.authenticator is not None:
            self.authenticator.update(config.request_authn)
        if self.gateway is not None:
            self.gateway.update(config)
        return snapshot

    def refresh_endpoints(self) -> None:
        """Rebuild the clusters of the config in force: a DNS name now resolves to other addresses.

        Endpoints that stay keep their state (:class:`ClusterManager`); requests in flight finish.
        """
        if self.snapshot is not None:
            self._build(self.snapshot.config)

    def _build(self, config) -> Snapshot:
        specs = dict(config.clusters)
        protocol = config.app_protocol
        specs.update((name, replace(spec, protocol=protocol, upstream_protocol=upstream_protocol(protocol)))
                     for name, spec in self.local_clusters.items())
        reasons = None
        if self.dns is not None:
            specs = self.dns.expand(specs)
            reasons = self.dns.empty_reasons(specs)
        snapshot = Snapshot(config, self.manager.update(specs, reasons))
        self.snapshot = snapshot
        return snapshot


class OutboundRouter:
    """Routes app -> mesh requests with ``mesh_route`` and the route table.

    ``passthrough`` (a :class:`mesh.proxy.passthrough.PassthroughClusters`)
    takes captured requests that match nothing, by the outbound traffic
    policy; without it they get 404 NR.
    """

    def __init__(self, runtime, hooks, passthrough=None):
        self.runtime = runtime
        self.passthrough = passthrough
        self._route = hooks.mesh_route

    def bind_hooks(self, hooks):
        self._route = fast_caller(hooks.mesh_route)

    def route(self, ctx):
        snapshot = self.runtime.snapshot
        action = self._route(ctx=ctx, table=snapshot.config.routes)
        if action is None:
            dst = ctx.get_extra("original_dst")
            if dst is not None:
                action = self._route_original_dst(ctx, snapshot, dst)
                if action is None and self.passthrough is not None:
                    return self.passthrough.route(ctx, dst, self.outbound_traffic_policy())
        if action is None:
            raise LocalReply(404, "NR", f"no route to host '{ctx.host}': no ServiceEntry or "
                             "VirtualService matches this Host header and request; "
                             "check the Host header and run `meshctl validate` on the config", "route_not_found")
        clusters = action.clusters
        name = clusters[0] if len(clusters) == 1 else action.pick_cluster()  # one cluster: no call
        cluster = snapshot.clusters.get(name)
        if cluster is None:
            if name is None:  # a redirect or direct response: mesh.proxy.route_actions answers it
                return action, None
            raise LocalReply(503, "NC", f"cluster {name} not found: {action.name} routes to a host "
                             "or subset that no ServiceEntry/DestinationRule defines", "cluster_not_found")
        return action, cluster

    # -- transparent capture: the Host matched nothing, try the original destination --
    _dst_index = (None, {})

    def _route_original_dst(self, ctx, snapshot, dst):
        """Route a captured request by the address the app dialled (docs/operations.md,
        "Transparent capture"): first as if its Host were the destination IP (a
        ServiceEntry ``addresses`` entry is a host of the route table), then as a
        request to the service that has that IP:port among its endpoints."""
        ip, port = dst
        table = snapshot.config.routes
        host = ctx.host
        try:
            ctx.host = ip
            action = self._route(ctx=ctx, table=table)
            if action is None:
                service = self._endpoint_services(snapshot.config).get((ip, port))
                if service is not None:
                    ctx.host = service
                    action = self._route(ctx=ctx, table=table)
        finally:
            ctx.host = host
        return action

    def outbound_traffic_policy(self) -> str:
        """The policy for destinations outside the registry: the Sidecar's, else the sidecar's option."""
        return self.runtime.snapshot.config.outbound_traffic_policy or self.passthrough.policy

    def knows(self, dst) -> bool:
        """Whether the registry has the original destination ``(ip, port)``: a ServiceEntry
        address or a service endpoint (REGISTRY_ONLY lets TCP to those through)."""
        config = self.runtime.snapshot.config
        return dst[0] in config.routes.exact or dst in self._endpoint_services(config)

    def _endpoint_services(self, config):
        """``(endpoint ip, port) -> service host``, built once per config, on the first miss."""
        built_for, index = self._dst_index
        if built_for is not config:
            index = {}
            for spec in sorted(config.clusters.values(), key=lambda spec: spec.name):
                if not spec.subset:
                    for endpoint in spec.endpoints:
                        index.setdefault((endpoint.address, endpoint.port), spec.service)
            self._dst_index = (config, index)
        return index


def inbound_cluster(app_address: str, app_port: int) -> ClusterSpec:
    """The cluster of the local app, which the inbound listener forwards to."""
    return ClusterSpec(name=f"inbound|{app_port}||", service="inbound", port=app_port,
                       endpoints=(EndpointSpec(app_address, app_port),))


def rbac_details(policy) -> str:
    """Envoy's response code details of a denial: ``rbac_access_denied_matched_policy[NS/NAME]``.

    ``[none]`` when ALLOW policies apply and none matched.  The caller gets
    only the flag ``RBAC`` and ``RBAC: access denied``, as from Envoy: the
    policy's name is for the access log.
    """
    return f"rbac_access_denied_matched_policy[{'none' if policy == NO_ALLOW_MATCHED else policy}]"


class InboundRouter:
    """Routes mesh -> app requests: authenticate (RequestAuthentication, :mod:`mesh.proxy.authn`),
    authorize, then the local app's cluster."""

    def __init__(self, runtime, hooks, cluster_spec):
        self.runtime = runtime
        self._authorize = hooks.mesh_authorize
        self._cluster_name = cluster_spec.name
        self._action = RouteAction(name="inbound", clusters=(cluster_spec.name,), cumulative_weights=(1,))

    def bind_hooks(self, hooks):
        self._authorize = fast_caller(hooks.mesh_authorize)

    def route(self, ctx):
        snapshot = self.runtime.snapshot
        admit(self.runtime, self._authorize, ctx, snapshot.config)
        return self._action, snapshot.clusters[self._cluster_name]


def admit(runtime, authorize, ctx, config) -> None:
    """Authenticate (RequestAuthentication) and authorize (``authorize``: the bound ``mesh_authorize``) a request
    to this workload under ``config``; raises :class:`LocalReply` (401, 403 ``RBAC``) to refuse it."""
    authn = config.request_authn
    if authn is not None:
        runtime.authenticator.authenticate(ctx, authn)
    for verdict in authorize(ctx=ctx, peer=ctx.peer, policies=config.authz):
        allowed, policy = verdict
        if not allowed:
            ctx.authz_policy = policy
            raise LocalReply(403, "RBAC", "RBAC: access denied", rbac_details(policy))
