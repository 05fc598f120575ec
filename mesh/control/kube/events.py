"""Kubernetes Events about the objects txmesh reads (``kubectl describe`` shows them).

:class:`EventRecorder` posts core/v1 Events from a thread of the reactor's
thread pool, so the reactor never waits for the API server.

An Event's name is derived from what it reports (the object's uid and
resourceVersion, and the reason), so every replica of the control plane
posts the *same* Event: the first create wins, the others get 409
AlreadyExists and leave it at that -- one Event per invalid version, however
many replicas saw it.  A post that fails for a passing reason (API server
down or overloaded: connection errors, 5xx, 429) is tried again after 1, 2
and 4 s; then, or at once for a refusal (no RBAC right), it is logged and
dropped: the control-plane log has the same news.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
import time

from twisted.internet import task, threads
from twisted.logger import Logger

log = Logger()

#: Kubernetes truncates longer Event messages.
MAX_MESSAGE = 1024
COMPONENT = "mesh-control"
#: Seconds before each new try of a post that failed for a passing reason.
RETRY_DELAYS = (1.0, 2.0, 4.0)


def involved_object(obj: dict) -> dict:
    """The ``involvedObject`` reference of an API object (apiVersion, kind, name, namespace, uid, version)."""
    metadata = obj.get("metadata") or {}
    reference = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": metadata.get("name"),
                 "namespace": metadata.get("namespace"), "uid": metadata.get("uid"),
                 "resourceVersion": metadata.get("resourceVersion")}
    return {key: value for key, value in reference.items() if value}


def event_name(reference: dict, reason: str) -> str:
    """``NAME.<16 hex digits>``: the same for the same object version and reason, on every replica."""
    digest = hashlib.sha256("\0".join((reference.get("uid", ""), reference.get("resourceVersion", ""),
                                       reason)).encode()).hexdigest()[:16]
    return f"{reference.get('name', 'object')[:200]}.{digest}"


def event_body(obj: dict, event_type: str, reason: str, message: str, instance: str, now: float) -> dict:
    """A core/v1 Event about ``obj`` (named by :func:`event_name`)."""
    reference = involved_object(obj)
    stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 3] + "..."
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": event_name(reference, reason),
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
        """Post a Warning Event about ``obj``.

        A Deferred firing with the Event's name once it exists (created now, or
        by another replica), or None when it could not be posted (logged).
        """
        body = event_body(obj, "Warning", reason, message, self.instance, self._clock())
        return self._try(body, list(RETRY_DELAYS))

    def _try(self, body: dict, delays: list):
        posting = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._post, body)

        def failed(failure):
            if delays and _passing(failure.value):
                return task.deferLater(self.reactor, delays.pop(0), self._try, body, delays)
            involved = body["involvedObject"]
            log.warn("cannot post the Kubernetes Event {reason} about {kind} {namespace}/{name}: {error}",
                     reason=body["reason"], kind=involved.get("kind"), namespace=body["metadata"]["namespace"],
                     name=involved.get("name"), error=failure.getErrorMessage())
            return None

        return posting.addErrback(failed)

    def _post(self, body: dict) -> str:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            client.CoreV1Api(self.api_client).create_namespaced_event(body["metadata"]["namespace"], body,
                                                                      _request_timeout=(5, 10))
        except ApiException as error:
            if error.status != 409:  # 409 AlreadyExists: another replica reported it first
                raise
        return body["metadata"]["name"]


def _passing(error) -> bool:
    """Whether a failed post may succeed when tried again (API server down or overloaded), not a refusal."""
    status = getattr(error, "status", None)
    return status is None or status == 429 or status >= 500
