"""The sidecar's end of the config stream (``mesh-proxy --control`` without ``--config-dir``).

Once the workload agent has a certificate, :class:`ControlClient` opens a TLS
connection to the control plane's :15012 with it (the control plane must
present its SPIFFE id, checked like the workload agent does), writes the magic
``TXM1`` and HELLO, and then applies every SNAPSHOT it receives:
validate and compile it for this workload (the same code as files), swap it
in with one assignment, persist it as last-known-good and ACK it; a snapshot
that does not validate or compile is NACKed with the errors and the config in
force keeps serving.  A lost stream is reopened with jittered, capped
exponential backoff; meanwhile the proxy serves its last config and reports
itself stale.  See docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import socket

from cryptography import x509
from twisted.application import service
from twisted.internet import protocol
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger

from mesh import __version__
from mesh import protocol as proto
from mesh.backoff import Backoff
from mesh.config.compile import compile_proxy_config
from mesh.config.errors import ConfigErrors
from mesh.config.loader import load_documents
from mesh.config.validate import validate
from mesh.identity.agent import VerifyControlPlane
from mesh.identity.tls import WorkloadCredentials
from mesh.proxy import lkg
from mesh.proxy.gateway_credentials import private_dir, write_credentials

log = Logger()

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
CONNECT_TIMEOUT = 10.0


class SnapshotRejected(Exception):
    """A snapshot that cannot be applied; the message is the NACK reason."""


def compile_snapshot(snapshot: dict, workload, trust_domain: str = "cluster.local"):
    """Validate and compile a SNAPSHOT's resources: ``(ProxyConfig, warnings)``; raises SnapshotRejected.

    ``warnings``: the compiler's, then the texts of the snapshot's optional
    ``warnings`` field (what the control plane knows and the scoped resources
    do not show, such as policies whose selectors all miss this workload).
    """
    origin = f"snapshot {snapshot.get('version')}"
    loaded = load_documents(snapshot.get("resources") or [], origin)
    objects, errors = validate(loaded.resources)
    if loaded.errors or errors:
        problems = ConfigErrors(loaded.errors + errors).errors
        raise SnapshotRejected("; ".join(str(error) for error in problems))
    sent = snapshot.get("warnings")
    sent = [text for text in sent if isinstance(text, str)] if isinstance(sent, list) else []
    try:
        config = compile_proxy_config(objects, workload, trust_domain=trust_domain)
    except ConfigErrors as errors:  # what only this proxy can check (a gateway's certificate files)
        # the control plane's warnings may say why (a gateway's Secrets withheld, and the RBAC to grant)
        raise SnapshotRejected("; ".join([str(error) for error in errors.errors] + sent)) from None
    except Exception as error:  # a compiler bug must not take the proxy down: NACK it
        raise SnapshotRejected(f"compile failed: {type(error).__name__}: {error}") from None
    config = dataclasses.replace(config, version=snapshot["version"])
    return config, list(config.warnings) + sent


class ControlStream(proto.MessageStream):
    """The proxy's end of one config stream."""

    receives = (proto.SNAPSHOT, proto.PING, proto.PONG, proto.ERROR)
    peer_name = "control plane"

    def __init__(self, client):
        super().__init__(client.reactor)
        self.heartbeat = client.heartbeat
        self.client = client

    def connectionMade(self):
        super().connectionMade()
        self.transport.write(proto.MAGIC)
        self.send(proto.HELLO, **self.client.hello_fields(self.transport))
        self.client.stream_opened(self)

    def connectionLost(self, reason=protocol.connectionDone):
        super().connectionLost(reason)
        self.client.stream_closed(self, self.closed_reason or reason.getErrorMessage())

    def msg_SNAPSHOT(self, msg):
        error = self.client.apply(msg)
        if error is None:
            self.send(proto.ACK, version=msg["version"])
        else:
            self.send(proto.NACK, version=msg["version"], reason=proto.truncate(error))  # in full in our log

    def drain(self):
        self.send(proto.DRAIN)


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, client):
        self.client = client

    def buildProtocol(self, addr):
        return ControlStream(self.client)


class ControlClient(service.Service):
    """Keeps the config stream to the control plane open and applies what it receives.

    :param proxy: the :class:`mesh.proxy.service.ProxyService` (its settings,
        runtime and credentials).
    """

    def __init__(self, reactor, proxy, control, control_identity, state_dir=None, heartbeat=proto.HEARTBEAT,
                 node=None):
        self.reactor = reactor
        self.proxy = proxy
        self.control = control
        self.control_identity = control_identity
        self.state_dir = state_dir
        self.heartbeat = heartbeat
        settings = proxy.settings
        self.node = node or (f"{settings.workload.name}.{settings.workload.namespace}~{socket.gethostname()}"
                             f"~{settings.admin_port}" + (f"~w{settings.worker.id}" if settings.worker else ""))
        self.stream = None
        self.connected = False
        self.synced = False  # a snapshot of the current stream was applied
        self.applied_version = None
        self.last_error = None
        self.last_nack = None
        self.connects = 0
        self.snapshots_applied = 0
        self._backoff = Backoff(BACKOFF_MIN, BACKOFF_MAX, jitter=(0.5, 1.5))
        self._timer = None
        self._connecting = None
        #: where the Secrets a gateway gets are written: its credentials dir when that is the private one
        workload = settings.workload
        self.credentials_dir = (workload.credentials_dir if workload.gateway and state_dir
                                and workload.credentials_dir == private_dir(state_dir) else None)

    # -- lifecycle -----------------------------------------------------------------------
    def startService(self):
        super().startService()
        if self.proxy.credentials.current is not None:
            self._connect()
        else:
            self.proxy.credentials.listeners.append(self._first_certificate)

    def _first_certificate(self, credentials):
        if self._first_certificate in self.proxy.credentials.listeners:
            self.proxy.credentials.listeners.remove(self._first_certificate)
        if self.running and self.stream is None and self._connecting is None:
            self._connect()

    def stopService(self):
        """Tell the control plane we are going (DRAIN: removed from endpoints now), then close."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._connecting is not None:
            self._connecting.cancel()
        if self.stream is not None:
            self.stream.drain()
            self.stream.transport.loseConnection()

    def drain(self):
        """Ask the control plane to remove this proxy from every endpoint list now."""
        if self.stream is not None:
            self.stream.drain()

    # -- connection ------------------------------------------------------------------------
    def _connect(self):
        self._timer = None
        current = self.proxy.credentials.current
        if current is None or not self.running:
            return
        host, port = self.control
        creator = VerifyControlPlane(list(current.bundle), self.control_identity, host, client_credentials=current)
        endpoint = wrapClientTLS(creator, HostnameEndpoint(self.reactor, host, port, timeout=CONNECT_TIMEOUT))
        self._connecting = endpoint.connect(_Factory(self))
        self._connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, stream):
        self._connecting = None

    def _connect_failed(self, failure):
        self._connecting = None
        if self.running:
            self._retry(f"cannot connect to the control plane at {self.control[0]}:{self.control[1]}: "
                        f"{failure.getErrorMessage()}")

    def _retry(self, why):
        self.last_error = why
        delay = self._backoff.next()
        log.warn("config stream: {why}; reconnecting in {delay:.1f}s, serving the last config meanwhile",
                 why=why, delay=delay)
        self._timer = self.reactor.callLater(delay, self._connect)

    def stream_opened(self, stream):
        self.stream = stream
        self.connected = True
        self.connects += 1

    def stream_closed(self, stream, why):
        if self.stream is stream:
            self.stream = None
        self.connected = False
        self.synced = False
        if self.running:
            self._retry(f"stream closed ({why})")

    def hello_fields(self, transport) -> dict:
        settings = self.proxy.settings
        workload = settings.workload
        address = settings.inbound_address
        if address in ("0.0.0.0", "::", ""):
            address = transport.getHost().host  # the address this host reaches the control plane from
        return {"node": self.node, "workload": workload.name, "namespace": workload.namespace,
                "service_account": settings.identity.service_account, "labels": dict(workload.labels),
                "address": address, "inbound_port": settings.inbound_port if settings.app_port else None,
                "gateway": workload.gateway,  # a gateway gets its Gateways' credentialName Secrets
                "app_port": settings.app_port or None, "version": self.applied_version or "",
                # informational, for meshctl (version, proxy-config/tap/stat by name)
                "proxy_version": __version__, "admin_port": settings.admin_port,
                "metrics_port": settings.telemetry.metrics_port or None}

    # -- snapshots -------------------------------------------------------------------------
    def apply(self, snapshot: dict, persist: bool = True):
        """Apply a snapshot; returns None, or the reason it was rejected (the old config stays)."""
        try:
            if snapshot.get("version") != self.applied_version or self.proxy.runtime.snapshot is None:
                self._apply(snapshot)
        except SnapshotRejected as error:
            self.last_nack = {"version": snapshot.get("version"), "reason": str(error)}
            log.error("config snapshot {version} rejected, previous config stays in force: {reason}",
                      version=snapshot.get("version"), reason=str(error))
            return str(error)
        self._backoff.reset()  # a working stream resets the backoff
        self.synced = True
        self.last_error = None
        if persist and self.state_dir:
            try:
                lkg.save(self.state_dir, snapshot)
            except OSError as error:
                log.warn("cannot persist the last-known-good snapshot in {dir}: {error}", dir=self.state_dir,
                         error=str(error))
        return None

    def _apply(self, snapshot):
        proxy = self.proxy
        if self.credentials_dir is not None:
            self._write_credentials(snapshot)
        config, warnings = compile_snapshot(snapshot, proxy.settings.workload, proxy.settings.identity.trust_domain)
        credentials = self._with_bundle(snapshot.get("trust_bundle"))
        if credentials is not None:
            proxy.credentials.swap(credentials)
        proxy.runtime.apply(config)
        proxy.config_applied_at = proxy.reactor.seconds()
        proxy.warnings = tuple(warnings)
        self.applied_version = snapshot["version"]
        self.snapshots_applied += 1
        for warning in warnings:
            log.warn("config warning: {warning}", warning=str(warning))
        log.info("config {version} applied from the control plane ({count} resources)",
                 version=snapshot["version"], count=len(snapshot.get("resources") or ()))

    def _write_credentials(self, snapshot) -> None:
        """Write the snapshot's Secrets to the private credentials dir, where compiling reads them."""
        try:
            write_credentials(self.credentials_dir, proto.credentials_of(snapshot))
        except ValueError as error:
            raise SnapshotRejected(str(error)) from None
        except OSError as error:
            raise SnapshotRejected(f"cannot write the gateway's Secrets in {self.credentials_dir}: {error}; "
                                   "give the proxy a writable --state-dir") from None

    def _with_bundle(self, bundle_pem):
        """New credentials when the distributed trust bundle differs from the one in use, else None."""
        current = self.proxy.credentials.current
        if not bundle_pem or current is None:
            return None
        try:
            bundle = tuple(x509.load_pem_x509_certificates(bundle_pem.encode()))
        except ValueError as error:
            raise SnapshotRejected(f"trust_bundle: not PEM certificates: {error}") from None
        if set(bundle) == set(current.bundle):
            return None
        try:
            return WorkloadCredentials.build(current.key, current.chain, bundle)
        except Exception as error:
            raise SnapshotRejected(f"trust_bundle: cannot build TLS contexts with it: {error}") from None

    def load_last_known_good(self) -> bool:
        """At start: apply the persisted snapshot if there is one (True if applied)."""
        if not self.state_dir:
            return False
        try:
            snapshot = lkg.load(self.state_dir)
        except ValueError as error:
            log.error("{error}", error=str(error))
            return False
        if snapshot is None:
            return False
        try:
            config, warnings = compile_snapshot(snapshot, self.proxy.settings.workload,
                                                self.proxy.settings.identity.trust_domain)
        except SnapshotRejected as error:
            log.error("the last-known-good snapshot in {dir} cannot be used: {error}", dir=self.state_dir,
                      error=str(error))
            return False
        self.proxy.runtime.apply(config)
        self.proxy.config_applied_at = self.proxy.reactor.seconds()
        self.proxy.warnings = tuple(warnings)
        self.applied_version = snapshot["version"]
        log.info("last-known-good config {version} applied from {path} (stale until the control plane answers)",
                 version=snapshot["version"], path=lkg.path_in(self.state_dir))
        return True

    def describe(self) -> dict:
        return {"address": f"{self.control[0]}:{self.control[1]}", "node": self.node, "connected": self.connected,
                "stale": self.stale, "applied_version": self.applied_version, "last_error": self.last_error,
                "last_nack": self.last_nack, "connects": self.connects,
                "snapshots_applied": self.snapshots_applied}

    @property
    def stale(self) -> bool:
        return not (self.connected and self.synced)
