"""The object store of the test Kubernetes API server: what etcd is to a real one.

Objects are JSON dicts, kept per *storage* key (one per resource, e.g. ``"/pods"``,
``"txmesh.io/virtualservices"``) and per ``(namespace, name)``. Every write takes the next value of one
global, monotonically increasing revision, which becomes the object's ``metadata.resourceVersion``, and
appends a :class:`Change` to the history. Watchers (callbacks per storage key) hear each change as it is
made. :meth:`Store.compact` forgets the history: a watch that asks for changes after an older revision
then gets :class:`Expired`, as etcd's compaction makes a real API server answer 410 Gone.

The store knows nothing about HTTP or resource semantics (see :mod:`tests.harness.kuberesources`).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Change:
    """One write: ``type`` is ADDED, MODIFIED or DELETED; ``old`` is the object before it (None for ADDED),
    ``new`` the object after it (for DELETED, the last state stamped with the deletion's revision)."""

    revision: int
    storage: str
    type: str
    old: dict | None
    new: dict


class Expired(Exception):
    """A watch asked for changes after a revision older than the compacted history."""

    def __init__(self, requested: int, compacted: int):
        super().__init__(f"too old resource version: {requested} ({compacted})")
        self.requested = requested
        self.compacted = compacted


def _key(obj: dict) -> tuple[str, str]:
    metadata = obj["metadata"]
    return metadata.get("namespace", ""), metadata["name"]


class Store:
    """Objects by storage key and (namespace, name); the global revision; the history of changes; watchers."""

    def __init__(self):
        self.revision = 1  # like etcd, whose first revision is 1 before any write
        self.compacted = 0
        self._objects: dict[str, dict[tuple[str, str], dict]] = defaultdict(dict)
        self._history: list[Change] = []
        self._watchers: dict[str, list] = defaultdict(list)

    def get(self, storage: str, namespace: str, name: str) -> dict | None:
        """A copy of the object, or None."""
        obj = self._objects[storage].get((namespace or "", name))
        return copy.deepcopy(obj) if obj is not None else None

    def items(self, storage: str, namespace: str | None = None) -> list[dict]:
        """Copies of the objects of *storage* (in *namespace* if given), ordered by namespace and name."""
        objects = self._objects[storage]
        return [copy.deepcopy(objects[key]) for key in sorted(objects)
                if namespace is None or key[0] == namespace]

    def items_at(self, storage: str, revision: int, namespace: str | None = None) -> list[dict]:
        """As :meth:`items`, but as they were at *revision* (an MVCC read, as etcd serves the later pages of
        a paginated list); :class:`Expired` if the history back to it was compacted."""
        if revision < self.compacted:
            raise Expired(revision, self.compacted)
        objects = dict(self._objects[storage])
        for change in reversed(self._history):
            if change.revision <= revision:
                break
            if change.storage == storage:
                if change.old is None:
                    objects.pop(_key(change.new), None)
                else:
                    objects[_key(change.old)] = change.old
        return [copy.deepcopy(objects[key]) for key in sorted(objects) if namespace is None or key[0] == namespace]

    def put(self, storage: str, obj: dict) -> dict:
        """Create or replace *obj* at the next revision; return the stored copy."""
        self.revision += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(self.revision)
        old = self._objects[storage].get(_key(stored))
        self._objects[storage][_key(stored)] = stored
        self._record(Change(self.revision, storage, "MODIFIED" if old else "ADDED", old, stored))
        return copy.deepcopy(stored)

    def remove(self, storage: str, namespace: str, name: str) -> dict:
        """Delete the object at the next revision; return its last state stamped with that revision."""
        self.revision += 1
        old = self._objects[storage].pop((namespace or "", name))
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self.revision)
        self._record(Change(self.revision, storage, "DELETED", old, gone))
        return copy.deepcopy(gone)

    def _record(self, change: Change) -> None:
        self._history.append(change)
        for callback in list(self._watchers[change.storage]):
            callback(change)

    def changes_since(self, storage: str, revision: int) -> list[Change]:
        """The changes of *storage* after *revision*, oldest first; :class:`Expired` if compacted away."""
        if revision < self.compacted:
            raise Expired(revision, self.compacted)
        return [change for change in self._history if change.revision > revision and change.storage == storage]

    def compact(self) -> int:
        """Forget the history up to the current revision (as etcd's compaction does); return that revision."""
        self.compacted = self.revision
        self._history.clear()
        return self.compacted

    def subscribe(self, storage: str, callback):
        """Call ``callback(change)`` for every later change of *storage*; return a function that stops it."""
        self._watchers[storage].append(callback)
        return lambda: self._watchers[storage].remove(callback)
