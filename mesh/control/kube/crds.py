"""txmesh's custom resources as a config source (``kubernetes:crds``).

Watches, in every namespace, the kinds deploy/base/crds defines:
``networking.txmesh.io/v1`` VirtualService, DestinationRule, ServiceEntry,
WorkloadEntry, Sidecar, Gateway and ``security.txmesh.io/v1`` AuthorizationPolicy,
PeerAuthentication, RequestAuthentication -- read with Istio's schemas, by the same loader and
validator as YAML files.  With ``--istio-crds`` it also watches the same
kinds of ``networking.istio.io/v1`` and ``security.istio.io/v1``, so a
cluster migrating from Istio keeps its config; an object defined in both
groups under the same kind, namespace and name is a duplicate error.

Each object's "file" in errors names it:
``kubernetes:virtualservices.networking.txmesh.io/NS/NAME``.  An invalid
object is not applied (the store keeps its last good version, see
:mod:`mesh.control.store`, which also logs the rejection); it is reported
once per resourceVersion as a Warning Event with reason ``InvalidConfig``
on the object itself (:mod:`mesh.control.kube.events`), saying what is wrong and
which version stays in force.
"""

from __future__ import annotations

import functools

from twisted.logger import Logger

from mesh.config.loader import LoadResult, load_documents
from mesh.config.validate import validate
from mesh.control.kube.events import EventRecorder
from mesh.control.kube.source import WatchedSource

log = Logger()

INVALID_REASON = "InvalidConfig"
#: ``(group, version)`` of txmesh's own API groups, and of Istio's.
TXMESH_GROUPS = (("networking.txmesh.io", "v1"), ("security.txmesh.io", "v1"))
ISTIO_GROUPS = (("networking.istio.io", "v1"), ("security.istio.io", "v1"))
#: plural -> kind, per group prefix.
PLURALS = {"networking": {"virtualservices": "VirtualService", "destinationrules": "DestinationRule",
                          "serviceentries": "ServiceEntry", "workloadentries": "WorkloadEntry",
                          "sidecars": "Sidecar", "gateways": "Gateway"},
           "security": {"authorizationpolicies": "AuthorizationPolicy",
                        "peerauthentications": "PeerAuthentication",
                        "requestauthentications": "RequestAuthentication"}}


def resources(istio: bool = False) -> list:
    """``[(group, version, plural)]`` watched: txmesh's groups, plus Istio's with ``istio``."""
    groups = TXMESH_GROUPS + (ISTIO_GROUPS if istio else ())
    return [(group, version, plural) for group, version in groups for plural in PLURALS[group.partition(".")[0]]]


def origin(plural: str, group: str, obj: dict) -> str:
    """The "file" of a custom object in errors: ``kubernetes:PLURAL.GROUP/NS/NAME``."""
    metadata = obj.get("metadata") or {}
    return f"kubernetes:{plural}.{group}/{metadata.get('namespace')}/{metadata.get('name')}"


def _error_text(errors) -> str:
    return "; ".join(f"{error.field}: {error.reason}" if error.field else error.reason for error in errors)


class CRDSource(WatchedSource):
    """The custom objects of txmesh's (and optionally Istio's) groups, as an IConfigSource."""

    name = "kubernetes:crds"

    def __init__(self, reactor, api_client, istio: bool = False, recorder: EventRecorder = None, **kwargs):
        from kubernetes import client

        custom = client.CustomObjectsApi(api_client)
        listers = {f"{plural}.{group}": functools.partial(custom.list_cluster_custom_object, group, version, plural)
                   for group, version, plural in resources(istio)}
        super().__init__(reactor, listers, **kwargs)
        self.recorder = recorder or EventRecorder(reactor, api_client)
        self._verdicts = {}   # (origin, resourceVersion) -> [ConfigError] (empty: valid)
        self._last_good = {}  # origin -> resourceVersion of the last valid version seen
        self._reported = set()  # (uid, resourceVersion) already reported as an Event

    def translate(self) -> LoadResult:
        objects, names = [], []
        for kind_name, cache in self.caches.items():
            plural, _, group = kind_name.partition(".")
            for obj in cache.values():
                objects.append(obj)
                names.append(origin(plural, group, obj))
        result = load_documents(objects, self.name, names=names)
        self._judge(objects, names, result)
        return result

    def _judge(self, objects, names, result: LoadResult) -> None:
        """Validate new versions, remember the last good one, report the invalid ones as Events."""
        errors_of = {}
        for error in result.errors:
            errors_of.setdefault(error.file, []).append(error)
        resource_of = {resource.file: resource for resource in result.resources}
        verdicts = {}
        for obj, where in zip(objects, names):
            version = (obj.get("metadata") or {}).get("resourceVersion")
            key = (where, version)
            verdict = self._verdicts.get(key)
            if verdict is None:
                verdict = list(errors_of.get(where, ()))
                if where in resource_of:
                    verdict += validate([resource_of[where]])[1]
            verdicts[key] = verdict
            if not verdict:
                self._last_good[where] = version
            else:
                self._report(obj, where, version, verdict)
        self._verdicts = verdicts
        for where in set(self._last_good) - set(names):
            del self._last_good[where]
        current = {((obj.get("metadata") or {}).get("uid"), (obj.get("metadata") or {}).get("resourceVersion"))
                   for obj in objects}
        self._reported &= current

    def _report(self, obj, where, version, errors) -> None:
        metadata = obj.get("metadata") or {}
        token = (metadata.get("uid"), version)
        if token in self._reported:
            return
        self._reported.add(token)
        kept = self._last_good.get(where)
        consequence = (f"The previous version (resourceVersion {kept}) stays in force" if kept else
                       "No earlier valid version exists, so none is in force")
        message = (f"{obj.get('kind')} {metadata.get('namespace')}/{metadata.get('name')} (resourceVersion "
                   f"{version}) is invalid and was not applied: {_error_text(errors)}. {consequence}; "
                   "fix it and apply it again")
        self.recorder.warning(obj, INVALID_REASON, message)
