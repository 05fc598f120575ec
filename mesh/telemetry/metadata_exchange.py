"""``builtin.metadata_exchange``: sidecars tell each other which workload they serve.

A sidecar knows its own workload from its command line, and of its peer only
what the connection proves (a SPIFFE id: namespace and service account).  So
that both reporters' metrics and access logs name the workload, app and
version of *both* ends, as Istio's do, sidecars exchange workload metadata in
a header, as Istio's metadata exchange does with ``x-envoy-peer-metadata``:

1. The outbound sidecar adds :data:`HEADER` (its own metadata) to a request
   whose cluster is all mTLS endpoints (sidecars), never to plaintext or
   external destinations, which must not learn it.
2. The inbound sidecar takes :data:`HEADER` off every request before the app
   sees it, and believes it only from a caller whose identity the mTLS
   handshake verified, and only when its namespace is that identity's; it
   adds its own metadata to the response to such a caller.
3. The outbound sidecar takes the response's :data:`HEADER` off before its app
   sees it, and believes it because the endpoint's identity was verified.

What was believed is ``ctx.extra["peer_metadata"]``
(:data:`mesh.telemetry.peers.PEER_METADATA`), a
:class:`mesh.telemetry.peers.PeerMetadata`, for ``builtin.metrics`` and
``builtin.accesslog``.

The header has txmesh's own name: Istio's ``x-envoy-peer-metadata`` carries a
base64-encoded protobuf Struct, and an Envoy sidecar would misread anything
else under that name.  Its value is the URL-safe base64 of a small JSON
object (short keys, about 120 bytes),
like Istio's: opaque, ASCII, free of commas, so it survives header joining.

Hot path: the value sent is encoded once, at start; a value received is
parsed once and kept in a small bounded cache keyed by the verified identity
and the value, so a request costs a dict lookup or two.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from mesh import hookimpl
from mesh.telemetry.peers import PEER_METADATA, UNKNOWN, PeerMetadata, namespace_of, workload_metadata

#: The header carrying a sidecar's workload metadata, on requests and on responses.
HEADER = b"x-txmesh-peer-metadata"
_HEADER_TEXT = HEADER.decode()
_HEADER_LENGTH = len(HEADER)
#: A longer value is not parsed (ours are about 150 bytes).
MAX_VALUE = 2048
#: Distinct (identity, value) pairs remembered; the cache starts over past that.
CACHE_SIZE = 1024

#: The JSON keys of the encoded metadata, one per :class:`PeerMetadata` field.
_KEYS = ("w", "n", "a", "v", "cs", "cr")
#: What a label value from a peer may look like (Kubernetes names and label values).
_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?")
_MISSING = object()


def encode(metadata: PeerMetadata) -> bytes:
    """The header value of ``metadata``: URL-safe base64 (unpadded) of compact JSON."""
    document = {key: value for key, value in zip(_KEYS, metadata) if value != UNKNOWN}
    text = json.dumps(document, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=")


def decode(value) -> PeerMetadata | None:
    """The :class:`PeerMetadata` of a header value (``str`` or ``bytes``), or None if it is not one.

    Never raises: a value that is too long, not base64, not a JSON object,
    lacks the workload or namespace, or holds a value that is not a plain
    Kubernetes name or label value is None.
    """
    if len(value) > MAX_VALUE:
        return None
    try:
        raw = value.encode("ascii") if isinstance(value, str) else value
        document = json.loads(base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4)))
    except (UnicodeError, binascii.Error, ValueError):
        return None
    if not isinstance(document, dict) or not document.get("w") or not document.get("n"):
        return None
    values = tuple(document.get(key, UNKNOWN) for key in _KEYS)
    if not all(isinstance(item, str) and _VALUE.fullmatch(item) for item in values):
        return None
    return PeerMetadata(*values)


class MetadataExchange:
    """The ``builtin.metadata_exchange`` plugin object of one sidecar.

    :param workload: the :class:`mesh.config.compile.Workload` this sidecar serves.
    :param peers: a :class:`mesh.telemetry.peers.PeerDirectory` (which clusters are mTLS,
        which identity an endpoint proved).
    """

    def __init__(self, workload, peers, cache_size: int = CACHE_SIZE):
        self.own = workload_metadata(workload)
        self._value = encode(self.own)
        self._own_pair = [(HEADER, self._value)]
        self._strip = [(HEADER, None)]
        self._peers = peers
        self._cache = {}
        self._cache_size = cache_size

    @hookimpl
    def mesh_request_headers(self, ctx):
        """Outbound: announce this workload to a sidecar.  Inbound: take the caller's metadata off."""
        if ctx.direction == "outbound":
            return self._own_pair if ctx.cluster in self._peers.index().mtls_clusters else None
        value = ctx.headers.get(_HEADER_TEXT)
        if value is None:
            return None
        if ctx.peer is not None:
            self._believe(ctx, ctx.peer, value)
        return self._strip

    @hookimpl
    def mesh_response_headers(self, ctx, status, headers):
        """Outbound: take the upstream sidecar's metadata off.  Inbound: announce this workload to a
        sidecar that announced itself."""
        if ctx.direction == "outbound":
            return self._from_upstream(ctx, headers)
        if ctx.peer is None:
            return None
        value = ctx.headers.get(_HEADER_TEXT)
        if value is None:
            return None
        self._believe(ctx, ctx.peer, value)  # again, for a reply made before the request was forwarded
        return self._own_pair

    def _from_upstream(self, ctx, headers):
        index = self._peers.index()
        if ctx.cluster not in index.mtls_clusters:
            return None
        for name, value in headers:
            if len(name) == _HEADER_LENGTH and name.lower() == HEADER:
                endpoint = index.endpoint(ctx.cluster, ctx.upstream_host)
                if endpoint is not None and endpoint.identity:
                    self._believe(ctx, endpoint.identity, value)
                return self._strip
        return None

    def _believe(self, ctx, identity: str, value) -> None:
        """Set ``ctx.extra[PEER_METADATA]`` from ``value``, sent by the verified ``identity``, if valid."""
        key = (identity, value)
        metadata = self._cache.get(key, _MISSING)
        if metadata is _MISSING:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            metadata = decode(value)
            if metadata is not None and metadata.namespace != namespace_of(identity):
                metadata = None  # a workload may speak only for its own namespace
            self._cache[key] = metadata
        if metadata is not None:
            ctx.extra[PEER_METADATA] = metadata
