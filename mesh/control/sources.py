"""Config sources of the control plane: where resources come from.

A config source provides :class:`IConfigSource`.  It is a Twisted service:
once started, it calls ``on_update(LoadResult)`` with the *whole* current
content of its scope, at start and after every change; the
:class:`mesh.control.store.ResourceStore` works out, resource by resource,
what changed, what is invalid and what was deleted.

Sources come from the ``mesh_config_sources(options)`` hook.  The built-in
implementation (:class:`BuiltinConfigSources`, ``builtin.config_sources`` in
:data:`mesh.plugins.DEFAULT_PLUGINS`) returns a :class:`DirectorySource` for
``--config-dir``.  A plugin can add a source (Kubernetes, a git checkout, an
HTTP endpoint) the same way, or disable the built-in one
(``--disable-plugin builtin.config_sources``).

:class:`DirectorySource` loads every ``*.yaml``/``*.yml`` of a directory
(multi-document) and watches it: with ``twisted.internet.inotify`` on Linux,
else by polling the files' (name, inode, size, mtime) once a second.  Editors
write files in several steps (truncate, write, rename, chmod), so events are
debounced: the directory is reloaded ``debounce`` seconds after the last
event (default 0.1 s), and at the latest ``max_delay`` seconds after the
first one (default 1 s), so a file rewritten in a loop still gets applied.
"""

from __future__ import annotations

import dataclasses
import os

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import filepath
from zope.interface import Attribute, Interface, implementer

import mesh
from mesh.config.errors import ConfigError
from mesh.config.loader import LoadResult, load_dir

log = Logger()

_SUFFIXES = (".yaml", ".yml")


class IConfigSource(Interface):
    """A place resources come from (see the module docstring)."""

    name = Attribute("A short name for logs and errors, e.g. ``files:/etc/mesh``.")

    def load():
        """Read the whole current content now: a :class:`mesh.config.loader.LoadResult`."""

    def watch(on_update):
        """Call ``on_update(LoadResult)`` with the whole content after every change, once started."""


class BuiltinConfigSources:
    """``builtin.config_sources``: the ``--config-dir`` directory source (idle in a sidecar)."""

    def __init__(self):
        self.reactor = None

    @mesh.hookimpl
    def mesh_configure(self, config):
        if config.role != "control":
            config.set_idle(self, "control plane only")
            return
        self.reactor = config.reactor

    @mesh.hookimpl
    def mesh_config_sources(self, options):
        config_dir = options.get("config_dir") or options.get("config-dir")
        if not config_dir:
            return None
        return DirectorySource(config_dir, self.reactor)


def _fingerprint(path: str) -> dict:
    """``{name: (inode, size, mtime_ns)}`` of the YAML files of a directory (empty if it is missing)."""
    found = {}
    try:
        names = os.listdir(path)
    except OSError:
        return found
    for name in names:
        if not name.endswith(_SUFFIXES):
            continue
        try:
            stat = os.stat(os.path.join(path, name))
        except OSError:
            continue
        found[name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return found


@implementer(IConfigSource)
class DirectorySource(service.Service):
    """Every YAML file of one directory, watched (inotify, or polling as a fallback)."""

    def __init__(self, path, reactor=None, debounce: float = 0.1, max_delay: float = 1.0,
                 poll_interval: float = 1.0, use_inotify: bool = True):
        if reactor is None:
            from twisted.internet import reactor
        self.path = os.path.abspath(os.fspath(path))
        self.name = f"files:{self.path}"
        self.reactor = reactor
        self.debounce = debounce
        self.max_delay = max_delay
        self.poll_interval = poll_interval
        self.use_inotify = use_inotify
        self.mode = None  # "inotify" or "polling" once started
        self.reloads = 0
        self._on_update = None
        self._notifier = None
        self._poller = None
        self._fingerprint = None
        self._timer = None
        self._first_event_at = None

    # -- IConfigSource ------------------------------------------------------------------
    def load(self) -> LoadResult:
        try:
            result = load_dir(self.path)
        except OSError as error:
            result = LoadResult(errors=[ConfigError(file=self.path, line=0, reason=(
                f"cannot read the config directory: {error}; create it or fix --config-dir "
                "(its resources keep their last good version meanwhile)"))])
        self._fingerprint = _fingerprint(self.path)
        self.reloads += 1
        return result

    def watch(self, on_update) -> None:
        self._on_update = on_update

    # -- service ----------------------------------------------------------------------------
    def startService(self):
        super().startService()
        if self.use_inotify and self._start_inotify():
            self.mode = "inotify"
            # a slow resync as a safety net (inotify queue overflow, a replaced directory)
            interval = max(self.poll_interval, 10.0)
        else:
            self.mode = "polling"
            interval = self.poll_interval
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self.path)
        self._poller = LoopingCall(self._poll)
        self._poller.clock = self.reactor
        self._poller.start(interval, now=False)
        log.info("watching {path} for config changes ({mode})", path=self.path, mode=self.mode)

    def stopService(self):
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        return super().stopService()

    def _start_inotify(self) -> bool:
        try:
            from twisted.internet import inotify
            notifier = inotify.INotify(self.reactor)
            notifier.startReading()
            mask = (inotify.IN_CREATE | inotify.IN_DELETE | inotify.IN_MODIFY | inotify.IN_CLOSE_WRITE
                    | inotify.IN_MOVED_FROM | inotify.IN_MOVED_TO | inotify.IN_ATTRIB
                    | inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF)
            notifier.watch(filepath.FilePath(self.path), mask=mask, callbacks=[self._event])
        except Exception as error:  # no inotify (not Linux, limits reached) or no directory yet
            log.warn("inotify unavailable for {path} ({error}); polling every {interval}s instead",
                     path=self.path, error=error, interval=self.poll_interval)
            return False
        self._notifier = notifier
        return True

    # -- change detection -----------------------------------------------------------------
    def _event(self, _watch, path, mask):
        name = path.basename()
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if path.path not in (self.path, self.path.encode()) and not name.endswith(_SUFFIXES) \
                and not name.startswith(".."):  # ..data: Kubernetes ConfigMap volumes swap a symlink
            return
        self.changed()

    def _poll(self):
        if _fingerprint(self.path) != self._fingerprint:
            self.changed()

    def changed(self):
        """Something in the directory changed: reload after the debounce delay."""
        now = self.reactor.seconds()
        if self._first_event_at is None:
            self._first_event_at = now
        delay = min(self.debounce, max(0.0, self._first_event_at + self.max_delay - now))
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self.reactor.callLater(delay, self._reload)

    def _reload(self):
        self._first_event_at = None
        result = self.load()
        if self._on_update is not None:
            try:
                self._on_update(result)
            except Exception:
                log.failure("applying the config of {path} failed", path=self.path)


def attach_config(control) -> list:
    """Give ``control`` (a ControlService) its resource store, fed by every config source.

    Asks the ``mesh_config_sources`` hook for the sources, loads each once now (so
    problems are logged before the control plane serves) and makes each a
    child service of ``control`` that keeps watching while it runs.  After
    every change, ``control.config_errors`` is the store's current error list
    and, when the resources in force changed, ``control.set_resources(raw
    resources in force)`` is called if the control service has that method.
    Returns the sources.
    """
    from mesh.control.store import ResourceStore

    store = ResourceStore()
    control.config_store = store

    def changed(store, change):
        control.config_errors = store.errors
        set_resources = getattr(control, "set_resources", None)
        if change.applied and set_resources is not None:
            set_resources(store.resources)

    store.subscribe(changed)
    options = dataclasses.asdict(control.settings)
    sources = [source for source in control.plugins.hook.mesh_config_sources(options=options)
               if source is not None]
    for source in sources:
        store.update(source.load(), source=source.name)
        source.watch(lambda result, name=source.name: store.update(result, source=name))
        if service.IService.providedBy(source):
            source.setServiceParent(control)
    control.config_errors = store.errors
    control.config_sources = sources
    return sources
