"""The control plane's per-resource store: the last good version of every resource.

Config sources (:mod:`mesh.control.sources`) hand the store the *whole*
current content of their scope after every change, as a
:class:`mesh.config.loader.LoadResult`.  The store validates each resource on
its own and keeps, per key ``(kind, namespace, name)``:

- a **valid** resource replaces its previous version;
- an **invalid** resource is rejected alone: its last good version stays in
  force (or it stays absent if it was never valid), and the rejection is
  recorded (:attr:`ResourceStore.errors`, each a
  :class:`mesh.config.errors.ConfigError` printing ``FILE:LINE: ...``) and
  logged;
- a resource that is gone (its file deleted, or its document removed) is
  removed -- unless its file could not be read or parsed this time (a YAML
  syntax error, a half-written file), in which case everything that file
  defined keeps its last good version.

Every change that alters the resources in force bumps :attr:`generation`,
recomputes :attr:`version` (a hash of the resources, the same hash a
standalone proxy reports for the same files) and calls the subscribers with
the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from twisted.logger import Logger

from mesh.config import hosts as hostnames
from mesh.config.compile import config_version
from mesh.config.loader import LoadResult, Resource
from mesh.config.validate import validate

log = Logger()


@dataclass(frozen=True)
class Entry:
    """One resource in force: its raw form (file, line, spec) and its validated object."""

    resource: Resource
    obj: object
    source: str
    applied_at: float


@dataclass(frozen=True)
class Rejection:
    """A rejected resource (or unreadable document), for status pages.

    ``kept`` is ``FILE:LINE`` of the last good version still in force, or
    None when the resource has no good version (it is absent).
    """

    error: object
    kept: str | None
    source: str

    def describe(self) -> dict:
        return {"error": str(self.error), "file": self.error.file, "line": self.error.line,
                "kind": self.error.kind, "namespace": self.error.namespace, "name": self.error.name,
                "kept": self.kept}


@dataclass(frozen=True)
class Change:
    """What one update did: keys added, updated, removed, and kept despite an error."""

    added: tuple = ()
    updated: tuple = ()
    removed: tuple = ()
    kept: tuple = ()
    errors_changed: bool = False

    @property
    def applied(self) -> bool:
        """Whether the resources in force changed."""
        return bool(self.added or self.updated or self.removed)


def _same(a: Resource, b: Resource) -> bool:
    """Whether two versions of a resource mean the same thing (lines and files may differ)."""
    return (a.api_version == b.api_version and a.spec == b.spec
            and a.metadata.get("labels") == b.metadata.get("labels"))


def _key(error) -> tuple | None:
    return (error.kind, error.namespace, error.name) if error.kind is not None else None


class ResourceStore:
    """Resources in force, keyed by ``(kind, namespace, name)``, fed by config sources."""

    def __init__(self, domain: str = hostnames.DEFAULT_DOMAIN, clock=time.time):
        self.domain = domain
        self._clock = clock
        self._entries = {}       # key -> Entry
        self._rejections = {}    # source name -> [Rejection]
        self._subscribers = []
        self.generation = 0
        self.version = config_version(())
        self.updated_at = None

    # -- reading -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> Entry | None:
        return self._entries.get(key)

    def keys(self) -> list:
        return sorted(self._entries)

    @property
    def resources(self) -> list:
        """The raw :class:`Resource` of every resource in force, in key order."""
        return [self._entries[key].resource for key in sorted(self._entries)]

    @property
    def objects(self) -> list:
        """The validated object of every resource in force, in key order."""
        return [self._entries[key].obj for key in sorted(self._entries)]

    @property
    def rejections(self) -> list:
        return sorted((r for rs in self._rejections.values() for r in rs),
                      key=lambda r: (r.error.file, r.error.line))

    @property
    def errors(self) -> list:
        """The current problems (ConfigError objects), by file and line."""
        return [rejection.error for rejection in self.rejections]

    def summary(self) -> dict:
        """JSON-able state for the admin port and ``meshctl proxy-status``."""
        return {"version": self.version, "generation": self.generation, "resources": len(self._entries),
                "updated_at": self.updated_at,
                "rejected": [rejection.describe() for rejection in self.rejections]}

    # -- subscribers ---------------------------------------------------------------------
    def subscribe(self, callback) -> None:
        """Call ``callback(store, change)`` after every update that changed the resources in force
        or the list of rejections (``change.applied`` tells which)."""
        self._subscribers.append(callback)

    # -- updates -------------------------------------------------------------------------
    def update(self, result: LoadResult, source: str = "files") -> Change:
        """Take the full current content of ``source``; validate and apply it resource by resource."""
        objects, problems = validate(result.resources, self.domain)
        errors = list(result.errors) + list(problems)
        error_keys = {_key(error) for error in errors} - {None}
        broken_files = {error.file for error in errors if error.kind is None}
        valid = {obj.source.key: (obj.source, obj) for obj in objects}
        now = self._clock()

        added, updated, removed, kept = [], [], [], []
        entries = {key: entry for key, entry in self._entries.items() if entry.source != source}
        for key, (resource, obj) in valid.items():
            other = entries.get(key)
            if other is not None:  # another source defines it already: first come, first kept
                errors.append(resource.error(("metadata", "name"), (
                    f"{key[0]} {key[1]}/{key[2]} is already defined by config source {other.source} "
                    f"({other.resource.file}:{other.resource.line}); this definition is ignored")))
                continue
            previous = self._entries.get(key)
            if previous is None or previous.source != source:
                added.append(key)
                entries[key] = Entry(resource, obj, source, now)
            elif not _same(previous.resource, resource):
                updated.append(key)
                entries[key] = Entry(resource, obj, source, now)
            else:  # same meaning: keep the new lines, and the time it was first applied
                entries[key] = Entry(resource, obj, source, previous.applied_at)
        for key, previous in self._entries.items():
            if previous.source != source or key in valid:
                continue
            if key in error_keys or previous.resource.file in broken_files:
                entries[key] = previous
                kept.append(key)
            else:
                removed.append(key)

        rejections = []
        for error in errors:
            key = _key(error)
            entry = entries.get(key) if key is not None else None
            kept_at = f"{entry.resource.file}:{entry.resource.line}" if entry is not None else None
            rejections.append(Rejection(error, kept_at, source))
        old = {str(r.error) for r in self._rejections.get(source, ())}
        self._rejections[source] = rejections
        for rejection in rejections:
            if str(rejection.error) not in old:
                consequence = (f"the last good version ({rejection.kept}) stays in force" if rejection.kept
                               else "it is not applied")
                log.error("config rejected: {error}; {consequence}", error=str(rejection.error),
                          consequence=consequence)
        errors_changed = old != {str(r.error) for r in rejections}
        for text in sorted(old - {str(r.error) for r in rejections}):
            log.info("config problem fixed: {error}", error=text)

        change = Change(tuple(sorted(added)), tuple(sorted(updated)), tuple(sorted(removed)),
                        tuple(sorted(kept)), errors_changed)
        self._entries = entries
        if change.applied or self.updated_at is None:
            self.generation += 1
            self.version = config_version(entry.obj for entry in entries.values())
            self.updated_at = now
            log.info("config {version} (generation {generation}) from {source}: {count} resource(s); "
                     "{added} added, {updated} updated, {removed} removed, {rejected} rejected",
                     version=self.version, generation=self.generation, source=source, count=len(entries),
                     added=len(added), updated=len(updated), removed=len(removed), rejected=len(rejections))
        if change.applied or errors_changed:
            for callback in list(self._subscribers):
                try:
                    callback(self, change)
                except Exception:
                    log.failure("a config store subscriber failed")
        return change
