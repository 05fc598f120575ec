"""Proxies that announced themselves, as WorkloadEntry-equivalents.

Every connected proxy with an inbound listener (HELLO ``app_port`` set) is a
workload: its address is the address it announced (or, for a wildcard, the
address it connects from), its labels are the ones it announced plus
``security.istio.io/tlsMode: istio`` (it speaks mesh mTLS), and its namespace
and service account come from its *certificate*, never from the message.
A ServiceEntry whose ``workloadSelector`` matches the labels gets it as an
endpoint, through the same compile step as file WorkloadEntries.

A proxy that disconnects stays for ``grace`` seconds (a quick reconnect
does not flap the endpoint); one that sends DRAIN is removed at once.

The entries are saved in the control plane's state directory
(``registry.json``).  A restarted control plane restores them as if their
proxies had just disconnected, with ``restore_grace`` (60 s by default:
longer than the proxies' capped reconnect backoff) to come back; otherwise
the first proxies to reconnect would get snapshots without the endpoints of
the proxies that have not reconnected yet.

The entries are also indexed by namespace, each namespace with a generation
that every change of one of its entries bumps: the distributor rebuilds the
endpoints of a namespace only when its generation moved
(:meth:`Registry.in_namespace`, :meth:`Registry.generation`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from twisted.logger import Logger

from mesh.sidecar_contract import TLS_MODE_LABEL

log = Logger()

REGISTRY_LABEL = "mesh.txmesh.io/registered"
_NAME_UNSAFE = re.compile(r"[^a-z0-9-]+")


@dataclass
class Registration:
    """One announced workload."""

    node: str
    workload: str
    namespace: str
    service_account: str
    address: str
    inbound_port: int
    labels: dict = field(default_factory=dict)
    draining: bool = False

    @property
    def entry_name(self) -> str:
        """A DNS-subdomain name for the generated WorkloadEntry, unique per node."""
        node = _NAME_UNSAFE.sub("-", self.node.lower()).strip("-")[:200] or "node"
        return f"registry-{node}"

    def document(self, port_names=()) -> dict:
        """The WorkloadEntry document: every service port name maps to the sidecar's inbound port."""
        labels = {**self.labels, TLS_MODE_LABEL: "istio"}
        spec = {"address": self.address, "labels": labels, "serviceAccount": self.service_account}
        ports = {name: self.inbound_port for name in sorted(port_names) if name}
        if ports:
            spec["ports"] = ports
        return {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                "metadata": {"name": self.entry_name, "namespace": self.namespace,
                             "labels": {REGISTRY_LABEL: "true"}},
                "spec": spec}


class Registry:
    """The announced workloads, keyed by node id.  ``on_change()`` runs after every change."""

    def __init__(self, reactor, on_change=lambda: None, grace: float = 5.0, path=None, restore_grace: float = 60.0):
        self.reactor = reactor
        self.on_change = on_change
        self.grace = grace
        self.path = path
        self.entries = {}
        self._by_namespace = {}  # namespace -> {node: Registration}
        self._generations = {}  # namespace -> count of changes of its entries
        self._expiry = {}
        self.dirty = False
        if path:
            self._restore(restore_grace)

    def _restore(self, grace):
        try:
            with open(self.path, encoding="utf-8") as handle:
                rows = json.load(handle)
            restored = [Registration(**row) for row in rows]
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError) as error:
            log.warn("registry: ignoring {path}: {error}", path=self.path, error=str(error))
            return
        for registration in restored:
            self._put(registration)
            self._expiry[registration.node] = self.reactor.callLater(
                grace, self.remove, registration.node, f"not back within {grace:g}s of a control plane restart")
        if restored:
            log.info("registry: {count} entries restored from {path}; each stays {grace:g}s unless its proxy "
                     "reconnects", count=len(restored), path=self.path, grace=grace)

    def save(self) -> None:
        """Write the entries to ``path`` (atomically) if they changed since the last save."""
        if not self.path or not self.dirty:
            return
        self.dirty = False
        temporary = f"{self.path}.tmp"
        try:
            # vars(): the fields as they are (dataclasses.asdict deep-copies); json.dumps: the C encoder
            text = json.dumps([vars(entry) for _, entry in sorted(self.entries.items())])
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(temporary, self.path)
        except OSError as error:
            log.warn("registry: cannot save {path}: {error}", path=self.path, error=str(error))

    def register(self, registration: Registration) -> bool:
        """Add or replace ``registration``'s entry; whether it changed (the caller logs it: it is part
        of the proxy's ``connected`` line, one line per proxy in a storm of thousands)."""
        timer = self._expiry.pop(registration.node, None)
        if timer is not None and timer.active():
            timer.cancel()
        previous = self.entries.get(registration.node)
        if previous is not None and previous.namespace != registration.namespace:
            self._pop(registration.node)
        self._put(registration)  # the newest stream owns the entry
        if previous == registration:
            return False
        self.dirty = True
        self.on_change()
        return True

    def drain(self, node: str) -> None:
        """DRAIN: remove the node now (clients stop picking it before it stops serving)."""
        if node in self.entries:
            self.entries[node].draining = True
            self.remove(node, "draining")

    def disconnected(self, node: str, registration=None) -> None:
        """The node's stream closed: remove it after the grace period, unless it comes back.

        ``registration`` is the one of the closed stream; a newer stream of the
        same node (reconnected already) is left alone.
        """
        if node not in self.entries or (registration is not None and self.entries[node] is not registration):
            return
        if self.grace <= 0:
            self.remove(node, "disconnected")
            return
        old = self._expiry.pop(node, None)
        if old is not None and old.active():
            old.cancel()
        self._expiry[node] = self.reactor.callLater(self.grace, self.remove, node,
                                                    f"disconnected for {self.grace:g}s")

    def remove(self, node: str, why: str) -> None:
        timer = self._expiry.pop(node, None)
        if timer is not None and timer.active():
            timer.cancel()
        registration = self._pop(node)
        if registration is not None:
            self.dirty = True
            log.info("registry: {node} removed ({why})", node=node, why=why)
            self.on_change()

    def _put(self, registration: Registration) -> None:
        """Add or replace an entry, in both indexes, and bump its namespace's generation."""
        self.entries[registration.node] = registration
        self._by_namespace.setdefault(registration.namespace, {})[registration.node] = registration
        self._generations[registration.namespace] = self._generations.get(registration.namespace, 0) + 1

    def _pop(self, node: str):
        """Remove ``node``'s entry from both indexes (bumping its namespace's generation); it, or None."""
        registration = self.entries.pop(node, None)
        if registration is not None:
            namespace = registration.namespace
            del self._by_namespace[namespace][node]
            if not self._by_namespace[namespace]:
                del self._by_namespace[namespace]
            self._generations[namespace] = self._generations.get(namespace, 0) + 1
        return registration

    def generation(self, namespace: str) -> int:
        """A number that changes whenever an entry of ``namespace`` is added, replaced or removed."""
        return self._generations.get(namespace, 0)

    def generations(self) -> dict:
        """A copy of every namespace's :meth:`generation`."""
        return dict(self._generations)

    def in_namespace(self, namespace: str) -> list:
        """The entries of ``namespace``, by node."""
        return [registration for _, registration in sorted(self._by_namespace.get(namespace, {}).items())]
