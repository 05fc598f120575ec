"""builtin.metadata_exchange: the header's encoding, and who sends, believes and strips it."""

from __future__ import annotations

import base64
import json

import pytest

from mesh.config.compile import Workload
from mesh.telemetry.metadata_exchange import HEADER, MAX_VALUE, MetadataExchange, decode, encode
from mesh.telemetry.peers import PEER_METADATA, PeerMetadata, workload_metadata
from tests.unit.test_telemetry_support import (
    CALLER_ID,
    PRODUCTPAGE,
    REVIEWS_CLUSTER,
    REVIEWS_ID,
    REVIEWS_V1,
    inbound,
    outbound,
    peers,
)

FRONTEND = PeerMetadata("frontend", "shop", "frontend", "v2", "frontend", "v2")
REVIEWS_V1_METADATA = PeerMetadata("reviews-v1", "bookinfo", "reviews", "v1", "reviews", "v1")
MTLS_CLUSTER = "outbound|9080|v1|reviews.bookinfo.svc.cluster.local"  # its one endpoint: mTLS, REVIEWS_ID
PLAINTEXT_CLUSTER = "outbound|9080|v2|reviews.bookinfo.svc.cluster.local"  # its one endpoint has no identity


@pytest.fixture
def exchange():
    return MetadataExchange(PRODUCTPAGE, peers())


def test_own_metadata_is_the_workload_with_istios_canonical_names():
    assert workload_metadata(PRODUCTPAGE) == PeerMetadata("productpage", "bookinfo", "productpage", "v1",
                                                          "productpage", "v1")
    labels = {"app": "a", "service.istio.io/canonical-name": "shop", "app.kubernetes.io/version": "3"}
    assert workload_metadata(Workload("w", "ns", labels)) == PeerMetadata("w", "ns", "a", "unknown", "shop", "3")
    assert workload_metadata(Workload("w", "ns")) == PeerMetadata("w", "ns", "unknown", "unknown", "w", "latest")


def test_the_value_is_compact_base64_json_and_round_trips():
    value = encode(FRONTEND)
    assert value.isascii() and b"," not in value and b"=" not in value and len(value) < 150
    assert decode(value) == FRONTEND and decode(value.decode()) == FRONTEND
    bare = PeerMetadata("w", "ns", "unknown", "unknown", "w", "latest")
    assert decode(encode(bare)) == bare


def _value(document) -> str:
    return base64.urlsafe_b64encode(json.dumps(document).encode()).decode()


@pytest.mark.parametrize("value", [
    "", "not base64!", "e30", _value([1, 2]), _value({"w": "x"}), _value({"n": "ns"}),
    _value({"w": "x", "n": "ns", "a": 3}), _value({"w": "x y", "n": "ns"}), _value({"w": "x", "n": "ns\n"}),
    _value({"w": "x" * 300, "n": "ns"}), "A" * (MAX_VALUE + 1), "é",
])
def test_anything_else_is_not_metadata(value):
    assert decode(value) is None


def test_outbound_requests_to_sidecars_carry_this_workloads_metadata(exchange):
    [(name, value)] = exchange.mesh_request_headers(outbound(0, cluster=MTLS_CLUSTER))
    assert name == HEADER and decode(value) == workload_metadata(PRODUCTPAGE)
    assert exchange.mesh_request_headers(outbound(0)) is None  # some of its endpoints are plaintext
    assert exchange.mesh_request_headers(outbound(0, cluster=PLAINTEXT_CLUSTER)) is None  # not mTLS: never told
    assert exchange.mesh_request_headers(outbound(0, cluster="PassthroughCluster")) is None
    assert exchange.mesh_request_headers(outbound(0, cluster=None)) is None


def test_an_mtls_caller_is_believed_and_its_header_stripped(exchange):
    ctx = inbound(0, headers={HEADER.decode(): encode(FRONTEND).decode()})
    assert exchange.mesh_request_headers(ctx) == [(HEADER, None)]
    assert ctx.extra[PEER_METADATA] == FRONTEND
    [(name, value)] = exchange.mesh_response_headers(ctx, 200, ())
    assert name == HEADER and decode(value) == workload_metadata(PRODUCTPAGE)


def test_a_plaintext_callers_header_is_stripped_and_not_believed(exchange):
    ctx = inbound(0, peer=None, headers={HEADER.decode(): encode(FRONTEND).decode()})
    assert exchange.mesh_request_headers(ctx) == [(HEADER, None)]
    assert PEER_METADATA not in ctx.extra
    assert exchange.mesh_response_headers(ctx, 200, ()) is None  # and learns nothing back


def test_a_caller_may_not_speak_for_another_namespace(exchange):
    forged = PeerMetadata("payments", "bank", "payments", "v1", "payments", "v1")
    ctx = inbound(0, headers={HEADER.decode(): encode(forged).decode()})  # the caller is ns/shop
    assert exchange.mesh_request_headers(ctx) == [(HEADER, None)]
    assert PEER_METADATA not in ctx.extra


def test_a_caller_without_metadata_gets_none(exchange):
    ctx = inbound(0)
    assert exchange.mesh_request_headers(ctx) is None and exchange.mesh_response_headers(ctx, 200, ()) is None


def test_a_reply_before_forwarding_still_learns_the_caller(exchange):
    """A 403 from an AuthorizationPolicy is answered before mesh_request_headers runs."""
    ctx = inbound(403, headers={HEADER.decode(): encode(FRONTEND).decode()})
    assert exchange.mesh_response_headers(ctx, 403, ())[0][0] == HEADER
    assert ctx.extra[PEER_METADATA] == FRONTEND


def test_the_upstream_sidecars_answer_is_believed_and_stripped(exchange):
    ctx = outbound(200, cluster=MTLS_CLUSTER)
    headers = ((b"content-type", b"text/plain"), (b"X-Txmesh-Peer-Metadata", encode(REVIEWS_V1_METADATA)))
    assert exchange.mesh_response_headers(ctx, 200, headers) == [(HEADER, None)]
    assert ctx.extra[PEER_METADATA] == REVIEWS_V1_METADATA
    ctx = outbound(200, cluster=MTLS_CLUSTER)
    assert exchange.mesh_response_headers(ctx, 200, ((b"content-type", b"text/plain"),)) is None
    assert PEER_METADATA not in ctx.extra


def test_a_plaintext_upstreams_header_is_left_alone(exchange):
    ctx = outbound(200, cluster=PLAINTEXT_CLUSTER, upstream_host="10.0.0.2:9080")
    assert exchange.mesh_response_headers(ctx, 200, ((HEADER, encode(REVIEWS_V1_METADATA)),)) is None
    assert PEER_METADATA not in ctx.extra


def test_parsed_values_are_cached_and_the_cache_is_bounded():
    exchange = MetadataExchange(PRODUCTPAGE, peers(), cache_size=2)
    value = encode(FRONTEND).decode()
    for _ in range(3):
        exchange.mesh_request_headers(inbound(0, headers={HEADER.decode(): value}))
    assert list(exchange._cache) == [(CALLER_ID, value)]
    for version in ("v3", "v4", "v5"):
        other = encode(FRONTEND._replace(version=version))
        exchange.mesh_response_headers(outbound(200, cluster=MTLS_CLUSTER), 200, ((HEADER, other),))
    assert len(exchange._cache) <= 2 and all(identity == REVIEWS_ID for identity, _ in exchange._cache)


def test_only_clusters_of_sidecars_only_are_mtls_clusters():
    index = peers().index()
    assert MTLS_CLUSTER in index.mtls_clusters and index.endpoint(MTLS_CLUSTER, REVIEWS_V1).identity == REVIEWS_ID
    assert REVIEWS_CLUSTER not in index.mtls_clusters and PLAINTEXT_CLUSTER not in index.mtls_clusters
