"""The common part of the Kubernetes config sources: reflectors, caches and coalesced updates.

A :class:`WatchedSource` is an :class:`~mesh.control.sources.IConfigSource`
and a Twisted service.  It owns one :class:`~mesh.control.kube.watch.Reflector`
(and its :class:`~mesh.control.kube.watch.ObjectCache`) per watched kind.  Every
cache change schedules one publication ``coalesce`` seconds later (50 ms
by default; changes meanwhile join it, so a burst of events becomes one
update); the publication translates the caches into a
:class:`~mesh.config.loader.LoadResult` (:meth:`WatchedSource.translate`,
per subclass) and calls ``on_update`` with it.  Nothing is published before
every kind has been listed once, so a half-read cluster (Services without
their Pods yet) never reaches the proxies.

:meth:`WatchedSource.load`, called once when the control plane starts
(before the reactor runs), lists every kind synchronously, so the first
snapshots already hold the cluster's state; if the API server cannot be
reached then, the source starts empty and its threads keep trying.
"""

from __future__ import annotations

from twisted.logger import Logger
from zope.interface import implementer

from mesh.config.loader import LoadResult
from mesh.control.kube.watch import WatchingService
from mesh.control.sources import IConfigSource

log = Logger()


@implementer(IConfigSource)
class WatchedSource(WatchingService):
    """An IConfigSource fed by list-and-watch of some Kubernetes kinds; see the module docstring.

    ``listers`` maps a kind's name (e.g. ``services``) to its list method.
    """

    def __init__(self, reactor, listers: dict, *, coalesce: float = 0.05):
        super().__init__(reactor, listers, coalesce=coalesce)
        self.updates = 0
        self._on_update = None
        self._loaded = False

    # -- to be provided by subclasses --------------------------------------------------------
    def translate(self) -> LoadResult:
        """The whole current content, from ``self.caches``."""
        raise NotImplementedError

    # -- IConfigSource ----------------------------------------------------------------------
    def load(self) -> LoadResult:
        if not self._loaded:
            self._loaded = True
            for reflector in self.reflectors:
                if not reflector.prime():
                    break  # the API server is unreachable: the threads keep trying
        return self.translate() if self.synced else LoadResult()

    def watch(self, on_update) -> None:
        self._on_update = on_update

    def settled(self) -> None:
        """Publish the whole translated content (once every kind was listed)."""
        if not self.synced or self._on_update is None:
            return
        self.updates += 1
        try:
            self._on_update(self.translate())
        except Exception:
            log.failure("{name}: applying the update failed", name=self.name)
