"""The sidecar as a Twisted service: listeners, admin, config reloads.

:class:`ProxyService` is what ``twistd mesh-proxy`` runs.  In standalone mode
it loads its resources from ``--config-dir``; SIGHUP reloads them, and an
invalid new config is reported and ignored (the old one stays in force).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from twisted.application import internet, service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mesh import __version__
from mesh.config.compile import Workload, compile_proxy_config, load_and_compile
from mesh.config.errors import ConfigErrors
from mesh.identity.agent import WorkloadAgent
from mesh.identity.spiffe import SpiffeId
from mesh.identity.tls import CredentialStore, WorkloadCredentials
from mesh.plugins import failures as plugin_failures
from mesh.proxy import mirror
from mesh.proxy.admin import AdminSite
from mesh.proxy.authn import Authenticator
from mesh.proxy.codec.http1_server import DownstreamFactory
from mesh.proxy.control_client import ControlClient
from mesh.proxy.dns import DnsEndpoints
from mesh.proxy.gateway import GatewayListeners, GatewaySettings
from mesh.proxy.health import HealthServer
from mesh.proxy.listener import Limits, Listener
from mesh.proxy.mtls import PERMISSIVE, InboundFactory, UpstreamTLS
from mesh.proxy.passthrough import PassthroughClusters, PassthroughSettings, inbound_passthrough, outbound_passthrough
from mesh.proxy.paths import BASE, normalizer
from mesh.proxy.pool import ConnectionPool, PoolSettings
from mesh.proxy.runtime import InboundRouter, OutboundRouter, ProxyRuntime, inbound_cluster
from mesh.proxy.tcp_proxy import InboundProtocols, InboundTcp, OutboundTcp, TcpFactory
from mesh.proxy.tls_origination import OriginationContexts
from mesh.proxy.workers import AdoptedPort, WorkerSettings
from mesh.telemetry import sidecar as telemetry
from mesh.telemetry import tracing

log = Logger()


def _dns_resolver(reactor, server):
    """The resolver of DNS ServiceEntries, made at the first lookup: only then is ``twisted.names`` imported."""
    from mesh.proxy.dns_client import make_resolver

    return make_resolver(reactor, server)


@dataclass
class IdentitySettings:
    """Where the workload certificate comes from.

    Either ``control`` (``(host, port)`` of mesh-control, with ``ca_bundle``
    and ``token_file``) or static ``cert_file``/``key_file`` with
    ``ca_bundle``; neither means plaintext only.
    """

    trust_domain: str = "cluster.local"
    service_account: str = "default"
    control: tuple = None
    control_identity: str = None
    ca_bundle: str = None
    token_file: str = None
    cert_file: str = None
    key_file: str = None
    cert_ttl: float = None


@dataclass
class ProxySettings:
    """Everything ``twistd mesh-proxy`` was told on its command line."""

    config_dir: str  # None: config from the control plane (identity.control)
    workload: Workload
    outbound_address: str = "127.0.0.1"
    outbound_port: int = 15001
    inbound_address: str = "0.0.0.0"
    inbound_port: int = 15006
    app_address: str = "127.0.0.1"
    app_port: int = 0
    admin_port: int = 15000
    health_port: int = 15021  # /healthz/ready on inbound_address, for the kubelet; 0: off
    app_probes: dict = field(default_factory=dict)  # /app-health/... path -> AppProbe (--app-probers)
    state_dir: str = None  # last-known-good snapshot of the control plane's config
    limits: Limits = field(default_factory=Limits)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    telemetry: telemetry.TelemetrySettings = field(default_factory=telemetry.TelemetrySettings)
    tracing: tracing.TracingSettings = field(default_factory=tracing.TracingSettings)
    drain_time: float = 5.0  # seconds in-flight requests get to finish on SIGTERM
    passthrough: PassthroughSettings = field(default_factory=PassthroughSettings)  # captured unknown traffic
    path_normalization: str = BASE  # --path-normalization, Istio's meshConfig.pathNormalization (mesh.proxy.paths)
    outbound_tcp_ports: tuple = ()  # --outbound-tcp-port: explicit TCP listeners (mesh.proxy.tcp_proxy)
    dns_server: tuple = None  # --dns-server (host, port) for DNS ServiceEntries; None: /etc/resolv.conf
    worker: WorkerSettings = None  # one of --workers N: listen on the parent's sockets (mesh.proxy.workers)
    gateway: GatewaySettings = None  # --gateway: serve the ports of the Gateways that select it (mesh.proxy.gateway)



class ProxyService(service.MultiService):
    """One sidecar: outbound and inbound listeners plus the admin port."""

    def __init__(self, settings: ProxySettings, plugin_manager, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.settings = settings
        self.plugins = plugin_manager
        hooks = plugin_manager.hook
        local = (inbound_cluster(settings.app_address, settings.app_port),) if settings.app_port else ()
        self.credentials = CredentialStore()
        self.agent = self._identity_source(settings.identity)
        self.control_client = None
        if settings.identity.control is not None and not settings.config_dir:
            self.control_client = ControlClient(reactor, self, settings.identity.control,
                                                settings.identity.control_identity, settings.state_dir)
        self.upstream_tls = UpstreamTLS(self.credentials)
        self.origination = OriginationContexts()  # TLS to servers outside the mesh (DestinationRule tls SIMPLE)
        self.authenticator = Authenticator(reactor)  # RequestAuthentication's JWTs (inbound)
        self.dns = DnsEndpoints(reactor, lambda: _dns_resolver(reactor, settings.dns_server),
                                lambda: self.runtime.refresh_endpoints())
        self.runtime = ProxyRuntime(self._make_pool, local, self.authenticator, self.dns)
        self._dns_warmed = False  # readiness waited for the first DNS answers (see readiness)
        self.ready = False
        self.warnings = ()
        if settings.gateway is not None:
            self.runtime.gateway = GatewayListeners(self, settings.gateway)
        self.config_applied_at = None
        self.listeners = []
        self.mirror_stats = mirror.STATS  # the process's mirror counters, for telemetry (mesh.telemetry.health)
        passthrough = settings.passthrough
        normalize_path = normalizer(settings.path_normalization)
        router = OutboundRouter(self.runtime, hooks, PassthroughClusters(
            passthrough.outbound_traffic_policy, self._make_pool, passthrough.connect_timeout))
        tcp = OutboundTcp(reactor, self.runtime)
        outbound = Listener(reactor, "outbound", router, settings.limits, hooks, passthrough=outbound_passthrough(
            reactor, passthrough, router, self._source_address(), tcp), normalize_path=normalize_path)
        self._listen(outbound, DownstreamFactory(outbound), settings.outbound_port, settings.outbound_address)
        for port in settings.outbound_tcp_ports:
            explicit = Listener(reactor, "outbound", router, settings.limits, hooks)
            explicit.label = f"outbound-tcp:{port}"
            self._listen(explicit, TcpFactory(explicit, tcp), port, settings.outbound_address)
        if local:
            inbound_tcp = InboundTcp(reactor, self.runtime, hooks, settings.app_address, settings.app_port,
                                     passthrough.connect_timeout)
            inbound = Listener(reactor, "inbound", InboundRouter(self.runtime, hooks, local[0]),
                               settings.limits, hooks, own_identity=self.own_identity,
                               passthrough=inbound_passthrough(reactor, passthrough, settings.app_address,
                                                               inbound_tcp.authorize),
                               normalize_path=normalize_path)
            protocols = InboundProtocols(DownstreamFactory(inbound), TcpFactory(inbound, inbound_tcp), self.runtime)
            factory = InboundFactory(protocols, self.credentials, self.inbound_mode, protocols.carries_tcp)
            self._listen(inbound, factory, settings.inbound_port, settings.inbound_address)
        self.admin_site = AdminSite(self)
        if settings.worker is not None:
            AdoptedPort(reactor, settings.worker.admin_fd, self.admin_site).setServiceParent(self)
        else:
            internet.TCPServer(settings.admin_port, self.admin_site, interface="127.0.0.1").setServiceParent(self)
        if settings.health_port:
            health = HealthServer(reactor, self, settings.health_port, settings.inbound_address,
                                  settings.limits.header_timeout, settings.app_probes, settings.app_address)
            if settings.worker is not None:
                health.adopted_fd = settings.worker.listen_fds.get(settings.health_port)
            health.setServiceParent(self)
        if self.control_client is not None:
            self.control_client.setServiceParent(self)
        # /stats/prometheus; builtin.metrics adds to this registry (mesh.builtin.telemetry)
        self.metrics_registry = telemetry.serve_metrics(self)

    def _identity_source(self, identity):
        """Static certificate files, a workload agent, or nothing (plaintext only)."""
        if identity.cert_file:
            self.credentials.swap(WorkloadCredentials.from_pem(
                _read(identity.key_file), _read(identity.cert_file), _read(identity.ca_bundle)))
            return None
        if identity.control is None:
            return None
        workload = self.settings.workload
        agent = WorkloadAgent(self.reactor, identity.control, _read(identity.ca_bundle), identity.token_file,
                              SpiffeId(identity.trust_domain, workload.namespace, identity.service_account),
                              identity.control_identity, self.credentials, ttl=identity.cert_ttl)
        agent.setServiceParent(self)
        return agent

    def workload_address(self) -> str:
        """This workload's IP: the address upstream connections leave from, else the app's."""
        return self._source_address() or self.settings.app_address

    def own_identity(self):
        current = self.credentials.current
        return current.identity if current is not None else None

    def inbound_mode(self, port_of=None) -> str:
        """PeerAuthentication mode of an inbound connection (PERMISSIVE when unset, as in Istio).

        ``port_of()`` is the connection's original destination port when iptables captured it (None
        otherwise): a captured connection gets the mode of the port it was sent to, a passthrough port
        included (Istio since 1.9), and one sent to the inbound port itself that of the app port.  It is
        called only when the policy has ``portLevelMtls`` (one lookup in a few ports), so the others
        never read the original destination here.
        """
        policy = self.runtime.snapshot.config.peer_authentication
        if policy is None:
            return PERMISSIVE
        port = port_of() if policy.port_modes and port_of is not None else None
        return policy.mode_for_port(self.settings.app_port if port is None else port)

    def _listen(self, listener, factory, port, address):
        self.listeners.append(listener)
        worker = self.settings.worker
        if worker is not None:
            listener.server = AdoptedPort(self.reactor, worker.listen_fds[port], factory)
        else:
            listener.server = internet.TCPServer(port, factory, interface=address, backlog=1024)
        listener.server.setServiceParent(self)

    def _make_pool(self, endpoint_spec, cluster_spec):
        if endpoint_spec.origination is not None:
            tls = self.origination.get(endpoint_spec.origination)
        else:
            tls = self.upstream_tls if endpoint_spec.identity is not None else None
        return ConnectionPool(self.reactor, endpoint_spec.address, endpoint_spec.port, PoolSettings.of(cluster_spec),
                              tls=tls, identity=endpoint_spec.identity, bind=self._source_address())

    def _source_address(self):
        """Upstream connections leave from the workload's own address when it has one."""
        address = self.settings.outbound_address
        return None if address in ("0.0.0.0", "::", "127.0.0.1") else address

    # -- config -------------------------------------------------------------------
    def load(self):
        """Load and apply the config dir; raises ConfigErrors when it is invalid.

        Without a config dir the config comes from the control plane: only the
        last-known-good snapshot (if any) is applied now.
        """
        if self.control_client is not None:
            if not self.control_client.load_last_known_good():
                self.runtime.apply(compile_proxy_config([], self.settings.workload))  # empty until the first push
            return
        config, warnings = load_and_compile(self.settings.config_dir, self.settings.workload)
        self.runtime.apply(config)
        self.config_applied_at = self.reactor.seconds()
        self.warnings = tuple(warnings)
        for warning in warnings:
            log.warn("config warning: {warning}", warning=str(warning))
        log.info("config {version} applied from {dir}", version=config.version, dir=self.settings.config_dir)

    def reload(self):
        """SIGHUP: apply the new config, or keep the old one if it is invalid."""
        if self.control_client is not None:
            log.info("SIGHUP ignored: the config comes from the control plane")
            return
        try:
            self.load()
        except ConfigErrors as errors:
            for error in errors.errors:
                log.error("config rejected, previous config stays in force: {error}", error=str(error))

    # -- service lifecycle ----------------------------------------------------------
    def startService(self):
        super().startService()
        for listener in self.listeners:
            listener.start()
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        self.ready = True

    def stopService(self):
        """SIGTERM: drain, then stop (docs/operations.md, "Draining a sidecar").

        The control plane is told first (DRAIN: it removes this proxy from
        every endpoint list), then the listeners stop accepting: new
        connections are refused.  Idle keep-alive connections are closed;
        each busy one answers its last request with ``connection: close``
        and closes after it (``Connection.drain``).  Whatever is still open
        after ``--drain-time`` is cut.
        The admin port answers until the end (/ready: 503, draining).
        """
        self.ready = False
        self.draining = True
        self.authenticator.stop()
        self.dns.stop()
        client = getattr(self, "control_client", None)
        if client is not None and hasattr(client, "drain"):
            client.drain()
        servers = [listener.server for listener in self.listeners if getattr(listener, "server", None)]
        stopped = defer.gatherResults([defer.maybeDeferred(server.stopService) for server in servers])
        stopped.addCallback(lambda _: self._drain_connections())
        stopped.addErrback(lambda failure: log.failure("draining failed", failure))
        stopped.addCallback(lambda _: self._stop_after_drain())
        return stopped

    def _drain_connections(self):
        """A Deferred that fires when every downstream connection is closed, or at the drain deadline."""
        deadline = self.reactor.seconds() + self.settings.drain_time
        done = defer.Deferred()
        log.info("draining: no new connections; waiting up to {seconds}s for in-flight requests",
                 seconds=self.settings.drain_time)

        def check():
            connections = [conn for listener in self.listeners for conn in list(listener.connections)]
            if not connections:
                loop.stop()
                return
            if self.reactor.seconds() >= deadline:
                log.warn("drain time over: closing {count} connection(s) still busy", count=len(connections))
                for conn in connections:
                    conn.abort()
                loop.stop()
                return
            for conn in connections:
                conn.drain()

        loop = LoopingCall(check)
        loop.clock = self.reactor
        loop.start(0.02, now=True).addCallbacks(done.callback, done.errback)
        return done

    def _stop_after_drain(self):
        log.info("drained; stopping")
        for listener in self.listeners:
            listener.stop()
        stopped = super().stopService()
        stopped.addCallback(lambda _: self.plugins.unconfigure())  # after the child services stopped
        return stopped

    # -- admin views ----------------------------------------------------------------
    def readiness(self):
        """``(status, body)`` of /ready (admin port) and /healthz/ready (health port); a 503 body has a ``reason``."""
        if getattr(self, "draining", False):
            return 503, {"ready": False, "draining": True, "reason": "draining (the proxy is shutting down)"}
        current = self.credentials.current
        if self.agent is not None and current is None:
            return 503, {"ready": False, "waiting_for": "workload certificate",
                         "reason": "waiting for the workload certificate from the control plane",
                         "last_error": self.agent.last_error}
        if current is not None and current.expires_in() <= 0:
            return 503, {"ready": False, "reason": "the workload certificate has expired",
                         "last_error": self.agent.last_error if self.agent is not None else None}
        if not self._dns_warmed:  # as Envoy's first cluster warming: wait for the first DNS answers, once
            warming = self.dns.warming()
            if warming:
                return 503, {"ready": False, "waiting_for": "DNS",
                             "reason": f"resolving {', '.join(warming)} for the first time"}
            client = self.control_client
            self._dns_warmed = self.ready and (client is None or client.applied_version is not None)
        if self.control_client is not None:
            stale = self.control_client.stale
            if self.ready and self.control_client.applied_version is not None:
                return 200, {"ready": True, "version": self.runtime.snapshot.config.version, "stale": stale}
            return 503, {"ready": False, "waiting_for": "config from the control plane", "stale": stale,
                         "reason": "waiting for the first config from the control plane",
                         "last_error": self.control_client.last_error}
        if self.ready and self.runtime.snapshot is not None:
            return 200, {"ready": True, "version": self.runtime.snapshot.config.version}
        return 503, {"ready": False, "reason": "starting (listeners not up yet)"}

    def config_dump(self) -> dict:
        snapshot = self.runtime.snapshot
        settings = self.settings
        return {
            "version": snapshot.config.version if snapshot else None,
            "proxy_version": __version__,
            "workload": {"name": settings.workload.name, "namespace": settings.workload.namespace,
                         "labels": dict(settings.workload.labels)},
            "listeners": {"outbound": f"{settings.outbound_address}:{settings.outbound_port}",
                          "gateway": self.runtime.gateway.describe() if self.runtime.gateway is not None else None,
                          "inbound": f"{settings.inbound_address}:{settings.inbound_port}"
                          if settings.app_port else None,
                          "app": f"{settings.app_address}:{settings.app_port}" if settings.app_port else None},
            "connections": {getattr(listener, "label", listener.direction):
                            listener.overload.describe(len(listener.connections)) for listener in self.listeners},
            "config": snapshot.config.dump if snapshot else None,
            "warnings": [str(warning) for warning in self.warnings],
            "path_normalization": settings.path_normalization,
            "passthrough": {"outbound_traffic_policy": settings.passthrough.outbound_traffic_policy,
                            **{listener.direction: listener.passthrough.describe() for listener in self.listeners
                               if listener.passthrough is not None}},
            "certificate": self.certificate_dump(),
            "plugins": self.plugins.plugin_names(),  # as `meshctl plugins` lists them, idle ones included
            "plugins_idle": {name: reason for name, (_plugin, reason) in self.plugins.idle.items()},
            "plugin_failures": plugin_failures.describe(),  # each distinct failure, counted (mesh.plugins)
            "tracing": self._tracing_dump(),
            "control": self.control_client.describe() if self.control_client is not None else None,
            "jwks": self.authenticator.status(),  # the key sets of RequestAuthentication's jwksUri
        }

    def _tracing_dump(self):
        """``builtin.tracing``'s sampling and exporter, or None when it is disabled or idle."""
        tracer = self.plugins.get_plugin("builtin.tracing")
        return tracer.describe() if tracer is not None else None

    def certificate_dump(self):
        """The workload certificate in use (never the key), or None."""
        current = self.credentials.current
        if current is None:
            return None
        leaf = current.leaf
        return {"identity": current.identity, "serial": format(leaf.serial_number, "x"),
                "not_before": leaf.not_valid_before_utc.isoformat(),
                "not_after": leaf.not_valid_after_utc.isoformat(),
                "expires_in_s": round(current.expires_in(), 1),
                "issuer": leaf.issuer.rfc4514_string(), "trust_bundle_roots": len(current.bundle),
                "source": "control plane" if self.agent is not None else "files",
                "ca_issuer": self.agent.ca_issuer if self.agent is not None else None,
                "renewals": self.agent.renewals if self.agent is not None else 0,
                "last_renewal_error": self.agent.last_error if self.agent is not None else None}

    def clusters_dump(self) -> dict:
        snapshot = self.runtime.snapshot
        now = self.reactor.seconds()
        clusters = snapshot.clusters if snapshot else {}
        return {name: {"lb_policy": cluster.spec.lb_policy,
                       "circuit_breaker": cluster.breaker.describe() if cluster.breaker is not None else None,
                       "retry_budget": cluster.retry_budget.describe(),
                       "endpoints": [endpoint.describe(now) for endpoint in cluster.endpoints],
                       "dns": self.dns.describe(name)}
                for name, cluster in sorted(clusters.items())}


def _read(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()
