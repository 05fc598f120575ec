"""builtin.metrics: Istio's request metrics, their labels, buckets and exposition."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh.config.compile import load_and_compile
from mesh.telemetry.exposition import new_registry
from mesh.telemetry.istio import ISTIO_BUCKETS, REQUEST_LABELS, IstioMetrics
from mesh.telemetry.peers import PEER_METADATA, PeerMetadata
from tests.unit.test_telemetry_support import (
    BOOKINFO,
    CALLER_ID,
    OWN_ID,
    PRODUCTPAGE,
    REVIEWS,
    REVIEWS_CLUSTER,
    REVIEWS_ID,
    REVIEWS_V2,
    bookinfo_runtime,
    done,
    inbound,
    outbound,
    peers,
    report_tcp,
)


def scrape(metrics) -> dict:
    """``{metric family name: [(sample name, labels, value)]}`` as Prometheus would read them."""
    registry = new_registry()
    registry.register(metrics)
    text = generate_latest(registry).decode()
    return {family.name: [(s.name, s.labels, s.value) for s in family.samples]
            for family in text_string_to_metric_families(text)}


def requests_total(metrics) -> list:
    return [(labels, value) for _, labels, value in scrape(metrics)["istio_requests"]]


@pytest.fixture
def metrics():
    return IstioMetrics(PRODUCTPAGE, peers())


def test_source_labels_of_an_mtls_endpoint(metrics):
    metrics.mesh_request_complete(outbound(200), done(outbound(200)))
    [(labels, value)] = requests_total(metrics)
    assert value == 1
    assert labels == {
        "reporter": "source",
        "source_workload": "productpage", "source_workload_namespace": "bookinfo", "source_principal": OWN_ID,
        "source_app": "productpage", "source_version": "v1",
        "source_canonical_service": "productpage", "source_canonical_revision": "v1",
        "destination_workload": "unknown", "destination_workload_namespace": "bookinfo",
        "destination_principal": REVIEWS_ID, "destination_service": REVIEWS,
        "destination_service_name": "reviews", "destination_service_namespace": "bookinfo",
        "destination_app": "reviews", "destination_version": "v1",
        "destination_canonical_service": "unknown", "destination_canonical_revision": "unknown",
        "connection_security_policy": "unknown", "request_protocol": "http", "response_code": "200",
        "response_flags": "-", "grpc_response_status": "",
    }
    assert set(labels) == set(REQUEST_LABELS)


def test_the_metadata_exchange_names_the_peer_workload_on_both_sides(metrics):
    """builtin.metadata_exchange leaves the verified peer's workload in ctx.extra: both reporters name it."""
    ctx = outbound(200)
    ctx.extra[PEER_METADATA] = PeerMetadata("reviews-v1", "bookinfo", "reviews", "v1", "reviews", "v1")
    metrics.mesh_request_complete(ctx, done(ctx))
    ctx = inbound(200)
    ctx.extra[PEER_METADATA] = PeerMetadata("frontend", "shop", "frontend", "v2", "front", "2.0")
    metrics.mesh_request_complete(ctx, done(ctx))
    rows = {labels["reporter"]: labels for labels, _ in requests_total(metrics)}
    names = ("workload", "workload_namespace", "app", "version", "canonical_service", "canonical_revision")
    assert [rows["source"]["destination_" + name] for name in names] == \
        ["reviews-v1", "bookinfo", "reviews", "v1", "reviews", "v1"]
    assert [rows["destination"]["source_" + name] for name in names] == \
        ["frontend", "shop", "frontend", "v2", "front", "2.0"]
    assert [rows["destination"]["destination_" + name] for name in names] == \
        ["productpage", "bookinfo", "productpage", "v1", "productpage", "v1"]


def test_a_plaintext_endpoint_has_no_principals(metrics):
    ctx = outbound(503, upstream_host=REVIEWS_V2, flags="UF,URX")
    metrics.mesh_request_complete(ctx, done(ctx))
    [(labels, _)] = requests_total(metrics)
    assert (labels["source_principal"], labels["destination_principal"]) == ("unknown", "unknown")
    assert labels["destination_workload_namespace"] == "bookinfo"  # the service's namespace
    assert (labels["destination_version"], labels["response_code"], labels["response_flags"]) == ("v2", "503", "UF,URX")


def test_no_route_is_unknown_throughout(metrics):
    ctx = outbound(404, upstream_host=None, cluster=None, flags="NR", host="nowhere")
    metrics.mesh_request_complete(ctx, done(ctx))
    [(labels, _)] = requests_total(metrics)
    assert {labels[name] for name in REQUEST_LABELS if name.startswith("destination_")} == {"unknown"}
    assert labels["response_flags"] == "NR"


def test_destination_labels_of_an_mtls_caller(metrics):
    ctx = inbound(403, flags="RBAC", host="reviews.bookinfo")  # bookinfo's registry has no productpage
    metrics.mesh_request_complete(ctx, done(ctx))
    [(labels, _)] = requests_total(metrics)
    assert labels["reporter"] == "destination"
    assert (labels["source_principal"], labels["source_workload_namespace"]) == (CALLER_ID, "shop")
    assert {labels[name] for name in ("source_workload", "source_app", "source_version")} == {"unknown"}
    assert (labels["destination_workload"], labels["destination_app"], labels["destination_version"]) == \
        ("productpage", "productpage", "v1")
    assert labels["destination_principal"] == OWN_ID
    # no ServiceEntry leads to productpage: its canonical service, as Istio's inbound fallback
    assert (labels["destination_service"], labels["destination_service_name"],
            labels["destination_service_namespace"]) == ("productpage", "productpage", "bookinfo")
    assert labels["connection_security_policy"] == "mutual_tls"


INBOUND_SERVICE = ("productpage.bookinfo.svc.cluster.local", "productpage", "bookinfo")
INBOUND_HOSTS = (REVIEWS, "reviews", "api.example.com", "evil.example", "127.0.0.1:9080", "shop.example.com", "")


def _inbound_services(metrics) -> set:
    return {(labels["destination_service"], labels["destination_service_name"], labels["destination_service_namespace"])
            for labels, _ in requests_total(metrics) if labels["reporter"] == "destination"}


def test_the_inbound_service_is_the_one_the_app_serves_whatever_the_host_header():
    """Istio reads it from the inbound cluster (istio.services[0]), with no Host fallback on inbound: an IP
    Host, or a public name behind an ingress gateway, still counts for the app's service."""
    runtime = bookinfo_runtime()
    config = load_and_compile(BOOKINFO, PRODUCTPAGE)[0]
    runtime.apply(dataclasses.replace(config, app_service=INBOUND_SERVICE[0]))
    metrics = IstioMetrics(PRODUCTPAGE, peers(runtime))
    for host in INBOUND_HOSTS:
        ctx = inbound(200, peer=None, host=host)
        metrics.mesh_request_complete(ctx, done(ctx))
    assert _inbound_services(metrics) == {INBOUND_SERVICE}
    [(labels, value)] = requests_total(metrics)
    assert value == len(INBOUND_HOSTS)  # one series: the Host header is no part of the labels
    assert (labels["connection_security_policy"], labels["source_principal"], labels["destination_principal"]) == \
        ("none", "unknown", "unknown")
    runtime.apply(config)  # a new config without the app's service: the labels are worked out again
    metrics.mesh_request_complete(inbound(200, peer=None, host=REVIEWS), done(inbound(200)))
    assert _inbound_services(metrics) == {INBOUND_SERVICE, ("productpage", "productpage", "bookinfo")}


def test_without_a_service_the_inbound_service_is_the_canonical_one(metrics):
    for host in INBOUND_HOSTS:
        ctx = inbound(200, peer=None, host=host)
        metrics.mesh_request_complete(ctx, done(ctx))
    assert _inbound_services(metrics) == {("productpage", "productpage", "bookinfo")}


def test_histograms_use_istio_buckets_and_milliseconds(metrics):
    for duration, sent in ((0.0004, 0), (0.003, 1024), (0.2, 5000)):
        ctx = outbound(200, bytes_sent=sent, bytes_received=10)
        metrics.mesh_request_complete(ctx, done(ctx, duration))
    samples = scrape(metrics)
    buckets = {labels["le"]: value for name, labels, value in samples["istio_request_duration_milliseconds"]
               if name.endswith("_bucket")}
    assert list(buckets) == [f"{bound:g}" for bound in ISTIO_BUCKETS] + ["+Inf"]
    assert (buckets["0.5"], buckets["5"], buckets["250"], buckets["+Inf"]) == (1, 2, 3, 3)
    total = {name: value for name, _, value in samples["istio_request_duration_milliseconds"]}
    assert total["istio_request_duration_milliseconds_sum"] == pytest.approx(203.4)
    sizes = {labels["le"]: value for name, labels, value in samples["istio_response_bytes"]
             if name.endswith("_bucket")}
    assert (sizes["0.5"], sizes["1000"], sizes["2500"], sizes["5000"]) == (1, 1, 2, 3)
    assert {labels["le"]: value for name, labels, value in samples["istio_request_bytes"]
            if name.endswith("_bucket")}["10"] == 3


def test_one_series_per_label_set_and_retries_per_cluster(metrics):
    for code, attempts in ((200, 1), (200, 3), (503, 2)):
        ctx = outbound(code, attempts=attempts)
        metrics.mesh_request_complete(ctx, done(ctx))
    assert sorted((labels["response_code"], value) for labels, value in requests_total(metrics)) == \
        [("200", 2), ("503", 1)]
    assert scrape(metrics)["mesh_upstream_rq_retry"] == \
        [("mesh_upstream_rq_retry_total", {"cluster": REVIEWS_CLUSTER}, 3)]


def test_tcp_metrics_are_declared_and_empty(metrics):
    families = scrape(metrics)
    for name in ("istio_tcp_connections_opened", "istio_tcp_connections_closed", "istio_tcp_sent_bytes",
                 "istio_tcp_received_bytes"):
        assert families[name] == []


def test_a_new_config_relabels_new_requests_and_keeps_old_counts():
    runtime = bookinfo_runtime()
    metrics = IstioMetrics(PRODUCTPAGE, peers(runtime))
    metrics.mesh_request_complete(outbound(200), done(outbound(200)))
    config = load_and_compile(BOOKINFO, PRODUCTPAGE)[0]
    runtime.apply(dataclasses.replace(config, clusters={
        name: spec for name, spec in config.clusters.items() if REVIEWS not in name}))
    metrics.mesh_request_complete(outbound(200), done(outbound(200)))  # reviews is gone: an unknown service now
    assert sorted((labels["destination_service"], value) for labels, value in requests_total(metrics)) == \
        [(REVIEWS, 1), ("unknown", 1)]


def test_a_failing_request_is_logged_not_raised(metrics):
    ctx = outbound(200)
    ctx.bytes_sent = "not a number"
    metrics.mesh_request_complete(ctx, done(ctx))  # must not raise
    assert metrics._failed.failures == 1


def test_tcp_passthrough_connections_are_counted_under_istio_pseudo_clusters(metrics):
    report_tcp(metrics, 1, 0)
    report_tcp(metrics, 0, 1, sent=2048, received=17)
    report_tcp(metrics, 1, 1, cluster="BlackHoleCluster", flags="UH")
    report_tcp(metrics, 1, 1, "inbound", "InboundPassthroughClusterIpv4", sent=5, received=7)
    families = scrape(metrics)
    sent = {(labels["reporter"], labels["destination_service_name"], labels["response_flags"]): value
            for _, labels, value in families["istio_tcp_sent_bytes"]}
    assert sent == {("source", "PassthroughCluster", "-"): 2048, ("source", "BlackHoleCluster", "UH"): 0,
                    ("destination", "InboundPassthroughClusterIpv4", "-"): 5}
    opened = {labels["destination_service_name"]: value
              for _, labels, value in families["istio_tcp_connections_opened"]}
    assert opened == {"PassthroughCluster": 1, "BlackHoleCluster": 1, "InboundPassthroughClusterIpv4": 1}
    [(_, source, _)] = [s for s in families["istio_tcp_received_bytes"]
                        if s[1]["destination_service_name"] == "PassthroughCluster"]
    assert source["request_protocol"] == "tcp" and source["destination_service"] == "PassthroughCluster"
    assert source["source_workload"] == "productpage" and source["destination_principal"] == "unknown"
    [(_, inbound_labels, _)] = [s for s in families["istio_tcp_received_bytes"] if s[1]["reporter"] == "destination"]
    assert inbound_labels["destination_workload"] == "productpage"
    assert inbound_labels["connection_security_policy"] == "none" and inbound_labels["source_principal"] == "unknown"


def test_dry_run_results_are_counted_with_istios_labels(metrics):
    for results in ((("deny", "denied", "bookinfo/staged"),), (("deny", "allowed", None),),
                    (("deny", "denied", "bookinfo/staged"), ("allow", "denied", None))):
        ctx = inbound(200, authz_dry_run=results)
        metrics.mesh_request_complete(ctx, done(ctx))
    metrics.mesh_request_complete(inbound(200), done(inbound(200)))
    assert sorted((labels["authz_dry_run_action"], labels["authz_dry_run_result"], value)
                  for name, labels, value in scrape(metrics)["mesh_authz_dry_run"]
                  if name == "mesh_authz_dry_run_total") == [
        ("allow", "denied", 1), ("deny", "allowed", 1), ("deny", "denied", 2)]


def test_grpc_requests_report_their_status_and_messages_and_only_they_do(metrics):
    from mesh.proxy.grpc import call_for

    for status, messages in ((0, 3), (0, 2), (14, 0), (None, 1)):
        ctx = outbound(200)
        ctx.grpc = call_for("application/grpc")
        ctx.grpc.status = status
        ctx.grpc.requests.count, ctx.grpc.responses.count = 1, messages
        metrics.mesh_request_complete(ctx, done(ctx))
    metrics.mesh_request_complete(outbound(200), done(outbound(200)))
    requests = {(labels["request_protocol"], labels["grpc_response_status"]): value
                for labels, value in requests_total(metrics)}
    assert requests == {("grpc", "0"): 2, ("grpc", "14"): 1, ("grpc", ""): 1, ("http", ""): 1}
    families = scrape(metrics)
    responses = {labels["grpc_response_status"]: value for _, labels, value in families["istio_response_messages"]}
    assert responses == {"0": 5, "14": 0, "": 1}
    sent = {labels["grpc_response_status"]: value for _, labels, value in families["istio_request_messages"]}
    assert sent == {"0": 2, "14": 1, "": 1}
