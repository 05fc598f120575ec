"""mesh-control --kubernetes against the test API server, with real sidecars and backends.

- the registry: a Service, its EndpointSlice and Pods become a ServiceEntry the sidecars route to (the
  "pods" are demo apps on 127.0.0.2-4); scale up, scale down and readiness flips reach the client
  sidecar's routing within 2 s (figures printed); ``--config-dir`` still works beside it
- watches that break resume without missing a change; changes while the control plane is cut off from
  the API server, with the history compacted, end in a 410 relist that leaves no stale endpoint
- the API server down: the sidecars keep serving the last state, recovery resyncs
- an invalid CR: a Warning Event (reason InvalidConfig) on the object, once per resourceVersion, and a
  log line; the previous version stays in force; a valid edit applies
- Istio's API groups are read only with --istio-crds
- an ExternalName Service routes to what its external name resolves to (a test DNS server)
- a kubeconfig that cannot be loaded: mesh-control exits saying what to pass
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from mesh.control.kube.crds import resources as crd_resources
from tests.harness import KubeAPI, free_port, venv_bin, wait_for
from tests.harness.cable import Cable
from tests.harness.dns_server import DnsServer
from tests.integration.test_distribution_support import ControlledProxy
from tests.integration.test_kube_support import (
    answering,
    cluster_endpoints,
    endpoint_list,
    endpoint_slice,
    install_crds,
    kubeconfig_via,
    pod,
    service,
    virtual_service,
)
from tests.integration.test_proxy_support import route_to, write_config
from tests.integration.test_proxy_support import virtual_service as file_virtual_service

NS = "shop"
HOST = "reviews.shop.svc.cluster.local"
ADDRESSES = {"127.0.0.2": "reviews-1", "127.0.0.3": "reviews-2", "127.0.0.4": "reviews-3"}
INVALID = "InvalidConfig"


@pytest.fixture(scope="module")
def cluster(control_factory, backend_factory, process_log_dir, tmp_path_factory):
    from kubernetes import client

    kube = KubeAPI(log_dir=process_log_dir).start()
    cable = Cable(kube.port).start()
    api = kube.api_client()
    install_crds(api, istio=True)
    core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
    core.create_namespace({"metadata": {"name": NS}})
    port = free_port()
    for address, name in ADDRESSES.items():
        backend_factory(name, port=port, address=address)
        core.create_namespaced_pod(NS, pod(name, {"app": "reviews"}, "reviews"))
    core.create_namespaced_service(NS, service("reviews", 80, port))
    discovery.create_namespaced_endpoint_slice(NS, endpoint_slice("reviews", "reviews-a", port, [
        ("127.0.0.2", "reviews-1", True), ("127.0.0.3", "reviews-2", None)]))
    # round robin (a DestinationRule CR), so a few sequential requests reach every endpoint
    client.CustomObjectsApi(api).create_namespaced_custom_object("networking.txmesh.io", "v1", NS, "destinationrules", {
        "apiVersion": "networking.txmesh.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews"},
        "spec": {"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}})
    # --config-dir beside --kubernetes: a file VirtualService to a Kubernetes Service
    config = write_config(tmp_path_factory.mktemp("kube-config"),
                          file_virtual_service("file-alias", ["file-alias"], [route_to(HOST)], namespace=NS))
    kubeconfig = kubeconfig_via(kube, cable.port, process_log_dir / "kubeconfig-cable")
    control = control_factory(extra_args=["--kubernetes", "--kubeconfig", str(kubeconfig),
                                          "--config-dir", str(config)])
    client_proxy = ControlledProxy(control, "frontend", namespace=NS, log_dir=process_log_dir).start()
    wait_for(lambda: cluster_endpoints(client_proxy, HOST) == ["127.0.0.2", "127.0.0.3"], 10,
             what="the Service's endpoints at the client sidecar")
    yield {"kube": kube, "cable": cable, "api": api, "core": core, "discovery": discovery, "control": control,
           "client": client_proxy, "custom": client.CustomObjectsApi(api), "log_dir": process_log_dir}
    client_proxy.stop()
    cable.stop()
    kube.stop()


def set_endpoints(cluster, endpoints) -> None:
    """Replace the endpoints of slice reviews-a: ``(address, pod, ready)``."""
    cluster["discovery"].patch_namespaced_endpoint_slice("reviews-a", NS, {"endpoints": endpoint_list(endpoints)})


def reflected(cluster, expected, timeout: float, what: str) -> float:
    """Seconds until the client sidecar's cluster of reviews has exactly ``expected`` (at most ``timeout``)."""
    started = time.monotonic()
    wait_for(lambda: cluster_endpoints(cluster["client"], HOST) == sorted(expected), timeout, interval=0.02,
             what=what)
    return time.monotonic() - started


def control_log(cluster) -> str:
    return cluster["control"].log_path.read_text()


def endpointslice_lists_and_restarts(cluster) -> tuple[int, int]:
    """The control plane's counts of endpointslices lists and watch restarts, from its /metrics."""
    metrics = cluster["control"].admin_request("/metrics")[1].decode()
    counts = [re.search(rf'mesh_control_kube_{name}\{{kind="endpointslices"\}} ([\d.]+)', metrics)
              for name in ("lists_total", "watch_restarts_total")]
    assert all(counts), metrics[-3000:]
    return int(float(counts[0].group(1))), int(float(counts[1].group(1)))


def test_endpoint_churn_reaches_the_sidecar_within_two_seconds(cluster):
    client_proxy = cluster["client"]
    assert answering(client_proxy, "reviews") == {"reviews-1", "reviews-2"}
    assert answering(client_proxy, "file-alias", 2) <= {"reviews-1", "reviews-2"}  # the --config-dir source
    figures = {}
    set_endpoints(cluster, [("127.0.0.2", "reviews-1", True), ("127.0.0.3", "reviews-2", True),
                            ("127.0.0.4", "reviews-3", True)])
    figures["scale up"] = reflected(cluster, ["127.0.0.2", "127.0.0.3", "127.0.0.4"], 2.0, "the new endpoint")
    assert answering(client_proxy, "reviews", 9) == {"reviews-1", "reviews-2", "reviews-3"}
    set_endpoints(cluster, [("127.0.0.3", "reviews-2", True), ("127.0.0.4", "reviews-3", True)])
    figures["scale down"] = reflected(cluster, ["127.0.0.3", "127.0.0.4"], 2.0, "the removed endpoint to go")
    assert answering(client_proxy, "reviews", 6) == {"reviews-2", "reviews-3"}
    set_endpoints(cluster, [("127.0.0.3", "reviews-2", False), ("127.0.0.4", "reviews-3", True)])
    figures["not ready"] = reflected(cluster, ["127.0.0.4"], 2.0, "the not-ready endpoint to go")
    assert answering(client_proxy, "reviews", 6) == {"reviews-3"}
    set_endpoints(cluster, [("127.0.0.3", "reviews-2", True), ("127.0.0.4", "reviews-3", True)])
    figures["ready again"] = reflected(cluster, ["127.0.0.3", "127.0.0.4"], 2.0, "the ready endpoint to return")
    assert answering(client_proxy, "reviews", 6) == {"reviews-2", "reviews-3"}
    print("API write -> client sidecar routing: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in figures.items()))


def test_a_broken_watch_resumes_without_missing_a_change(cluster):
    broken = cluster["kube"].break_watches()
    assert broken == 3 + len(crd_resources()) + 1 + 2, ("every watch of the control plane (3 registry kinds, the "
                                                        "txmesh CR kinds, the gateways' secrets, the trust-bundle "
                                                        "publisher's namespaces and configmaps) was open")
    set_endpoints(cluster, [("127.0.0.2", "reviews-1", True), ("127.0.0.3", "reviews-2", True),
                            ("127.0.0.4", "reviews-3", True)])
    elapsed = reflected(cluster, ["127.0.0.2", "127.0.0.3", "127.0.0.4"], 5.0, "the change made as the watch broke")
    wait_for(lambda: "kubernetes: endpointslices list/watch failed" in control_log(cluster), 5,
             what="the broken watch to be logged")
    print(f"watch broken -> change served in {elapsed * 1000:.0f} ms")


def test_changes_during_a_partition_and_a_compaction_end_in_a_relist_without_stale_endpoints(cluster):
    kube, core, client_proxy = cluster["kube"], cluster["core"], cluster["client"]
    set_endpoints(cluster, [("127.0.0.2", "reviews-1", True), ("127.0.0.3", "reviews-2", True),
                            ("127.0.0.4", "reviews-3", True)])
    reflected(cluster, ["127.0.0.2", "127.0.0.3", "127.0.0.4"], 5.0, "the starting state")
    lists_before, restarts_before = endpointslice_lists_and_restarts(cluster)
    cluster["cable"].cut()
    # while the control plane cannot see it: reviews-1 goes away, and the history of that is compacted
    set_endpoints(cluster, [("127.0.0.3", "reviews-2", True), ("127.0.0.4", "reviews-3", True)])
    core.delete_namespaced_pod("reviews-1", NS)
    kube.compact()
    # meanwhile the sidecar keeps the last state the control plane had
    assert answering(client_proxy, "reviews", 6) == {"reviews-1", "reviews-2", "reviews-3"}
    cluster["cable"].splice()
    elapsed = reflected(cluster, ["127.0.0.3", "127.0.0.4"], 15.0, "the relist to drop the stale endpoint")
    assert answering(client_proxy, "reviews", 6) == {"reviews-2", "reviews-3"}
    log = control_log(cluster)
    assert "kubernetes: endpointslices watch from resourceVersion" in log and "expired" in log, log[-3000:]
    print(f"partition healed -> 410 relist -> stale endpoint gone in {elapsed * 1000:.0f} ms")
    lists, restarts = endpointslice_lists_and_restarts(cluster)
    assert (lists, restarts > restarts_before) == (lists_before + 1, True)  # one relist, after the cut
    metrics = cluster["control"].admin_request("/metrics")[1].decode()
    assert 'mesh_control_kube_objects{kind="pods"} 2.0' in metrics, metrics[-3000:]
    core.create_namespaced_pod(NS, pod("reviews-1", {"app": "reviews"}, "reviews"))


def test_api_server_down_the_sidecars_keep_serving_and_recovery_resyncs(cluster):
    kube, client_proxy, control = cluster["kube"], cluster["client"], cluster["control"]
    set_endpoints(cluster, [("127.0.0.3", "reviews-2", True), ("127.0.0.4", "reviews-3", True)])
    reflected(cluster, ["127.0.0.3", "127.0.0.4"], 5.0, "the starting state")
    logged = len(control_log(cluster))
    kube.set_down(True)
    try:
        wait_for(lambda: "list/watch failed" in control_log(cluster)[logged:], 10,
                 what="the control plane to notice the outage")
        assert answering(client_proxy, "reviews", 6) == {"reviews-2", "reviews-3"}
        assert control.is_ready()
    finally:
        kube.set_down(False)
    started = time.monotonic()
    set_endpoints(cluster, [("127.0.0.2", "reviews-1", True), ("127.0.0.3", "reviews-2", True)])
    reflected(cluster, ["127.0.0.2", "127.0.0.3"], 15.0, "the first change after the outage")
    print(f"API server back -> change served in {(time.monotonic() - started) * 1000:.0f} ms")
    assert answering(client_proxy, "reviews", 6) == {"reviews-1", "reviews-2"}


def invalid_events(kube, name: str) -> list:
    return [event for event in kube.events() if event["reason"] == INVALID and event["involvedObject"]["name"] == name]


def test_an_invalid_cr_is_reported_as_an_event_and_its_previous_version_stays(cluster):
    kube, custom, client_proxy = cluster["kube"], cluster["custom"], cluster["client"]
    group, plural = "networking.txmesh.io", "virtualservices"
    created = custom.create_namespaced_custom_object(group, "v1", NS, plural,
                                                     virtual_service("reviews-vs", ["reviews-alias"], "reviews"))
    wait_for(lambda: client_proxy.curl("reviews-alias", "/").status == 200, 5, what="the CR's route")
    bad = virtual_service("reviews-vs", ["reviews-alias"], "reviews", retries={"attempts": 2, "retryOn": "bogus"})
    bad["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"]
    replaced = custom.replace_namespaced_custom_object(group, "v1", NS, plural, "reviews-vs", bad)
    version = replaced["metadata"]["resourceVersion"]
    (event,) = wait_for(lambda: invalid_events(kube, "reviews-vs"), 5, what="the InvalidConfig Event")
    assert event["type"] == "Warning" and event["metadata"]["namespace"] == NS
    assert event["involvedObject"] == {"apiVersion": "networking.txmesh.io/v1", "kind": "VirtualService",
                                       "name": "reviews-vs", "namespace": NS, "uid": created["metadata"]["uid"],
                                       "resourceVersion": version}
    message = event["message"]
    assert "unknown retryOn condition 'bogus'" in message and f"resourceVersion {version}" in message, message
    assert f"previous version (resourceVersion {created['metadata']['resourceVersion']}) stays in force" in message
    log = control_log(cluster)
    assert (f"config rejected: kubernetes:virtualservices.networking.txmesh.io/{NS}/reviews-vs" in log
            and "bogus" in log), log[-3000:]
    assert client_proxy.curl("reviews-alias", "/").status == 200  # the previous version routes on
    # another change republishes the CRs: the invalid version is not reported twice
    custom.create_namespaced_custom_object(group, "v1", NS, plural, virtual_service("marker", ["marker"], "reviews"))
    wait_for(lambda: client_proxy.curl("marker", "/").status == 200, 5, what="the marker CR's route")
    assert len(invalid_events(kube, "reviews-vs")) == 1
    good = virtual_service("reviews-vs", ["reviews-alias", "reviews-alias2"], "reviews")
    good["metadata"]["resourceVersion"] = version
    custom.replace_namespaced_custom_object(group, "v1", NS, plural, "reviews-vs", good)
    wait_for(lambda: client_proxy.curl("reviews-alias2", "/").status == 200, 5, what="the valid edit to apply")
    assert len(invalid_events(kube, "reviews-vs")) == 1


def test_two_replicas_post_one_event_and_retry_an_overloaded_api_server(cluster, control_factory):
    """Both replicas see the invalid version; their first posts get 503; the retries leave exactly one Event."""
    kube, custom = cluster["kube"], cluster["custom"]
    kubeconfig = kube.write_kubeconfig(cluster["log_dir"] / "kubeconfig-second")
    second = control_factory(extra_args=["--kubernetes", "--kubeconfig", str(kubeconfig)])
    kube.fail("events", verbs=("create",), times=2)
    bad = virtual_service("twice-seen", ["twice-seen"], "reviews", retries={"attempts": 2, "retryOn": "bogus"})
    custom.create_namespaced_custom_object("networking.txmesh.io", "v1", NS, "virtualservices", bad)
    (event,) = wait_for(lambda: invalid_events(kube, "twice-seen"), 10, what="the InvalidConfig Event")
    posts = [seen for seen in kube.requests() if seen["method"] == "POST" and seen["path"].endswith("/events")]
    assert len(posts) >= 3, posts  # two refused, then at least one retry
    for log in (control_log(cluster), second.log_path.read_text()):
        assert "cannot post the Kubernetes Event" not in log and "bogus" in log, log[-2000:]
    second.stop()
    assert invalid_events(kube, "twice-seen") == [event]


def test_istio_groups_are_read_only_with_istio_crds(cluster, control_factory):
    custom, client_proxy = cluster["custom"], cluster["client"]
    custom.create_namespaced_custom_object("networking.istio.io", "v1", NS, "virtualservices", virtual_service(
        "from-istio", ["istio-alias"], "reviews", group="networking.istio.io"))
    custom.create_namespaced_custom_object("networking.txmesh.io", "v1", NS, "virtualservices",
                                           virtual_service("after-istio", ["after-istio"], "reviews"))
    wait_for(lambda: client_proxy.curl("after-istio", "/").status == 200, 5, what="the later txmesh CR's route")
    assert client_proxy.curl("istio-alias", "/").status == 404  # written earlier, but not read
    kubeconfig = cluster["kube"].write_kubeconfig(cluster["log_dir"] / "kubeconfig-istio")
    control = control_factory(extra_args=["--kubernetes", "--kubeconfig", str(kubeconfig), "--istio-crds"])
    other = ControlledProxy(control, "frontend-2", namespace=NS, log_dir=cluster["log_dir"]).start()
    try:
        wait_for(lambda: other.curl("istio-alias", "/").status == 200, 10, what="the Istio-group VirtualService")
        assert other.curl("after-istio", "/").status == 200
    finally:
        other.stop()
        control.stop()


def test_an_external_name_service_routes_to_what_its_external_name_resolves_to(cluster, backend_factory):
    """As Istio: the Service host is a MESH_EXTERNAL DNS service whose endpoint is ``externalName`` (here
    resolved by a test DNS server); one without ports gets no ServiceEntry, said once in the log."""
    core, log_dir, namespace = cluster["core"], cluster["log_dir"], "legacy"
    backend = backend_factory("external-db", address="127.0.0.5")
    dns = DnsServer({"db.example.test": ["127.0.0.5"]}, log_dir=log_dir).start()
    core.create_namespace({"metadata": {"name": namespace}})
    exported = {"networking.istio.io/exportTo": "."}  # the shop sidecars do not resolve it
    core.create_namespaced_service(namespace, {
        "metadata": {"name": "bare", "annotations": exported},
        "spec": {"type": "ExternalName", "externalName": "db.example.test"}})
    core.create_namespaced_service(namespace, {
        "metadata": {"name": "db", "annotations": exported},
        "spec": {"type": "ExternalName", "externalName": "db.example.test",
                 "ports": [{"name": "http", "port": backend.port, "targetPort": 9}]}})  # targetPort: ignored
    proxy = ControlledProxy(cluster["control"], "legacy-app", namespace=namespace, log_dir=log_dir,
                            extra_args=["--dns-server", dns.address]).start()
    try:
        wait_for(lambda: cluster_endpoints(proxy, "db.legacy.svc.cluster.local", backend.port) == ["127.0.0.5"], 10,
                 what="the external name resolved at the sidecar")
        assert answering(proxy, "db", 2) == {"external-db"}
        assert answering(proxy, "db.legacy.svc.cluster.local", 2) == {"external-db"}
        assert cluster_endpoints(cluster["client"], "db.legacy.svc.cluster.local", backend.port) == []
        line = "kubernetes:services/legacy/bare: ExternalName Service without a TCP port: no ServiceEntry"
        assert control_log(cluster).count(line) == 1, control_log(cluster)[-3000:]
    finally:
        proxy.stop()
        dns.stop()
        core.delete_namespaced_service("db", namespace)
        core.delete_namespaced_service("bare", namespace)


def test_a_kubeconfig_that_cannot_be_loaded_stops_mesh_control_with_what_to_do(tmp_path):
    argv = [venv_bin("twistd"), "-n", "--pidfile=", "mesh-control", "--state-dir", str(tmp_path / "state"),
            "--port", str(free_port()), "--admin-port", str(free_port()), "--kubernetes",
            "--kubeconfig", str(tmp_path / "missing")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    output = proc.stdout + proc.stderr
    assert f"cannot load Kubernetes credentials from --kubeconfig {tmp_path / 'missing'}" in output, output
    assert "pass --kubeconfig FILE" in output


def test_istio_crds_not_installed_hold_nothing_back_and_are_named_in_the_log(kube_api, control_factory, tmp_path):
    from kubernetes import client

    api = kube_api.api_client()
    install_crds(api)  # txmesh's only
    client.CoreV1Api(api).create_namespace({"metadata": {"name": NS}})
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "networking.txmesh.io", "v1", NS, "virtualservices", virtual_service("alone", ["alone"], "reviews"))
    control = control_factory(extra_args=["--kubernetes", "--kubeconfig", str(kube_api.write_kubeconfig(
        tmp_path / "kubeconfig")), "--istio-crds"])
    config = wait_for(lambda: (lambda c: c if c["resources"] == 1 else None)(control.admin("/ready")["config"]), 5,
                      what="the txmesh CR to be in force")
    assert config["rejected"] == []
    log = control.log_path.read_text()
    assert ("virtualservices.networking.istio.io list/watch failed: 404 Not Found" in log
            and "install its CustomResourceDefinition" in log), log[-3000:]
    # SIGTERM: the watch threads end with the reactor, at once, once all 13 watches are open (3 registry
    # kinds, 8 txmesh CR kinds, namespaces and configmaps of the trust-bundle publisher; Istio's are not served).
    wait_for(lambda: sum(1 for seen in kube_api.requests() if seen["query"].get("watch") in ("true", "1", "True"))
             >= 13, 5, what="the 13 watches to be open")
    started = time.monotonic()
    control.stop()
    assert time.monotonic() - started < 3.0
    log = control.log_path.read_text()
    assert "Server Shut Down." in log and "watch threads still running" not in log, log[-2000:]
