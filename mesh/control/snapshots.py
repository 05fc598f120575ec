"""Snapshots shared between proxies: each distinct snapshot is built, hashed and encoded once.

Most proxies of a mesh see the same config as many others: the replicas of a
workload, and every workload of a namespace without selector-bound policies.
The :class:`~mesh.control.distribution.Distributor` therefore builds a
:class:`View` (the scoped documents and their digests) once per *view key*
(:func:`mesh.control.distribution.view_key`: everything of a workload the
scoping reads) and keeps it while the inputs it was built from (its
``token``) stay the same.  A :class:`Snapshot` adds what may still differ
between proxies of one view -- the warnings for the proxy's log -- and the
trust bundle; its SNAPSHOT frame is encoded on first use and then written,
as the same bytes, to every proxy that gets it.
"""

from __future__ import annotations

import hashlib

from mesh import protocol as proto


def digest(text: str | bytes) -> str:
    """The hex SHA-256 of ``text``."""
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


class Snapshot:
    """One snapshot: its version (a hash of exactly its content) and its frame, encoded once.

    Several proxies may hold the same object: it is never changed after it is made.
    """

    __slots__ = ("version", "documents", "warnings", "trust_bundle", "credentials", "_frame", "_error")

    def __init__(self, version: str, documents: list, warnings: list, trust_bundle: str, credentials=None):
        self.version = version
        self.documents = documents
        self.warnings = warnings
        self.trust_bundle = trust_bundle
        self.credentials = credentials or {}  # a gateway's Secrets: {name: {file name: PEM}}
        self._frame = None
        self._error = None

    def frame(self) -> bytes:
        """The SNAPSHOT frame; raises :class:`~mesh.protocol.ProtocolError` if it is over the frame limit."""
        if self._frame is None:
            if self._error is not None:
                raise self._error
            extra = {"credentials": proto.credentials_field(self.credentials)} if self.credentials else {}
            try:
                self._frame = proto.encode(proto.message(
                    proto.SNAPSHOT, version=self.version, resources=self.documents,
                    trust_bundle=self.trust_bundle, warnings=list(self.warnings), **extra))
            except proto.ProtocolError as error:
                self._error = error
                raise
        return self._frame


class View:
    """The documents proxies of one view key get, built from inputs identified by ``token``.

    ``digests`` are the documents' content hashes, in order (and the
    credentials' hash, if any): the snapshot version hashes them, so equal
    content gives equal versions whatever proxy, view or control plane
    restart it comes from, and a rotated Secret gives a new version.
    ``credentials``: the Secrets a gateway proxy gets, ``{name: {file name: PEM}}``.
    """

    __slots__ = ("token", "documents", "credentials", "_digest", "_snapshots")

    def __init__(self, token, documents: list, digests: list, credentials=None):
        self.token = token
        self.documents = documents
        self.credentials = credentials or {}
        self._digest = digest("\n".join(digests))
        self._snapshots = {}  # (warnings, bundle digest) -> Snapshot

    def snapshot(self, warnings: tuple, bundle_pem: bytes, bundle_digest: str) -> Snapshot:
        """The snapshot of this view with ``warnings`` and the trust bundle (made once per pair)."""
        key = (warnings, bundle_digest)
        snapshot = self._snapshots.get(key)
        if snapshot is None:
            parts = [self._digest, *(digest(text) for text in warnings), bundle_digest]
            snapshot = Snapshot(digest("\n".join(parts))[:16], self.documents, list(warnings), bundle_pem.decode(),
                                self.credentials)
            self._snapshots[key] = snapshot
        return snapshot
