"""A faithful test Kubernetes API server for exactly the API subset txmesh uses (no cluster needed).

Run it as ``python -m tests.harness.kubeapi --port 0 --port-file F``: plain HTTP on 127.0.0.1, the bound
port written to F once it listens. Tests drive it with the real ``kubernetes`` client through
:class:`tests.harness.kube.KubeAPI`. This module is the HTTP side: it maps paths to resources and verbs
(:mod:`tests.harness.kuberesources`), streams watches, and serves the test controls under ``/_test/``:

- ``POST /_test/compact``: forget the event history (older watches get 410 Gone);
- ``POST /_test/break-watches``: drop every open watch connection abruptly;
- ``POST /_test/bookmark``: a BOOKMARK event to every watch that allowed bookmarks;
- ``POST /_test/tokens`` ``{"token", "namespace", "serviceAccount", "audiences", "expiresIn"}``;
- ``GET /_test/events[?apiVersion=v1|events.k8s.io/v1]``, ``GET /_test/requests``;
- ``POST /_test/down`` ``{"down": true|false, "how": "reset"|"503"}``: an API-server outage;
- ``POST /_test/forbid`` ``{"verbs": ["create", "update", ...], "resource": PLURAL, "forbidden": true|false}``:
  answer those writes 403 Forbidden as RBAC would (this server has no RBAC otherwise).
- ``POST /_test/fail`` ``{"verbs": [...], "resource": PLURAL, "times": N}``: answer the next N such requests
  503 ServiceUnavailable, as an overloaded API server (or an etcd timeout) does.

TokenReview is answered from the tokens added under ``/_test/tokens``; SubjectAccessReview
(``authorization.k8s.io/v1``) by evaluating the stored Roles, ClusterRoles, RoleBindings and
ClusterRoleBindings, a faithful subset of RBAC (:mod:`tests.harness.kuberbac`).  Requests themselves
are not authorized by RBAC (only ``/_test/forbid``).

Watches follow the real server: ``resourceVersion`` absent or ``"0"`` starts with synthetic ADDED events
for the current state; a version streams the changes after it; a version older than the compacted
history gets one ERROR event (410 Expired) and the stream ends; a change that moves an object out of a
watch's selector is a DELETED event for that watch, into it an ADDED event; ``allowWatchBookmarks``
brings BOOKMARK events every ``--bookmark-interval`` seconds; ``timeoutSeconds`` ends the stream cleanly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import parse_qsl

from twisted.internet import reactor, task
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web import resource, server

from . import kuberbac
from .kubeauth import Tokens
from .kuberesources import ApiError, Resources, ResourceType
from .kubeselectors import SelectorError, selector
from .kubestore import Change, Expired, Store

log = Logger(namespace="kubeapi")

_TRUE = {"true", "1", "t"}  # what Go's strconv.ParseBool takes as true (compared in lower case)


def _not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def _not_allowed() -> ApiError:
    return ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource", {})


class WatchStream:
    """One open watch: filters the store's changes for its request and writes them as JSON lines."""

    def __init__(self, request, rtype: ResourceType, version: str, namespace: str | None, matches,
                 bookmarks: bool):
        self.request, self.rtype, self.version = request, rtype, version
        self.namespace, self.matches, self.bookmarks = namespace, matches, bookmarks
        self.open = True
        self._unsubscribe = None
        self._timer = None

    def start(self, store: Store, resource_version: str | None, current: list[dict], timeout: int):
        """Send the initial events (or the 410 ERROR), then follow the store (for *timeout* seconds if not 0)."""
        if resource_version in (None, "", "0"):
            for obj in current:
                self.send("ADDED", obj)
        else:
            try:
                changes = store.changes_since(self.rtype.storage, int(resource_version))
            except Expired as expired:
                self.send_error(ApiError(410, "Expired", str(expired)))
                self.close()
                return
            for change in changes:
                self.on_change(change)
        self._unsubscribe = store.subscribe(self.rtype.storage, self.on_change)
        if timeout:
            self._timer = reactor.callLater(timeout, self.close)

    def stopped(self) -> None:
        """The connection is gone (closed, broken or timed out): stop following the store."""
        self.open = False
        if self._unsubscribe:
            self._unsubscribe()
            self._unsubscribe = None
        if self._timer and self._timer.active():
            self._timer.cancel()

    def on_change(self, change: Change) -> None:
        """Turn a store change into this watch's event (if any), as the real watch cache filters them."""
        if self.namespace is not None and change.new["metadata"].get("namespace") != self.namespace:
            return
        was = change.old is not None and self.matches(change.old)
        now = change.type != "DELETED" and self.matches(change.new)
        if was and now:
            self.send("MODIFIED", change.new)
        elif now:
            self.send("ADDED", change.new)
        elif was:
            self.send("DELETED", change.new)

    def send(self, event_type: str, obj: dict) -> None:
        """Write one event with *obj* in this watch's representation."""
        self._write({"type": event_type, "object": self.rtype.view(obj, self.version)})

    def send_error(self, error: ApiError) -> None:
        """Write an ERROR event carrying the error's Status."""
        self._write({"type": "ERROR", "object": error.status()})

    def send_bookmark(self, revision: int) -> None:
        """Write a BOOKMARK event: only kind, apiVersion and ``metadata.resourceVersion``."""
        self._write({"type": "BOOKMARK",
                     "object": self.rtype.view({"metadata": {"resourceVersion": str(revision)}}, self.version)})

    def _write(self, event: dict) -> None:
        if self.open:
            self.request.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")

    def close(self) -> None:
        """End the stream cleanly (the last chunk is sent)."""
        if self.open:
            self.stopped()
            self.request.finish()

    def abort(self) -> None:
        """Drop the connection without ending the stream, as a broken network or a dying server does."""
        if self.open:
            self.stopped()
            self.request.channel.transport.abortConnection()


class KubeApiServer(resource.Resource):
    """The API (``/api``, ``/apis``), health (``/healthz``, ``/readyz``, ``/livez``) and ``/_test/`` controls."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.store = Store()
        self.resources = Resources(self.store)
        self.tokens = Tokens()
        self.watches: set[WatchStream] = set()
        self.seen: list[dict] = []
        self.down: str | None = None  # None, "reset" or "503"
        self.forbidden: set[tuple[str, str]] = set()  # (verb, plural) answered 403, as a missing RBAC grant
        self.failing: dict[tuple[str, str], int] = {}  # (verb, plural) -> how many more get 503
        self._event_origins: dict[str, str] = {}  # uid -> apiVersion it was created with, in creation order

    # -- dispatch -----------------------------------------------------------------------------------------------

    def render(self, request):
        path = request.path.decode("utf-8", "replace")
        query = {key: value for key, value in parse_qsl(request.uri.decode().partition("?")[2],
                                                          keep_blank_values=True)}
        method = request.method.decode()
        if path.startswith("/_test/"):
            return self._respond(request, *self._control(method, path, query, request))
        self.seen.append({"method": method, "path": path, "query": query})
        if self.down == "reset" and path not in ("/healthz", "/readyz", "/livez"):
            request.channel.transport.abortConnection()
            return server.NOT_DONE_YET
        try:
            if self.down == "503":
                raise ApiError(503, "ServiceUnavailable", "the server is currently unable to handle the request")
            return self._api(request, method, path, query)
        except ApiError as error:
            log.info("{method} {path}: {code} {reason}: {message}", method=method, path=path, code=error.code,
                     reason=error.reason, message=error.message)
            return self._respond(request, error.code, error.status())
        except Exception as error:  # a bug of this fake: say so, as a Status the client can show
            log.failure("{method} {path} failed inside the test API server", method=method, path=path)
            return self._respond(request, 500, ApiError(
                500, "InternalError", f"Internal error occurred: the test API server (tests/harness/kubeapi.py) "
                f"failed on {method} {path}: {error!r}; its log has the traceback").status())

    def _respond(self, request, code: int, body) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def _body(self, request):
        try:
            return json.loads(request.content.read() or b"null")
        except ValueError as error:
            raise ApiError(400, "BadRequest",
                           f"the request body is not JSON ({error}); send application/json") from None

    def _api(self, request, method: str, path: str, query: dict):
        parts = [part for part in path.split("/") if part]
        if path in ("/healthz", "/readyz", "/livez"):
            request.setHeader(b"content-type", b"text/plain")
            return b"ok"
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _not_found()
        if (group, version, rest) == ("authentication.k8s.io", "v1", ["tokenreviews"]):
            if method != "POST":
                raise _not_allowed()
            return self._respond(request, 201, self.tokens.review(self._body(request) or {}))
        if (group, version, rest) == ("authorization.k8s.io", "v1", ["subjectaccessreviews"]):
            if method != "POST":
                raise _not_allowed()
            return self._respond(request, 201, kuberbac.review(self.resources, self._body(request) or {}))
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces" and not (group == "" and len(rest) == 3
                                                                and rest[2] in ("status", "finalize")):
            namespace, rest = rest[1], rest[2:]
        if not 1 <= len(rest) <= 3:
            raise _not_found()
        rtype = self.resources.lookup(group, version, rest[0])
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if (namespace is not None and not rtype.namespaced) or (rtype.namespaced and namespace is None and name):
            raise _not_found()
        if name is None:
            return self._collection(request, method, rtype, version, namespace, query)
        return self._item(request, method, rtype, version, namespace, name, subresource)

    # -- verbs --------------------------------------------------------------------------------------------------

    def _collection(self, request, method, rtype: ResourceType, version, namespace, query):
        if method == "GET":
            if query.get("watch", "").lower() in _TRUE:
                return self._watch(request, rtype, version, namespace, query)
            limit = query.get("limit") or "0"
            if not limit.isdigit():
                raise ApiError(400, "BadRequest", f"limit {limit!r} is not a non-negative integer")
            try:
                items, revision, token = self.resources.list(
                    rtype, namespace, query.get("labelSelector"), query.get("fieldSelector"), int(limit),
                    query.get("continue"))
            except SelectorError as error:
                raise ApiError(400, "BadRequest", str(error)) from None
            with_kind = "crd" in rtype.extra  # custom resources keep kind/apiVersion on items; built-ins do not
            return self._respond(request, 200, {
                "kind": rtype.list_kind, "apiVersion": rtype.api_version(version),
                "metadata": {"resourceVersion": str(revision), **({"continue": token} if token else {})},
                "items": [rtype.view(obj, version, with_kind=with_kind) for obj in items]})
        if method == "POST" and (namespace is not None or not rtype.namespaced):
            self._authorize("create", rtype, namespace, None)
            stored = self.resources.create(rtype, namespace, self._body(request))
            if rtype.storage == "/events":
                self._event_origins[stored["metadata"]["uid"]] = rtype.api_version(version)
            return self._respond(request, 201, rtype.view(stored, version))
        raise _not_allowed()

    def _item(self, request, method, rtype: ResourceType, version, namespace, name, subresource):
        self._authorize({"PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, "get"), rtype, namespace,
                        name)
        if method == "GET":
            self.resources.check_subresource(rtype, subresource)
            return self._respond(request, 200, rtype.view(self.resources.get(rtype, namespace, name), version))
        if method == "PUT":
            stored = self.resources.replace(rtype, namespace, name, self._body(request), subresource)
            return self._respond(request, 200, rtype.view(stored, version))
        if method == "PATCH":
            content_type = (request.getHeader(b"content-type") or b"").decode()
            stored = self.resources.patch(rtype, namespace, name, content_type, self._body(request), subresource)
            return self._respond(request, 200, rtype.view(stored, version))
        if method == "DELETE" and subresource is None:
            gone = self.resources.delete(rtype, namespace, name)
            if rtype.plural == "customresourcedefinitions":  # its watches end, as its storage is torn down
                storage = self.resources.custom_type(gone).storage
                for stream in [stream for stream in self.watches if stream.rtype.storage == storage]:
                    stream.close()
            if rtype.returns_deleted:
                return self._respond(request, 200, rtype.view(gone, version))
            return self._respond(request, 200, {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "group": rtype.group, "kind": rtype.plural, "uid": gone["metadata"]["uid"]}})
        raise _not_allowed()

    def _watch(self, request, rtype: ResourceType, version, namespace, query):
        try:
            matches = selector(query.get("labelSelector"), query.get("fieldSelector"))
        except SelectorError as error:
            raise ApiError(400, "BadRequest", str(error)) from None
        resource_version = query.get("resourceVersion")
        if resource_version not in (None, "") and not resource_version.isdigit():
            raise ApiError(400, "BadRequest", f'invalid resource version "{resource_version}": use a '
                           "resourceVersion from a list or an earlier event")
        timeout = query.get("timeoutSeconds") or "0"
        if not timeout.isdigit():
            raise ApiError(400, "BadRequest", f"timeoutSeconds {timeout!r} is not a non-negative integer")
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.write(b"")  # the status line and headers go out now, before any event, as a real API server does
        stream = WatchStream(request, rtype, version, namespace, matches,
                             query.get("allowWatchBookmarks", "").lower() in _TRUE)
        self.watches.add(stream)
        request.notifyFinish().addBoth(lambda _: (stream.stopped(), self.watches.discard(stream)))
        current = [obj for obj in self.store.items(rtype.storage, namespace) if matches(obj)]
        stream.start(self.store, resource_version, current, int(timeout))
        return server.NOT_DONE_YET

    def _authorize(self, verb: str, rtype: ResourceType, namespace: str | None, name: str | None) -> None:
        """403 Forbidden, worded as RBAC's denial, for a (verb, resource) the test forbade; 503 while it fails."""
        if self.failing.get((verb, rtype.plural)):
            self.failing[(verb, rtype.plural)] -= 1
            raise ApiError(503, "ServiceUnavailable", "the server is currently unable to handle the request "
                           "(a failure the test asked for)")
        if (verb, rtype.plural) in self.forbidden:
            scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            subject = f'{rtype.plural} "{name}"' if name else rtype.plural
            raise ApiError(403, "Forbidden", f'{subject} is forbidden: User "txmesh-test" cannot {verb} resource '
                           f'"{rtype.plural}" in API group "{rtype.group}" {scope}',
                           {"name": name or "", "group": rtype.group, "kind": rtype.plural})

    # -- test controls ------------------------------------------------------------------------------------------

    def bookmark_all(self) -> int:
        """A BOOKMARK at the current revision to every watch that allowed bookmarks; return how many."""
        streams = [stream for stream in self.watches if stream.bookmarks]
        for stream in streams:
            stream.send_bookmark(self.store.revision)
        return len(streams)

    def break_watches(self) -> int:
        """Drop every open watch connection; return how many there were."""
        streams = list(self.watches)
        for stream in streams:
            stream.abort()
        return len(streams)

    def events(self, api_version: str | None) -> list[dict]:
        """The Events stored now, in creation order, each as created (or all as *api_version*)."""
        core, new = (self.resources.lookup("", "v1", "events"), self.resources.lookup("events.k8s.io", "v1", "events"))
        by_uid = {obj["metadata"]["uid"]: obj for obj in self.store.items("/events")}
        order = [uid for uid in self._event_origins if uid in by_uid] + [uid for uid in by_uid
                                                                        if uid not in self._event_origins]
        return [(new if (api_version or self._event_origins.get(uid, "v1")) == "events.k8s.io/v1" else core)
                .view(by_uid[uid], "v1") for uid in order]

    def _control(self, method: str, path: str, query: dict, request) -> tuple[int, object]:
        """(status, JSON body) of one test-control request."""
        name = path[len("/_test/"):]
        body = self._run_control(method, name, query, request)
        if body is None:
            return 404, {"error": f"no test control {method} {path}: see tests/harness/kubeapi.py's docstring"}
        return 200, body

    def _run_control(self, method: str, name: str, query: dict, request):
        if (method, name) == ("POST", "compact"):
            return {"compacted": self.store.compact()}
        if (method, name) == ("POST", "break-watches"):
            return {"broken": self.break_watches()}
        if (method, name) == ("POST", "bookmark"):
            return {"sent": self.bookmark_all()}
        if (method, name) == ("POST", "tokens"):
            spec = json.loads(request.content.read())
            self.tokens.add(spec["token"], spec["namespace"], spec["serviceAccount"],
                            spec.get("audiences", ["txmesh"]), float(spec.get("expiresIn", 3600.0)))
            return {"added": spec["namespace"] + "/" + spec["serviceAccount"]}
        if (method, name) == ("GET", "events"):
            return self.events(query.get("apiVersion"))
        if (method, name) == ("GET", "requests"):
            return self.seen
        if (method, name) == ("POST", "forbid"):
            spec = json.loads(request.content.read())
            pairs = {(verb, spec["resource"]) for verb in spec["verbs"]}
            self.forbidden = self.forbidden | pairs if spec.get("forbidden", True) else self.forbidden - pairs
            return {"forbidden": sorted(f"{verb} {plural}" for verb, plural in self.forbidden)}
        if (method, name) == ("POST", "fail"):
            spec = json.loads(request.content.read())
            for verb in spec["verbs"]:
                self.failing[(verb, spec["resource"])] = int(spec["times"])
            return {"failing": {f"{verb} {plural}": times for (verb, plural), times in self.failing.items()}}
        if (method, name) == ("POST", "down"):
            spec = json.loads(request.content.read())
            self.down = (spec.get("how") or "reset") if spec["down"] else None
            if self.down:
                self.break_watches()
            return {"down": self.down}
        return None


def main(argv=None) -> None:
    """``python -m tests.harness.kubeapi --port 0 --port-file F [--bookmark-interval S]``."""
    parser = argparse.ArgumentParser(prog="python -m tests.harness.kubeapi", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    parser.add_argument("--bookmark-interval", type=float, default=5.0,
                        help="seconds between periodic BOOKMARK events (default 5)")
    options = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    api = KubeApiServer()
    port = reactor.listenTCP(options.port, server.Site(api), interface="127.0.0.1")
    bookmarks = task.LoopingCall(api.bookmark_all)
    bookmarks.start(options.bookmark_interval, now=False)
    bound = port.getHost().port
    if options.port_file:
        partial = options.port_file.with_suffix(".partial")
        partial.write_text(f"{bound}\n")
        partial.rename(options.port_file)
    log.info("test Kubernetes API server listening on http://127.0.0.1:{port}", port=bound)
    reactor.run()


if __name__ == "__main__":
    main()
