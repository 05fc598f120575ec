"""Keeping objects in the Kubernetes API as mesh-control wants them: watch, compare, write on a thread.

A :class:`Reconciler` is a Twisted service that owns list-then-watch
:class:`~mesh.control.kube.watch.Reflector` objects (the kinds it reads) and keeps a
set of *keys* (e.g. one namespace per ConfigMap) in sync.  Subclasses say
which keys there are (:meth:`Reconciler.keys`), whether one is in sync
(:meth:`Reconciler.state`) and how to write it (:meth:`Reconciler.write`,
run on a thread of the reactor's pool, never on the reactor).

- Every cache change schedules one pass ``coalesce`` seconds later (a burst
  of events is one pass); nothing happens before every kind was listed once.
- A pass starts a write for each key out of sync that is not being written
  already; a key that changes while its write runs is looked at again after
  it.  Just before the write goes to its thread the key is checked again,
  so a write that the watch has meanwhile shown to be done is skipped.
- Writes are idempotent by design (``write`` compares before it writes and
  handles 409 Conflict/AlreadyExists by reading the object again), so several
  replicas may reconcile the same objects at once.
- Pacing: a key written (or tried) again within :data:`QUIET` seconds of its
  last attempt first waits a capped, jittered backoff (0.2 s doubling to
  30 s).  That bounds retries after failures, and a tug of war with another
  writer -- e.g. two replicas with different trust bundles during a rolling
  restart -- costs a write every 30 s instead of a hot loop; it is logged.
- A failed write is logged once per key and distinct message, then retried
  with the same pacing; the log says when the key is in sync again.

``writes`` counts the writes done, per result (``created``, ``updated``,
``failed``), for the metrics (:mod:`mesh.control.kube.metrics`).
"""

from __future__ import annotations

import json

from twisted.internet import threads
from twisted.logger import Logger

from mesh.backoff import Backoff
from mesh.control.kube.watch import WATCH_BACKOFF_JITTER, WatchingService, describe_error

log = Logger()

#: Seconds after which a key's next write needs no backoff.
QUIET = 10.0
#: ``(connect, read)`` timeouts of the reads and writes.
API_TIMEOUT = (5.0, 10.0)
#: Attempts of one write (each 409 re-reads the object and tries again) before it counts as failed.
ATTEMPTS = 5


class TooManyConflicts(Exception):
    """The object changed under every attempt of a write (409 each time)."""


#: Attempts of one key in a row, each within QUIET seconds of the last, that make a tug of war worth a log line.
CONTESTED = 8


class _Pace:
    """When the next write of one key may start: at once after a quiet period, else after a backoff."""

    def __init__(self):
        self.backoff = Backoff(initial=0.2, maximum=30.0, jitter=WATCH_BACKOFF_JITTER)
        self.last = None  # reactor time at which the last attempt started (after its delay)
        self.streak = 0  # attempts in a row, each within QUIET seconds of the one before

    def delay(self, now: float) -> float:
        """The delay before the attempt scheduled now; counts it."""
        if self.last is not None and now - self.last < QUIET:
            self.streak += 1
            delay = self.backoff.next()
        else:
            self.backoff.reset()
            self.streak = 0
            delay = 0.0
        self.last = now + delay
        return delay


def api_status(error):
    """The HTTP status of a ``kubernetes`` ``ApiException`` (None for other errors)."""
    from kubernetes.client.exceptions import ApiException

    return error.status if isinstance(error, ApiException) else None


def read_object(call, *args):
    """``call(*args)`` (a ``read_*`` method of the client) as a plain dict, or None on 404 Not Found."""
    try:
        response = call(*args, _preload_content=False, _request_timeout=API_TIMEOUT)
    except Exception as error:
        if api_status(error) == 404:
            return None
        raise
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


class Reconciler(WatchingService):
    """Watches some kinds and keeps keys in sync by writing from threads; see the module docstring.

    ``listers`` maps a kind's name to its list method (as for
    :class:`~mesh.control.kube.watch.Reflector`); ``self.caches[kind]`` holds its objects.
    """

    #: What one key names, for logs (e.g. ``ConfigMap {key}/txmesh-ca-root-cert``).
    what = "{key}"

    def __init__(self, reactor, listers: dict, *, coalesce: float = 0.05):
        super().__init__(reactor, listers, coalesce=coalesce)
        self.writes = {"failed": 0}  # result -> count
        self._busy = set()  # keys with a write scheduled or running
        self._again = set()  # busy keys that changed meanwhile
        self._pace = {}
        self._errors = {}  # key -> the last failure logged

    # -- to be provided by subclasses --------------------------------------------------------
    def keys(self):
        """Every key that should be in sync now (reactor thread)."""
        raise NotImplementedError

    def state(self, key) -> tuple:
        """``(in_sync, current)``: whether ``key`` is as wanted, and its cached object (or None)."""
        raise NotImplementedError

    def write(self, key, current):
        """Make ``key`` as wanted, starting from ``current`` (a hint: re-read on 409); on a thread.

        Returns ``"created"`` or ``"updated"`` for a write done, None when none
        was needed after all; raises on failure.
        """
        raise NotImplementedError

    # -- passes ---------------------------------------------------------------------------------
    def settled(self) -> None:
        """One pass: start a write for every key out of sync (see the module docstring)."""
        if not self.synced:
            return
        for key in self.keys():
            if not self.state(key)[0]:
                if key in self._busy:
                    self._again.add(key)
                else:
                    self._busy.add(key)
                    pace = self._pace.setdefault(key, _Pace())
                    self.reactor.callLater(pace.delay(self.reactor.seconds()), self._attempt, key)

    def _attempt(self, key) -> None:
        if not self.running or key not in self.keys():
            self._busy.discard(key)
            return
        in_sync, current = self.state(key)
        if in_sync:  # e.g. another replica wrote it
            self._recovered(key)
            self._done(key)
            return
        if self._pace[key].streak == CONTESTED and key not in self._errors:
            log.warn("{name}: {what} keeps being changed back; another writer disagrees (another mesh-control "
                     "replica with a different trust bundle, during a rolling restart?); writing it every "
                     "{seconds:.0f} s at most", name=self.name, what=self.what.format(key=key),
                     seconds=self._pace[key].backoff.maximum)
        writing = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.write, key, current)
        writing.addCallbacks(self._written, self._failed, callbackArgs=(key,), errbackArgs=(key,))

    def _written(self, result, key) -> None:
        if result:
            self.writes[result] = self.writes.get(result, 0) + 1
            log.info("{name}: {result} {what}", name=self.name, result=result, what=self.what.format(key=key))
        self._recovered(key)
        self._done(key)

    def _recovered(self, key) -> None:
        if self._errors.pop(key, None) is not None:
            log.info("{name}: {what} is in sync again", name=self.name, what=self.what.format(key=key))

    def _failed(self, failure, key) -> None:
        self.writes["failed"] += 1
        error = failure.value
        if api_status(error) in (401, 403):
            text = (f"{error.status} {error.reason}: mesh-control's service account may not write it; apply "
                    "deploy/base/control-plane/rbac.yaml")
        else:
            text = describe_error(error)
        if self._errors.get(key) != text:
            self._errors[key] = text
            log.warn("{name}: cannot write {what}: {error}; retrying with backoff", name=self.name,
                     what=self.what.format(key=key), error=text)
        self._again.add(key)
        self._done(key)

    def _done(self, key) -> None:
        self._busy.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.schedule(0)
