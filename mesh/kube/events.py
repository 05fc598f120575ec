"""Kubernetes Events about the objects txmesh reads (``kubectl describe`` shows them).

:class:`EventRecorder` posts core/v1 Events from a thread of the reactor's
thread pool, so the reactor never waits for the API server.  A failure to
post (no RBAC right, API server down) is logged and otherwise ignored: the
control-plane log has the same news.
"""

from __future__ import annotations

import datetime
import socket
import time

from twisted.internet import threads
from twisted.logger import Logger

log = Logger()

#: Kubernetes truncates longer Event messages.
MAX_MESSAGE = 1024
COMPONENT = "mesh-control"


def involved_object(obj: dict) -> dict:
    """The ``involvedObject`` reference of an API object (apiVersion, kind, name, namespace, uid, version)."""
    metadata = obj.get("metadata") or {}
    reference = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": metadata.get("name"),
                 "namespace": metadata.get("namespace"), "uid": metadata.get("uid"),
                 "resourceVersion": metadata.get("resourceVersion")}
    return {key: value for key, value in reference.items() if value}


def event_body(obj: dict, event_type: str, reason: str, message: str, instance: str, now: float) -> dict:
    """A core/v1 Event about ``obj``, named like client-go names them (``NAME.<hex nanoseconds>``)."""
    reference = involved_object(obj)
    stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 3] + "..."
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{reference.get('name', 'object')}.{int(now * 1e9):x}",
                         "namespace": reference.get("namespace") or "default"},
            "involvedObject": reference, "type": event_type, "reason": reason, "message": message,
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT, "reportingInstance": instance,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1}


class EventRecorder:
    """Posts Events with a ``kubernetes.client.ApiClient`` from the reactor's thread pool."""

    def __init__(self, reactor, api_client, clock=time.time):
        self.reactor = reactor
        self.api_client = api_client
        self.instance = socket.gethostname()
        self._clock = clock

    def warning(self, obj: dict, reason: str, message: str):
        """Post a Warning Event about ``obj``; a Deferred firing with the created Event's name, or None."""
        body = event_body(obj, "Warning", reason, message, self.instance, self._clock())
        pool = self.reactor.getThreadPool()
        posting = threads.deferToThreadPool(self.reactor, pool, self._post, body)

        def failed(failure):
            log.warn("cannot post the Kubernetes Event {reason} about {kind} {namespace}/{name}: {error}",
                     reason=reason, kind=body["involvedObject"].get("kind"),
                     namespace=body["metadata"]["namespace"], name=body["involvedObject"].get("name"),
                     error=failure.getErrorMessage())

        return posting.addErrback(failed)

    def _post(self, body: dict) -> str:
        from kubernetes import client

        client.CoreV1Api(self.api_client).create_namespaced_event(body["metadata"]["namespace"], body,
                                                                  _request_timeout=(5, 10))
        return body["metadata"]["name"]
