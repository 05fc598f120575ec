"""What telemetry knows of the peer: service names, principals' namespaces, the per-config cache."""

from __future__ import annotations

import pytest

from mesh.telemetry.peers import ConfigCache, namespace_of, service_labels
from tests.unit.test_telemetry_support import REVIEWS, bookinfo_runtime, peers


@pytest.mark.parametrize("host, labels", [
    (REVIEWS, (REVIEWS, "reviews", "bookinfo")),
    ("api.example.com", ("api.example.com", "api.example.com", "unknown")),
    ("svc.example", ("svc.example", "svc.example", "unknown")),
    (None, ("unknown", "unknown", "unknown")),
])
def test_service_labels(host, labels):
    assert service_labels(host) == labels


@pytest.mark.parametrize("principal, namespace", [
    ("spiffe://cluster.local/ns/shop/sa/frontend", "shop"),
    ("spiffe://example.org/workload", None),
    (None, None),
])
def test_namespace_of(principal, namespace):
    assert namespace_of(principal) == namespace


def test_config_cache_builds_once_per_key_and_config_and_stays_bounded():
    runtime = bookinfo_runtime()
    built = []
    cache = ConfigCache(peers(runtime), lambda key, index: built.append(key) or f"value of {key}", size=2)
    assert cache.get("a") == cache.get("a") == "value of a" and built == ["a"]
    runtime.apply(runtime.snapshot.config)  # a new snapshot, even of the same config
    cache.get("a")
    assert built == ["a", "a"]
    cache.get("b")
    cache.get("c")  # full: starts over
    cache.get("b")
    assert built == ["a", "a", "b", "c", "b"]
