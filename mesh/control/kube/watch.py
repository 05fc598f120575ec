"""List-then-watch of one Kubernetes resource kind, on its own thread (a "reflector").

:class:`Reflector` keeps an :class:`ObjectCache` equal to the API server's
view of one kind (all namespaces), the way client-go's reflector does:

1. **list** the kind (paged), record the list's ``metadata.resourceVersion``
   and hand the items over as a *replacement* of the whole cache: whatever
   was deleted while nobody watched disappears;
2. **watch** from that version with ``allowWatchBookmarks`` and
   ``timeoutSeconds`` (5 minutes by default); every ADDED/MODIFIED/DELETED
   event and every BOOKMARK advances the version; when the server ends the
   watch, watch again from the last version seen;
3. a **410 Gone** (an ERROR event with code 410, or an ``ApiException``
   with status 410: the history the watch needed was compacted) relists at
   once;
4. any other failure (connection refused or reset, a broken stream, a 5xx,
   a timeout) waits a capped, jittered exponential backoff (0.2 s doubling
   to 10 s) and then resyncs: it watches again from the last version seen,
   which replays every change made in the gap, or -- when the gap outlived
   the server's history -- gets 410 and relists (as client-go does); a
   failed list is simply listed again.  The cache keeps serving its last
   state meanwhile.

The thread never touches the cache: results reach the reactor only through
``reactor.callFromThread``, so the reactor never blocks on the API server.
:meth:`Reflector.stop` ends the thread promptly: it sets the stop flag,
closes the watch's socket and every request has a short timeout.

The ``kubernetes`` package is imported by the callers (``lister`` is a
bound method of one of its API classes); this module only calls it.
"""

from __future__ import annotations

import functools
import json
import threading

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from mesh.backoff import Backoff

log = Logger()

#: Seconds the API server keeps one watch open (it then ends it; we watch again).
WATCH_TIMEOUT = 300
#: ``(connect, read)`` timeouts of list requests.
LIST_TIMEOUT = (5.0, 30.0)
#: Shorter timeouts for the first list, made before the control plane serves: an API server that
#: accepts connections but does not answer delays readiness by at most this much per source.
PRIME_TIMEOUT = (3.0, 10.0)
#: Page size of lists (``limit``/``continue``).
PAGE_SIZE = 500
#: The backoff after a failed list or watch: 0.2 s doubling to 10 s, each delay 0.5 to 1 times the step.
WATCH_BACKOFF_MIN, WATCH_BACKOFF_MAX, WATCH_BACKOFF_JITTER = 0.2, 10.0, (0.5, 1.0)


def object_key(obj: dict) -> tuple:
    """``(namespace, name)`` of an API object (namespace "" for cluster-scoped ones)."""
    metadata = obj.get("metadata") or {}
    return (metadata.get("namespace") or "", metadata.get("name") or "")


class ObjectCache:
    """The objects of one kind as last listed and watched; lives on the reactor thread.

    ``on_change(cache)`` runs after every change.  ``synced`` is True once a
    first list has been applied.
    """

    def __init__(self, kind: str, on_change=lambda cache: None):
        self.kind = kind
        self.on_change = on_change
        self.objects = {}
        self.synced = False

    def replace(self, items) -> None:
        """A (re)list: the items are now the whole state."""
        self.objects = {object_key(item): item for item in items}
        self.synced = True
        self.on_change(self)

    def apply(self, event_type: str, obj: dict) -> None:
        """One watch event: ADDED, MODIFIED or DELETED."""
        key = object_key(obj)
        if event_type == "DELETED":
            if self.objects.pop(key, None) is None:
                return
        else:
            self.objects[key] = obj
        self.on_change(self)

    def values(self) -> list:
        """The objects, in ``(namespace, name)`` order."""
        return [self.objects[key] for key in sorted(self.objects)]


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): relist."""


class NotReadable(Exception):
    """The list answered 404 (the kind is not served: its CRD is not installed) or 401/403 (no RBAC).

    The kind counts as empty -- after a 404 always, after a 401/403 only if
    it was never listed (a revoked right does not delete what was read) --
    so the other kinds of its source are not held back; it is listed again
    after a backoff.
    """

    @property
    def empties(self) -> bool:
        """Whether the kind's state becomes empty (see the class docstring)."""
        return getattr(self.__cause__, "status", None) == 404


class Reflector:
    """List-then-watch of one kind on a daemon thread, feeding an :class:`ObjectCache` on the reactor.

    ``lister(**kwargs)`` is a ``kubernetes`` client list method for all
    namespaces, e.g. ``CoreV1Api(api).list_service_for_all_namespaces`` or a
    ``functools.partial`` of ``CustomObjectsApi.list_cluster_custom_object``.
    """

    def __init__(self, reactor, kind: str, lister, cache: ObjectCache, *, watch_timeout: int = WATCH_TIMEOUT,
                 backoff: Backoff = None):
        self.reactor = reactor
        self.kind = kind
        self.lister = lister
        self.cache = cache
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff(WATCH_BACKOFF_MIN, WATCH_BACKOFF_MAX, jitter=WATCH_BACKOFF_JITTER)
        self.resource_version = None  # None: (re)list first
        self.lists = 0       # lists done (the first one and every relist)
        self.restarts = 0    # lists and watches that failed (a watch ended by its timeout is no failure)
        self.last_error = None
        self._stop = threading.Event()
        self._watch = None
        self._thread = None
        self._emptied = False  # the cache was emptied because the kind is not readable

    # -- control (reactor thread) --------------------------------------------------------
    def prime(self) -> bool:
        """List once now, on the calling thread, before the reactor runs; False if that failed.

        The control plane's first snapshots then already hold this kind.
        """
        try:
            items, version = self._list(PRIME_TIMEOUT)
        except NotReadable as error:
            self._failed(error.__cause__)
            self._emptied = True
            self.cache.replace([])  # never listed before
            return True
        except Exception as error:
            self._failed(error)
            return False
        self.cache.replace(items)
        self.resource_version = version
        return True

    def start(self) -> None:
        """Start the thread (it lists first unless :meth:`prime` did)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"kube-watch-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end now: set the flag and close the open watch, if any (call again freely)."""
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.stop()

    @property
    def alive(self) -> bool:
        """Whether the thread still runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    items, version = self._list()
                    if self._stop.is_set():
                        return
                    self.reactor.callFromThread(self.cache.replace, items)
                    self.resource_version = version
                self._watch_once()
                self.backoff.reset()
            except NotReadable as error:
                self._failed(error.__cause__)
                self.restarts += 1
                if (error.empties or self.lists == 0) and not self._emptied:
                    self._emptied = True
                    self.reactor.callFromThread(self.cache.replace, [])
                self._stop.wait(self.backoff.next())
            except WatchExpired as error:
                log.info("kubernetes: {kind} watch from resourceVersion {version} expired ({error}); relisting",
                         kind=self.kind, version=self.resource_version, error=str(error))
                self.resource_version = None
            except Exception as error:
                if self._stop.is_set():
                    return
                self._failed(error)
                self.restarts += 1
                self._stop.wait(self.backoff.next())

    def _failed(self, error) -> None:
        text = describe_error(error)
        if text != self.last_error:
            log.warn("kubernetes: {kind} list/watch failed: {error}; retrying with backoff, the last known "
                     "state keeps serving", kind=self.kind, error=text)
        self.last_error = text

    def _resumed(self) -> None:
        if self.last_error is not None:
            log.info("kubernetes: {kind} watch resumed from resourceVersion {version}", kind=self.kind,
                     version=self.resource_version)
            self.last_error = None

    def _list(self, timeout=LIST_TIMEOUT) -> tuple:
        """Every object of the kind (all pages) and the list's resourceVersion."""
        items, token = [], None
        while True:
            kwargs = {"limit": PAGE_SIZE, "_preload_content": False, "_request_timeout": timeout}
            if token:
                kwargs["_continue"] = token
            try:
                response = self.lister(**kwargs)
            except Exception as error:
                if getattr(error, "status", None) in (401, 403, 404):
                    raise NotReadable() from error
                raise
            try:
                page = json.loads(response.data)
            finally:
                response.release_conn()
            items += page.get("items") or []
            metadata = page.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                break
        self.lists += 1
        self._emptied = False
        if self.last_error is not None:
            log.info("kubernetes: {kind} listed again ({count} objects); watching resumes",
                     kind=self.kind, count=len(items))
            self.last_error = None
        return items, metadata.get("resourceVersion")

    def _watch_once(self) -> None:
        """One watch from ``resource_version`` until the server ends it (or an error, or stop)."""
        from kubernetes.client.rest import ApiException

        watch = raw_watch()
        self._watch = watch
        try:
            if self._stop.is_set():
                return
            stream = watch.stream(self.lister, resource_version=self.resource_version,
                                  allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout,
                                  _request_timeout=(LIST_TIMEOUT[0], self.watch_timeout + 30))
            for event in stream:
                if self._stop.is_set():
                    return
                self._resumed()
                self._event(event)
        except ApiException as error:
            if error.status == 410:
                raise WatchExpired(error.reason) from None
            raise
        finally:
            self._watch = None
            watch.stop()

    def _event(self, event: dict) -> None:
        """ADDED/MODIFIED/DELETED go to the cache; every event, BOOKMARKs too, advances the version.

        (The client turns ERROR events into an ``ApiException``.)
        """
        kind, obj = event.get("type"), event.get("raw_object") or {}
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self.reactor.callFromThread(self.cache.apply, kind, obj)
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = version


def stop_reflectors(reactor, reflectors, name: str, grace: float = 2.0):
    """Stop every reflector's thread; a Deferred that fires once all ended, or after ``grace`` seconds.

    Threads still running then are logged (they are daemon threads: they do
    not hold the process).  ``name`` says whose reflectors they are, for that log.
    """
    deadline = reactor.seconds() + grace
    done = defer.Deferred()

    def check():
        alive = [reflector for reflector in reflectors if reflector.alive]
        for reflector in alive:
            reflector.stop()  # again: a watch may have opened since the last call
        if not alive or reactor.seconds() >= deadline:
            if alive:
                log.warn("{name}: watch threads still running at shutdown: {kinds}", name=name,
                         kinds=", ".join(reflector.kind for reflector in alive))
            poller.stop()
            done.callback(None)

    poller = task.LoopingCall(check)
    poller.clock = reactor
    poller.start(0.02)
    return done


class WatchingService(service.Service):
    """A Twisted service that list-watches some kinds and reacts to their changes, coalesced.

    It owns one :class:`Reflector` and :class:`ObjectCache` per kind (``listers``
    maps a kind's name to its list method; ``self.caches[kind]`` holds its
    objects); the watch threads run while the service does.  A change of any
    cache, while running, schedules one call of :meth:`settled` ``coalesce``
    seconds later (changes meanwhile join it).  Base of the config sources
    (:mod:`mesh.control.kube.source`) and of the writers (:mod:`mesh.control.kube.reconcile`).
    """

    name = "kubernetes"
    cache_class = ObjectCache  #: the cache of each kind (a subclass may keep less of each object)

    def __init__(self, reactor, listers: dict, *, coalesce: float = 0.05):
        self.reactor = reactor
        self.coalesce = coalesce
        self.caches = {}
        self.reflectors = []
        self._timer = None
        for kind, lister in listers.items():
            cache = self.cache_class(kind, self.cache_changed)
            self.caches[kind] = cache
            self.reflectors.append(Reflector(reactor, kind, lister, cache))

    def settled(self) -> None:
        """The caches changed (``coalesce`` seconds ago, or as :meth:`schedule` asked): act on them."""
        raise NotImplementedError

    @property
    def synced(self) -> bool:
        """Whether every kind has been listed at least once."""
        return all(cache.synced for cache in self.caches.values())

    def schedule(self, delay: float = None) -> None:
        """Call :meth:`settled` after ``delay`` (default: ``coalesce``) unless a call is scheduled already."""
        if self.running and (self._timer is None or not self._timer.active()):
            self._timer = self.reactor.callLater(self.coalesce if delay is None else delay, self.settled)

    def cache_changed(self, cache) -> None:
        """``cache`` changed: schedule :meth:`settled` (subclasses may extend this)."""
        self.schedule()

    def startService(self):
        super().startService()
        for reflector in self.reflectors:
            reflector.start()
        log.info("{name}: watching {kinds}", name=self.name, kinds=", ".join(self.caches))

    def stopService(self):
        """Stop every watch thread; the Deferred fires once they ended (at most ~2 s)."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        return stop_reflectors(self.reactor, self.reflectors, self.name)


@functools.cache
def _raw_watch_class():
    from kubernetes import watch

    class RawWatch(watch.Watch):
        """A Watch whose events carry the objects as plain dicts (``raw_object``), not as models."""

        def get_return_type(self, func):
            return None

    return RawWatch


def raw_watch():
    """A ``kubernetes.watch.Watch`` yielding events with plain-dict objects.

    The client still turns an ERROR event into an ``ApiException`` (410 for an
    expired resourceVersion); only the model deserialisation is skipped.
    """
    return _raw_watch_class()()


def describe_error(error) -> str:
    """A one-line description of a list/watch failure."""
    status = getattr(error, "status", None)
    if status is not None and getattr(error, "reason", None) is not None:
        if status == 404:
            return (f"404 Not Found ({error.reason}): the API server does not serve this resource; install "
                    "its CustomResourceDefinition (deploy/base/crds) or leave out the option that reads it")
        if status in (401, 403):
            return (f"{status} {error.reason}: mesh-control's service account may not list/watch it; apply "
                    "deploy/base/control-plane/rbac.yaml")
        return f"{status} {error.reason}"
    cause = getattr(error, "reason", None)  # urllib3's MaxRetryError: the last connection error
    if isinstance(cause, Exception):
        return f"cannot reach the API server: {cause}"
    return f"{type(error).__name__}: {error}"
