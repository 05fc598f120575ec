"""Config distribution: per-proxy snapshots, debounced pushes, ACK/NACK and sync status.

:class:`Distributor` holds the config resources in force (set with
:meth:`Distributor.set_resources`, validated here so that an invalid resource
never reaches a proxy) and the :class:`~mesh.control.registry.Registry`.
Each connected proxy (:class:`ProxyStream`) gets a snapshot scoped to it:

- ServiceEntry, DestinationRule and VirtualService exported to its namespace,
  narrowed to what the ``Sidecar`` that applies to it imports (and that
  Sidecar; see :meth:`mesh.config.sidecar.EgressScope.needed`);
- the WorkloadEntries (files and registry) of namespaces whose visible
  ServiceEntries select workloads;
- the AuthorizationPolicies, PeerAuthentications and RequestAuthentications that apply to it (its
  namespace or the root namespace, selector matching its labels);
- the trust bundle;
- for a gateway proxy (HELLO ``gateway``), the TLS material of the Kubernetes Secrets its Gateways
  name in ``credentialName``, of its own namespace only (:meth:`Distributor.set_credentials`,
  fed by :mod:`mesh.control.kube.secrets`), and only once its service account may read Secrets
  there (:attr:`Distributor.secret_access`, a SubjectAccessReview: :mod:`mesh.control.kube.secretaccess`);
- warnings for the proxy's log about what those scoped resources cannot show
  it: that its namespace's policies use selectors and none selects it
  (:func:`mesh.config.selection.unselected_warning`).

The version of a snapshot is a hash of exactly that content, so a change that
does not affect a proxy leaves its version alone and it gets no push.

The work is incremental (docs/performance.md, control plane):

- changes are debounced and coalesced: a push round runs ``debounce``
  seconds (100 ms by default) after the last change, but never later than
  ``max_delay`` seconds (1 s by default) after the first change it holds, so
  a steady stream of changes (proxies connecting one after another) still
  pushes once per ``max_delay``;
- proxies with the same :func:`view_key` share one
  :class:`~mesh.control.snapshots.View`, built once and kept until the
  resources or the registry entries it includes change; the SNAPSHOT frame is
  encoded once and the same bytes are written to each of them;
- registry changes are taken in at push rounds: a proxy that connects between
  two rounds gets its view as the last round built it (or, if nobody had
  that view yet, as of now), and the next round brings it and everyone else
  the endpoints that came since, its own included.  So a storm of connecting
  endpoint proxies costs one view per round, not one per proxy;
- the registry's WorkloadEntry documents are made once per entry, and a
  namespace's list is rebuilt only when one of its entries changed;
- a proxy gets a push only when its snapshot's version changed;
- per-stream flow control (as istiod's): no new SNAPSHOT goes to a stream
  before it answered (ACK or NACK) the last one sent; a push held back that
  way is sent on the answer, once, as the newest snapshot of the stream's view
  (none if that is the version it has).  A stream that does not answer within
  ``ack_timeout`` seconds is not waited for any longer: it gets the newest
  snapshot then, so a stuck proxy holds back nothing but its own pushes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass

from twisted.internet import protocol
from twisted.logger import Logger

from mesh import protocol as proto
from mesh.config.compile import Workload, is_exported
from mesh.config.gateway import Gateway
from mesh.config.loader import Resource, load_documents, resource_document
from mesh.config.resources import DestinationRule, ServiceEntry, VirtualService, WorkloadEntry
from mesh.config.security_compile import DEFAULT_ROOT_NAMESPACE, applicable
from mesh.config.selection import POLICY_KINDS, describe_selection, selects, unselected_warning
from mesh.config.sidecar import sidecar_scope
from mesh.config.validate import validate
from mesh.control.kube.secretaccess import denied_reason
from mesh.control.registry import Registration, Registry
from mesh.control.snapshots import View, digest
from mesh.identity.spiffe import InvalidSpiffeId, SpiffeId
from mesh.identity.tls import peer_identity

log = Logger()

_EXPORTED_KINDS = (ServiceEntry, DestinationRule, VirtualService)
#: streams served per reactor turn in a push round (their frames are sent before the next slice's)
PUSH_SLICE = 100
#: seconds a push waits at most for the stream's answer to the previous SNAPSHOT (one heartbeat period)
ACK_TIMEOUT = 10.0
#: a node id or version in HELLO: printable ASCII without spaces (they are logged), at most 253 characters
_TOKEN = re.compile(r"[!-~]{1,253}")
_WILDCARDS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class _Item:
    """One validated resource: its object (for scoping), document and content hash."""

    obj: object
    document: dict
    digest: str


def _digest(document) -> str:
    return digest(json.dumps(document, sort_keys=True, separators=(",", ":"), default=str))


_ACCESS = 2  # where a view's token holds the gateway's secret_access verdict (see Distributor._view)


def view_key(workload: Workload) -> tuple:
    """Everything of ``workload`` that the documents of its snapshot depend on: namespace, labels,
    whether it is a gateway (only a gateway gets credentials) and a gateway's service account (whether
    it may read its namespace's Secrets is asked per service account).

    Proxies with equal keys share one :class:`~mesh.control.snapshots.View`
    (documents computed and encoded once).  A new input of the scoping in
    :meth:`Distributor.scope` (a resource selecting workloads by something
    else than namespace and labels) must be added here.
    """
    return (workload.namespace, tuple(sorted(workload.labels.items())), workload.gateway,
            workload.service_account if workload.gateway else None)


@dataclass(frozen=True)
class _Scope:
    """The config part of a view: the chosen items, the namespaces whose registry entries it includes,
    whether its namespace's policies use selectors none of which selects it (a warning, per workload),
    and the names of the Secrets of its namespace a gateway proxy gets (its Gateways' credentialName)."""

    items: tuple
    selecting: tuple
    warned: bool
    credentials: tuple = ()


def _credential_names(items) -> tuple:
    """The Secrets the Gateways among ``items`` name in ``credentialName``, each with its ``NAME-cacert``
    (Istio's Secret of client CAs), sorted; a gateway gets those of its own namespace only."""
    names = {server.tls.credential for item in items if isinstance(item.obj, Gateway)
             for server in item.obj.servers if server.tls is not None and server.tls.credential}
    return tuple(sorted(names | {f"{name}-cacert" for name in names}))


def _validated(resources) -> tuple:
    """``(objects, errors)`` from Resource objects, validated objects (with ``.source``) or dicts."""
    raw, problems = [], []
    dicts = [item for item in resources if isinstance(item, dict)]
    if dicts:
        loaded = load_documents(dicts, "set_resources")
        raw += loaded.resources
        problems += loaded.errors
    raw += [item if isinstance(item, Resource) else item.source for item in resources if not isinstance(item, dict)]
    objects, errors = validate(raw)
    return objects, problems + errors


class ProxyStatus:
    """What the control plane knows about one proxy's sync state (a row of ``meshctl proxy-status``)."""

    def __init__(self, node, identity, address, now):
        self.node = node
        self.identity = identity
        self.workload = None
        self.namespace = None
        self.labels = {}
        self.address = address
        self.connected = True
        self.connected_since = now
        self.version_sent = None
        self.sent_at = None
        self.version_acked = None
        self.last_nack = None
        self.last_nack_version = None
        self.last_seen = now

    def describe(self) -> dict:
        return {"node": self.node, "workload": self.workload, "namespace": self.namespace,
                "labels": dict(self.labels), "identity": self.identity, "address": self.address,
                "connected": self.connected,
                "connected_since": self.connected_since, "version_sent": self.version_sent,
                "version_acked": self.version_acked, "last_nack": self.last_nack,
                "last_nack_version": self.last_nack_version, "last_seen": self.last_seen,
                "stale": (not self.connected) or self.version_sent is None
                or self.version_acked != self.version_sent}


class ProxyStream(proto.MessageStream):
    """The control plane's end of one proxy's config stream."""

    receives = (proto.HELLO, proto.ACK, proto.NACK, proto.PING, proto.PONG, proto.DRAIN, proto.ERROR)
    peer_name = "proxy"

    def __init__(self, distributor):
        super().__init__(distributor.reactor, distributor.pending_bytes)
        self.heartbeat = distributor.heartbeat
        self.distributor = distributor
        self.identity = None
        self.hello = None
        self.workload = None
        self.status = None
        self.registration = None
        self._sent = None  # version of the last snapshot sent
        self.awaiting = None  # version of the last snapshot sent that the proxy has not answered yet
        self.awaiting_since = None  # when that snapshot was sent (reactor seconds)

    def describe_peer(self):
        node = self.hello["node"] if self.hello else "?"
        address = self.transport.getPeer().host if self.transport is not None else "?"
        return f"proxy {node} ({self.identity or 'no identity'}, from {address})"

    def connectionMade(self):
        super().connectionMade()
        uri = peer_identity(self.transport)
        if uri is None:
            self.refuse("no verified client certificate: the config stream needs the workload certificate")
            return
        try:
            identity = SpiffeId.parse(uri)
        except InvalidSpiffeId as error:
            self.refuse(str(error))
            return
        if identity.trust_domain != self.distributor.trust_domain:
            self.refuse(f"certificate {uri} is of trust domain {identity.trust_domain!r}; this control plane "
                        f"serves {self.distributor.trust_domain!r}: use a certificate it issued")
            return
        self.identity = identity

    def connectionLost(self, reason=protocol.connectionDone):
        super().connectionLost(reason)
        self.distributor.stream_closed(self)

    def msg_HELLO(self, msg):
        """Check what HELLO claims against the certificate and the node's owner, then register the proxy."""
        if self.hello is not None:
            raise proto.ProtocolError("HELLO sent twice")
        self._check_claims(msg)
        self.distributor.check_owner(msg["node"], self.identity)
        labels = dict(msg["labels"])
        address = msg.get("address")
        if not isinstance(address, str) or address in _WILDCARDS:
            address = self.transport.getPeer().host
        inbound_port = msg.get("inbound_port")
        if msg.get("app_port") and isinstance(inbound_port, int) and 0 < inbound_port < 65536:
            registration = Registration(
                node=msg["node"], workload=msg["workload"], namespace=self.identity.namespace,
                service_account=self.identity.service_account, address=address, inbound_port=inbound_port,
                labels=labels)
            _, errors = _validated([registration.document()])
            if errors:
                raise proto.ProtocolError("HELLO announces a workload that clients could not use ("
                                          + "; ".join(f"{error.field}: {error.reason}" for error in errors)
                                          + "): fix the proxy's --label or --inbound-address")
            self.registration = registration
        self.hello = msg
        self.workload = Workload(name=msg["workload"], namespace=self.identity.namespace, labels=labels,
                                 service_account=self.identity.service_account,
                                 app_port=msg.get("app_port") or None, gateway=msg.get("gateway") is True)
        self.distributor.hello(self, address)

    def _check_claims(self, msg) -> None:
        """HELLO's namespace and service account must be the certificate's; node, version, address sane."""
        if msg["namespace"] != self.identity.namespace:
            raise proto.ProtocolError(f"HELLO names namespace {msg['namespace']!r} but the certificate is "
                                      f"{self.identity.uri}")
        account = msg.get("service_account")
        if account is not None and account != self.identity.service_account:
            raise proto.ProtocolError(f"HELLO names service account {account!r} but the certificate is "
                                      f"{self.identity.uri}: start the proxy with that certificate's "
                                      "--service-account")
        if not _TOKEN.fullmatch(msg["node"]):
            raise proto.ProtocolError("HELLO node must be 1 to 253 printable ASCII characters without spaces")
        version = msg.get("version")
        if version not in (None, "") and not (isinstance(version, str) and _TOKEN.fullmatch(version)):
            raise proto.ProtocolError("HELLO version must be a snapshot version or \"\"")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in msg["labels"].items()):
            raise proto.ProtocolError("HELLO labels must map strings to strings")
        address = msg.get("address")
        if isinstance(address, str) and address not in _WILDCARDS:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise proto.ProtocolError(f"HELLO address {address[:64]!r} is not an IP address: set the "
                                          "proxy's --inbound-address to an address of its host") from None

    def msg_ACK(self, msg):
        self._require_hello()
        self.distributor.acked(self, msg["version"])

    def msg_NACK(self, msg):
        self._require_hello()
        self.distributor.nacked(self, msg["version"], msg["reason"])

    def msg_DRAIN(self, msg):
        self._require_hello()
        self.distributor.drained(self)

    def stringReceived(self, body):
        super().stringReceived(body)
        if self.status is not None:
            self.status.last_seen = self.last_seen

    def _require_hello(self):
        if self.hello is None:
            raise proto.ProtocolError("the first message must be HELLO")

    def push(self, snapshot) -> bool:
        """Send a :class:`~mesh.control.snapshots.Snapshot` (its shared frame) and await its answer;
        False (logged) if it exceeds the SNAPSHOT frame limit."""
        self._sent = snapshot.version
        try:
            frame = snapshot.frame()
        except proto.ProtocolError as error:
            log.error("snapshot {version} for proxy {node} not sent: {error}; export fewer resources to its "
                      "namespace (exportTo) or split the config", version=snapshot.version,
                      node=self.hello["node"], error=str(error))
            return False
        if self.transport is not None and self.closed_reason is None:
            self.transport.write(frame)
            self.awaiting, self.awaiting_since = snapshot.version, self.reactor.seconds()
        return True


class StreamFactory(protocol.Factory):
    noisy = False

    def __init__(self, distributor):
        self.distributor = distributor

    def buildProtocol(self, addr):
        stream = ProxyStream(self.distributor)
        stream.factory = self
        return stream


class Distributor:
    """Resources + registry -> per-proxy snapshots; sync status; metrics.

    :param bundle_pem: ``() -> bytes``, the trust bundle to distribute.
    :param metrics: an object with ``connected_proxies``, ``pushes``,
        ``push_duration`` and ``nacks`` (prometheus instruments), or None.
    :param debounce: seconds without a change before a push round.
    :param max_delay: seconds after the first change of a round at most before it runs.
    :param ack_timeout: seconds a stream's next push waits at most for its answer to the last SNAPSHOT.
    """

    def __init__(self, reactor, bundle_pem, metrics=None, debounce: float = 0.1, grace: float = 5.0,
                 heartbeat: float = proto.HEARTBEAT, root_namespace: str = DEFAULT_ROOT_NAMESPACE,
                 status_ttl: float = 300.0, state_dir=None, trust_domain: str = "cluster.local",
                 max_pending_bytes: int = proto.MAX_PENDING_TOTAL, max_delay: float = 1.0,
                 ack_timeout: float = ACK_TIMEOUT):
        self.reactor = reactor
        self.trust_domain = trust_domain  # the only one whose certificates may open a stream
        self.pending_bytes = proto.PendingBudget(max_pending_bytes)  # unfinished frames of all streams
        self.bundle_pem = bundle_pem
        self.metrics = metrics
        self.debounce = debounce
        self.max_delay = max_delay
        self.ack_timeout = ack_timeout
        self.heartbeat = heartbeat
        self.root_namespace = root_namespace
        self.status_ttl = status_ttl
        registry_path = os.path.join(state_dir, "registry.json") if state_dir else None
        self.registry = Registry(reactor, self.changed, grace, registry_path)
        self.items = []
        self.rejected = []
        self.streams = set()
        self.nodes = {}  # node -> the stream whose HELLO was accepted for it
        self.statuses = {}  # node -> ProxyStatus (disconnected ones kept for status_ttl)
        self._pending = None
        self._changed_at = None
        self._generation = 0  # bumped by set_resources: the scopes and endpoint documents are rebuilt
        self._scopes = {}  # view key -> (generation, _Scope)
        self._views = {}  # view key -> View
        self._endpoints = {}  # namespace -> ((generation, registry generation), [(node, document, digest)])
        self._entry_documents = {}  # node -> (registration, generation, (node, document, digest))
        self._bundle = (None, None)  # (trust bundle PEM, its digest)
        self.credentials = {}  # (namespace, Secret name) -> {file name: PEM}: see set_credentials
        self._credentials_generation = 0  # bumped when they change: the views of gateways are rebuilt
        #: ``(namespace, service account) -> True / False / None`` (unknown): may a gateway of that service
        #: account get its namespace's Secrets (mesh.control.kube.secretaccess); by default none may
        self.secret_access = lambda namespace, service_account: False
        self._registry_seen = {}  # the registry's generations as of the last push round
        self._held = {}  # stream -> (changed_at, DelayedCall of ack_timeout): its push awaits its answer
        self.pushes = 0
        self.factory = StreamFactory(self)

    # -- config ----------------------------------------------------------------------------
    def set_resources(self, resources) -> list:
        """Replace the config resources; returns the errors of those that are invalid (left out).

        ``resources``: :class:`~mesh.config.loader.Resource` objects, validated
        objects (with ``.source``) or plain documents.  Pushes follow after the
        debounce delay, to the proxies whose snapshot changed.
        """
        objects, errors = _validated(resources)
        for error in errors:
            log.error("resource not distributed: {error}", error=str(error))
        items = []
        for obj in objects:
            document = resource_document(obj.source)
            items.append(_Item(obj, document, _digest(document)))
        self.items = sorted(items, key=lambda item: (item.document["kind"], item.document["metadata"]["namespace"],
                                                     item.document["metadata"]["name"]))
        self.rejected = errors
        self._generation += 1
        self.changed()
        return errors

    def set_credentials(self, secrets: dict) -> None:
        """Replace the Secrets gateways may get: ``{(namespace, name): {file name: PEM}}`` (``tls.crt``,
        ``tls.key``, ``ca.crt``).  The gateway proxies whose Gateways name a changed one get a push."""
        if secrets == self.credentials:
            return
        self.credentials = secrets
        self._credentials_generation += 1
        self.changed()

    def changed(self) -> None:
        """Something changed: push ``debounce`` seconds after the last change, at most ``max_delay``
        seconds after the first one not pushed yet."""
        now = self.reactor.seconds()
        if self._changed_at is None:
            self._changed_at = now
        delay = max(0.0, min(now + self.debounce, self._changed_at + self.max_delay) - now)
        if self._pending is not None and self._pending.active():
            self._pending.reset(delay)
        else:
            self._pending = self.reactor.callLater(delay, self.push_all)

    def push_all(self) -> None:
        """One push round: every proxy whose snapshot changed gets it; unused views are dropped.

        The streams are served :data:`PUSH_SLICE` at a time, one slice per reactor turn, so that the
        reactor sends each slice's bytes before the next is encoded: the frames of a round do not all
        wait in memory at once.
        """
        self._pending = None
        self._registry_seen = self.registry.generations()
        changed_at, self._changed_at = self._changed_at, None
        streams = [stream for stream in self.streams if stream.hello is not None]
        self._push_slice(streams, 0, changed_at, set(), self.pushes)

    def _push_slice(self, streams, start, changed_at, keys, before) -> None:
        """Push to ``streams[start:start + PUSH_SLICE]`` (those still open), then schedule the rest."""
        for stream in streams[start:start + PUSH_SLICE]:
            if stream in self.streams:
                keys.add(self._push(stream, changed_at))
        if start + PUSH_SLICE < len(streams):
            self.reactor.callLater(0, self._push_slice, streams, start + PUSH_SLICE, changed_at, keys, before)
            return
        log.debug("push round: {pushed} of {count} proxies got a new snapshot ({views} distinct views)",
                  pushed=self.pushes - before, count=len(streams), views=len(keys))
        self._views = {key: view for key, view in self._views.items() if key in keys}
        self._scopes = {key: scope for key, scope in self._scopes.items() if key in keys}
        self._prune_statuses()
        self.registry.save()

    # -- snapshots -------------------------------------------------------------------------
    def scope(self, workload: Workload) -> _Scope:
        """The config resources ``workload``'s snapshot includes; it reads only what :func:`view_key` holds.

        ServiceEntry, DestinationRule and VirtualService exported to its namespace (narrowed by its
        Sidecar), the WorkloadEntries of namespaces whose visible ServiceEntries select workloads,
        the policies that apply to it, and the Gateways whose selector matches its labels (a gateway
        proxy serves them; see :mod:`mesh.proxy.gateway`).
        """
        namespace = workload.namespace
        objects = [item.obj for item in self.items]
        chosen = [item for item in self.items if isinstance(item.obj, _EXPORTED_KINDS)
                  and is_exported(item.obj.export_to, item.obj.namespace, namespace)]
        scope = sidecar_scope(objects, workload, self.root_namespace)
        if scope is not None:
            needed = {id(obj) for obj in scope.needed([item.obj for item in chosen], namespace)}
            chosen = [item for item in chosen if id(item.obj) in needed]
            chosen += [item for item in self.items if item.obj is scope.sidecar]
        selecting = {item.obj.namespace for item in chosen
                     if isinstance(item.obj, ServiceEntry) and item.obj.workload_selector is not None}
        chosen += [item for item in self.items if isinstance(item.obj, WorkloadEntry)
                   and item.obj.namespace in selecting]
        wanted = {id(obj) for obj in applicable(objects, POLICY_KINDS, workload, self.root_namespace)}
        chosen += [item for item in self.items if id(item.obj) in wanted
                   or (isinstance(item.obj, Gateway) and selects(item.obj.selector, workload.labels))]
        return _Scope(tuple(chosen), tuple(sorted(selecting)), unselected_warning(objects, workload) is not None,
                      _credential_names(chosen) if workload.gateway else ())

    def _scope_of(self, key, workload) -> _Scope:
        """The cached :meth:`scope` of ``key``, rebuilt after the resources changed."""
        cached = self._scopes.get(key)
        if cached is None or cached[0] != self._generation:
            cached = self._scopes[key] = (self._generation, self.scope(workload))
        return cached[1]

    def _view(self, workload: Workload) -> tuple:
        """``(key, view, scope)`` for ``workload``: the cached view of its key while the resources, the
        registry entries it includes, as of the last push round, and a gateway's Secrets and access verdict
        are the same."""
        key = view_key(workload)
        scope = self._scope_of(key, workload)
        seen = self._registry_seen
        access = self.secret_access(workload.namespace, workload.service_account) if scope.credentials else None
        token = (self._generation, self._credentials_generation if scope.credentials else 0, access,
                 *(seen.get(namespace, 0) for namespace in scope.selecting))
        view = self._views.get(key)
        if view is None or view.token != token:
            endpoints = [entry for namespace in scope.selecting for entry in self._endpoints_of(namespace)]
            if len(scope.selecting) > 1:
                endpoints.sort(key=lambda entry: entry[0])
            credentials = {name: self.credentials[workload.namespace, name] for name in scope.credentials
                           if access and (workload.namespace, name) in self.credentials}
            view = self._views[key] = View(token, [item.document for item in scope.items]
                                           + [document for _, document, _ in endpoints],
                                           [item.digest for item in scope.items]
                                           + [entry_digest for _, _, entry_digest in endpoints]
                                           + ([_digest(credentials)] if credentials else []), credentials)
        return key, view, scope

    def _endpoints_of(self, namespace: str) -> list:
        """``(node, document, digest)`` of the registry entries of ``namespace``, by node (cached)."""
        token = (self._generation, self.registry.generation(namespace))
        cached = self._endpoints.get(namespace)
        if cached is None or cached[0] != token:
            cached = self._endpoints[namespace] = (token, [self._entry_document(registration) for registration
                                                           in self.registry.in_namespace(namespace)])
        return cached[1]

    def _entry_document(self, registration: Registration) -> tuple:
        """``(node, document, digest)``: the WorkloadEntry of one registry entry, made once per entry."""
        cached = self._entry_documents.get(registration.node)
        if cached is not None and cached[0] is registration and cached[1] == self._generation:
            return cached[2]
        labels = set({**registration.labels, "security.istio.io/tlsMode": "istio"}.items())
        port_names = {port.name for item in self.items if isinstance(item.obj, ServiceEntry)
                      and item.obj.namespace == registration.namespace and item.obj.workload_selector is not None
                      and set(item.obj.workload_selector) <= labels for port in item.obj.ports}
        document = registration.document(port_names)
        entry = (registration.node, document, _digest(document))
        self._entry_documents[registration.node] = (registration, self._generation, entry)
        return entry

    def _bundle_of(self) -> tuple:
        """``(PEM, digest)`` of the current trust bundle (hashed once per bundle)."""
        pem = self.bundle_pem()
        if pem != self._bundle[0]:
            self._bundle = (pem, digest(pem))
        return self._bundle

    def snapshot(self, workload: Workload) -> tuple:
        """``(view key, Snapshot)`` for ``workload``: shared with every proxy of the same view and warnings."""
        key, view, scope = self._view(workload)
        warnings = ()
        if scope.warned:  # the text names the workload
            warnings = (str(unselected_warning([item.obj for item in self.items], workload)),)
        access = view.token[_ACCESS]
        if scope.credentials and access is not True:  # its Secrets withheld: say why and what to grant
            warnings += (denied_reason(workload.namespace, workload.service_account, access),)
        return key, view.snapshot(warnings, *self._bundle_of())

    def snapshot_for(self, workload: Workload) -> tuple:
        """``(version, documents, warnings)`` of the snapshot for ``workload``.

        ``warnings``: texts the proxy logs, about what its scoped documents
        cannot tell it (:func:`mesh.config.selection.unselected_warning`: its
        namespace's policies use selectors and none selects it).
        """
        _, snapshot = self.snapshot(workload)
        return snapshot.version, snapshot.documents, snapshot.warnings

    def _push(self, stream, changed_at=None):
        """Push ``stream`` its snapshot if its version changed; returns its view key.

        ``changed_at``: when the change it carries happened (the start of ``push_duration``), None: now.
        """
        key, snapshot = self.snapshot(stream.workload)
        if snapshot.version == stream._sent:
            return key
        if stream.awaiting is not None:  # flow control: the newest goes out when it answers the last one
            if stream not in self._held:
                delay = max(0.0, stream.awaiting_since + self.ack_timeout - self.reactor.seconds())
                self._held[stream] = (changed_at, self.reactor.callLater(delay, self._overdue, stream))
            return key
        if not stream.push(snapshot):
            return key
        stream.status.version_sent = snapshot.version
        stream.status.sent_at = changed_at if changed_at is not None else self.reactor.seconds()
        self.pushes += 1
        if self.metrics is not None:
            self.metrics.pushes.inc()
        return key

    def _answered(self, stream, version) -> None:
        """An ACK or NACK: if it answers the SNAPSHOT in flight, the push held back (if any) goes out."""
        if version == stream.awaiting:
            stream.awaiting = None
            self._release(stream)

    def _overdue(self, stream) -> None:
        """``ack_timeout`` passed without an answer: stop waiting for it, send the newest snapshot."""
        log.warn("proxy {node} has not answered snapshot {version} in {timeout:g} s: sending it the newest one",
                 node=stream.hello["node"], version=stream.awaiting, timeout=self.ack_timeout)
        stream.awaiting = None
        self._release(stream)

    def _release(self, stream) -> None:
        """Send ``stream`` the push held back for it, if any (the newest snapshot of its view)."""
        held = self._held.pop(stream, None)
        if held is None:
            return
        changed_at, timeout = held
        if timeout.active():
            timeout.cancel()
        if stream in self.streams:
            self._push(stream, changed_at)

    # -- streams ---------------------------------------------------------------------------
    def owner_of(self, node: str):
        """The SPIFFE id ``node`` is bound to: its open stream's, else its registry entry's, else None."""
        stream = self.nodes.get(node)
        if stream is not None:
            return stream.identity.uri
        entry = self.registry.entries.get(node)
        if entry is not None:
            return SpiffeId(self.trust_domain, entry.namespace, entry.service_account).uri
        return None

    def check_owner(self, node: str, identity: SpiffeId) -> None:
        """Raise ProtocolError if ``node`` is bound to another identity than ``identity`` (docs/protocol.md)."""
        owner = self.owner_of(node)
        if owner is not None and owner != identity.uri:
            raise proto.ProtocolError(
                f"refused HELLO for node {node!r}: that node name belongs to {owner} (connected or registered), "
                f"and this certificate is {identity.uri}; give each proxy its own node name (by default "
                "WORKLOAD.NAMESPACE~HOSTNAME~ADMINPORT), or stop the other proxy and wait for its registry "
                "entry to expire", node=node, identity=identity.uri, owner=owner)

    def hello(self, stream, address) -> None:
        node = stream.hello["node"]
        now = self.reactor.seconds()
        other = self.nodes.get(node)
        if other is not None and other is not stream:
            other.close(f"replaced by a new stream of the same node {node} and identity")
        self.nodes[node] = stream
        status = ProxyStatus(node, stream.identity.uri, address, now)
        status.workload = stream.workload.name
        status.namespace = stream.workload.namespace
        status.labels = stream.workload.labels
        previous = self.statuses.get(node)
        last_applied = stream.hello.get("version")
        if isinstance(last_applied, str) and last_applied:
            status.version_acked = last_applied
            if previous is not None and previous.last_nack_version == last_applied:
                status.last_nack = previous.last_nack
        self.statuses[node] = status
        stream.status = status
        self.streams.add(stream)
        self._update_connected()
        endpoint = ""
        if stream.registration is not None:  # other proxies get the new endpoint at the next push round
            registration = stream.registration
            endpoint = (f"; registry entry {registration.namespace}/{registration.service_account} at "
                        f"{registration.address}:{registration.inbound_port}"
                        f" {'added' if self.registry.register(registration) else 'unchanged'}")
        log.info("proxy {node} connected: {identity} at {address}, last applied version {version}{endpoint}",
                 node=node, identity=stream.identity.uri, address=address, version=last_applied or "none",
                 endpoint=endpoint)
        self._push(stream, self._changed_at)

    def acked(self, stream, version) -> None:
        status = stream.status
        if status.version_acked != version and version == status.version_sent and status.sent_at is not None:
            if self.metrics is not None:
                self.metrics.push_duration.observe(max(0.0, self.reactor.seconds() - status.sent_at))
        status.version_acked = version
        if version == status.version_sent:
            status.last_nack = None
            status.last_nack_version = None
        self._answered(stream, version)

    def nacked(self, stream, version, reason) -> None:
        """Record a NACK; the reason is kept (and logged) truncated to REASON_LIMIT bytes."""
        reason = proto.truncate(reason)
        stream.status.last_nack = reason
        stream.status.last_nack_version = version
        if self.metrics is not None:
            self.metrics.nacks.inc()
        log.error("proxy {node} rejected config {version!r}: {reason!r}", node=stream.hello["node"],
                  version=version, reason=reason)
        self._answered(stream, version)

    def drained(self, stream) -> None:
        """DRAIN: remove the stream's own node (bound to its identity at HELLO) from the registry now."""
        log.info("proxy {node} is draining: removed from endpoints", node=stream.hello["node"])
        self.registry.drain(stream.hello["node"])

    def stream_closed(self, stream) -> None:
        self.streams.discard(stream)
        self._release(stream)  # not pushed: it is no longer in self.streams
        self._update_connected()
        if stream.hello is None:
            return
        node = stream.hello["node"]
        if self.nodes.get(node) is stream:
            del self.nodes[node]
        if stream.status is not None and self.statuses.get(node) is stream.status:
            stream.status.connected = False
            stream.status.last_seen = self.reactor.seconds()
        if stream.registration is not None:
            self.registry.disconnected(node, stream.registration)
        log.info("proxy {node} disconnected", node=node)

    def _update_connected(self):
        if self.metrics is not None:
            self.metrics.connected_proxies.set(len(self.streams))

    def _prune_statuses(self):
        now = self.reactor.seconds()
        for node, status in list(self.statuses.items()):
            if not status.connected and now - status.last_seen > self.status_ttl:
                del self.statuses[node]

    # -- admin -----------------------------------------------------------------------------
    def proxy_status(self) -> list:
        """The rows of ``GET /proxies`` (admin port), sorted by node.

        Each row also says which resources select the proxy by its HELLO
        labels, and warns when none of its namespace's policy selectors does
        (:func:`mesh.config.selection.describe_selection`).
        """
        self._prune_statuses()
        objects = [item.obj for item in self.items]
        rows = []
        for _, status in sorted(self.statuses.items()):
            row = status.describe()
            workload = Workload(name=status.workload, namespace=status.namespace, labels=status.labels)
            row.update(describe_selection(objects, workload, self.root_namespace))
            rows.append(row)
        return rows

    def stop(self) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self.registry.save()
        for stream in list(self.streams):
            stream.transport.loseConnection()
