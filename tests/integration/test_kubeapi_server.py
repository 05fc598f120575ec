"""The faithful test Kubernetes API server (tests/harness/kubeapi.py), driven with the REAL ``kubernetes``
client over real sockets: list and watch with resourceVersion, bookmarks, 410 Gone after compaction, broken
watches, TokenReview, Events, CRD-served custom objects, and the errors (404, 409, 400, 415, 503) as the
client's ApiException."""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest

from tests.harness import http_request, wait_for
from tests.harness.kube import KubeAPI

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client (pip install txmesh[kubernetes])")
from kubernetes import client, watch  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

NS = "demo"


def pod(name: str, **labels) -> dict:
    return {"metadata": {"name": name, "labels": labels}, "spec": {"containers": [{"name": "app", "image": "app:1"}]}}


@pytest.fixture
def api(kube_api):
    """A real ApiClient on the test server, with namespace ``demo`` created."""
    api_client = kube_api.api_client()
    client.CoreV1Api(api_client).create_namespace({"metadata": {"name": NS}})
    yield api_client
    api_client.close()


@pytest.fixture
def core(api):
    return client.CoreV1Api(api)


class Collector:
    """``Watch().stream(func, ...)`` on a thread: events go to a queue; how the stream ended is kept."""

    def __init__(self, func, *args, **kwargs):
        self.watch = watch.Watch()
        self.events: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(func, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, func, args, kwargs):
        try:
            for event in self.watch.stream(func, *args, **kwargs):
                self.events.put(event)
        except BaseException as error:  # kept for the test to assert on
            self.error = error

    def take(self, count: int, timeout: float = 10.0) -> list[dict]:
        """The next *count* events; fail if they do not all arrive in time."""
        return [self.events.get(timeout=timeout) for _ in range(count)]

    def ended(self, timeout: float = 10.0) -> bool:
        """Wait for the stream to end; True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self):
        self.watch.stop()


def summary(events) -> list[tuple[str, str]]:
    return [(event["type"], event["raw_object"]["metadata"].get("name")) for event in events]


# -- list and watch -----------------------------------------------------------------------------------------------

def test_watch_from_a_listed_resource_version_sees_exactly_the_later_changes(core):
    core.create_namespaced_pod(NS, pod("before", app="web"))
    listed = core.list_namespaced_pod(NS)
    assert [p.metadata.name for p in listed.items] == ["before"]
    since = listed.metadata.resource_version
    added = core.create_namespaced_pod(NS, pod("added", app="web"))
    modified = core.patch_namespaced_pod("before", NS, {"metadata": {"labels": {"app": "web", "v": "2"}}})
    deleted = core.delete_namespaced_pod("before", NS)
    collector = Collector(core.list_namespaced_pod, NS, resource_version=since, timeout_seconds=30)
    try:
        replayed = collector.take(3)
        core.create_namespaced_pod(NS, pod("live"))
        live = collector.take(1)
    finally:
        collector.stop()
    assert summary(replayed) == [("ADDED", "added"), ("MODIFIED", "before"), ("DELETED", "before")]
    versions = [int(event["object"].metadata.resource_version) for event in replayed]
    assert versions == [int(added.metadata.resource_version), int(modified.metadata.resource_version),
                        int(modified.metadata.resource_version) + 1]
    assert versions[0] > int(since) and deleted.metadata.name == "before"
    assert replayed[1]["object"].metadata.labels == {"app": "web", "v": "2"}
    assert isinstance(replayed[0]["object"], client.V1Pod)  # the client deserialised a real Pod
    assert summary(live) == [("ADDED", "live")]
    assert collector.events.empty()


def test_watch_without_resource_version_starts_with_the_current_state(core):
    core.create_namespaced_pod(NS, pod("one"))
    core.create_namespaced_pod(NS, pod("two"))
    collector = Collector(core.list_namespaced_pod, NS, timeout_seconds=30)
    try:
        initial = collector.take(2)
        core.delete_namespaced_pod("one", NS)
        assert summary(collector.take(1)) == [("DELETED", "one")]
    finally:
        collector.stop()
    assert summary(initial) == [("ADDED", "one"), ("ADDED", "two")]


def test_selectors_filter_lists_and_watches_and_labels_move_objects_in_and_out(core):
    core.create_namespaced_pod(NS, pod("a", app="web", tier="front"))
    core.create_namespaced_pod(NS, pod("b", app="db"))
    assert [p.metadata.name for p in core.list_namespaced_pod(NS, label_selector="app=web,tier=front").items] == ["a"]
    assert [p.metadata.name for p in core.list_namespaced_pod(NS, label_selector="app!=web").items] == ["b"]
    assert [p.metadata.name for p in core.list_namespaced_pod(NS, label_selector="app in (db,cache)").items] == ["b"]
    assert [p.metadata.name for p in core.list_pod_for_all_namespaces(field_selector="metadata.name=b").items] == ["b"]
    assert core.list_pod_for_all_namespaces(field_selector="metadata.namespace=default").items == []
    collector = Collector(core.list_namespaced_pod, NS, label_selector="app=web", timeout_seconds=30)
    try:
        assert summary(collector.take(1)) == [("ADDED", "a")]
        core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"app": "gone"}}})
        core.patch_namespaced_pod("b", NS, {"metadata": {"labels": {"app": "web"}}})
        moved = collector.take(2)
    finally:
        collector.stop()
    # as the real watch cache does: leaving the selector is DELETED, entering it is ADDED
    assert summary(moved) == [("DELETED", "a"), ("ADDED", "b")]


def test_paginated_lists_are_consistent_at_the_first_pages_version(core, kube_api):
    for name in ("p1", "p2", "p3", "p4", "p5"):
        core.create_namespaced_pod(NS, pod(name))
    first = core.list_pod_for_all_namespaces(limit=2)
    assert [p.metadata.name for p in first.items] == ["p1", "p2"] and first.metadata._continue
    core.delete_namespaced_pod("p3", NS)  # changes after the first page do not show in the later ones
    core.create_namespaced_pod(NS, pod("p6"))
    second = core.list_pod_for_all_namespaces(limit=2, _continue=first.metadata._continue)
    third = core.list_pod_for_all_namespaces(limit=2, _continue=second.metadata._continue)
    assert [p.metadata.name for p in second.items + third.items] == ["p3", "p4", "p5"]
    assert third.metadata._continue is None
    assert first.metadata.resource_version == second.metadata.resource_version == third.metadata.resource_version
    assert [p.metadata.name for p in core.list_pod_for_all_namespaces(limit=10).items] == ["p1", "p2", "p4", "p5", "p6"]
    kube_api.compact()
    with pytest.raises(ApiException) as expired:
        core.list_pod_for_all_namespaces(limit=2, _continue=first.metadata._continue)
    assert expired.value.status == 410 and "continue parameter is too old" in expired.value.body
    with pytest.raises(ApiException) as garbage:
        core.list_pod_for_all_namespaces(limit=2, _continue="not-a-token")
    assert garbage.value.status == 400 and "continue key is not valid" in garbage.value.body


def test_bad_selectors_are_400_with_what_to_write_instead(core):
    with pytest.raises(ApiException) as bad_field:
        core.list_namespaced_pod(NS, field_selector="spec.nodeName=n1")
    assert bad_field.value.status == 400 and "field label not supported: spec.nodeName" in bad_field.value.body
    with pytest.raises(ApiException) as bad_label:
        core.list_namespaced_pod(NS, label_selector="app in web")
    assert bad_label.value.status == 400 and "unable to parse requirement" in bad_label.value.body


def test_services_endpointslices_and_secrets_get_the_real_servers_defaults(api, core):
    service = core.create_namespaced_service(NS, {"metadata": {"name": "web"},
                                                  "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})
    assert service.spec.cluster_ip.startswith("10.") and service.spec.cluster_ips == [service.spec.cluster_ip]
    ports = service.spec.ports[0]
    assert (service.spec.type, ports.protocol, ports.target_port) == ("ClusterIP", "TCP", 80)
    replaced = core.replace_namespaced_service("web", NS, {"metadata": {"name": "web"},
                                                           "spec": {"ports": [{"port": 81}]}})
    assert replaced.spec.cluster_ip == service.spec.cluster_ip  # clusterIP is kept, like on a real server
    discovery = client.DiscoveryV1Api(api)
    discovery.create_namespaced_endpoint_slice(NS, {
        "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}}, "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": True}}], "ports": [{"port": 8080}]})
    slices = discovery.list_namespaced_endpoint_slice(NS, label_selector="kubernetes.io/service-name=web")
    assert [s.endpoints[0].addresses for s in slices.items] == [["10.1.0.5"]]
    assert slices.items[0].metadata.generation == 1
    secret = core.create_namespaced_secret(NS, {"metadata": {"name": "ca"}, "stringData": {"ca.pem": "PEM"}})
    assert secret.data == {"ca.pem": "UEVN"} and secret.string_data is None and secret.type == "Opaque"


def test_pod_status_is_written_through_the_status_subresource_only(core):
    created = core.create_namespaced_pod(NS, {**pod("p"), "status": {"podIP": "10.1.0.9"}})
    assert created.status.phase == "Pending" and created.status.pod_ip is None
    assert created.spec.service_account_name == "default"
    ignored = core.patch_namespaced_pod("p", NS, {"status": {"podIP": "10.1.0.9"}})
    assert ignored.status.pod_ip is None
    assert ignored.metadata.resource_version == created.metadata.resource_version  # a no-op write
    ready = core.patch_namespaced_pod_status("p", NS, {"status": {"podIP": "10.1.0.9", "phase": "Running",
                                                                  "conditions": [{"type": "Ready", "status": "True"}]}})
    status = ready.status
    assert (status.pod_ip, status.phase, status.conditions[0].status) == ("10.1.0.9", "Running", "True")
    assert int(ready.metadata.resource_version) > int(created.metadata.resource_version)


# -- bookmarks, 410, broken and timed-out watches ---------------------------------------------------------------

def test_bookmarks_carry_a_resource_version_that_the_clients_watch_stores(core, kube_api):
    plain = Collector(core.list_namespaced_pod, NS, timeout_seconds=30)
    collector = Collector(core.list_namespaced_pod, NS, allow_watch_bookmarks=True, timeout_seconds=30)
    try:
        wait_for(lambda: len(kube_api.requests()) >= 3 and "watch" in kube_api.requests()[-1]["query"], 10,
                 what="both watches to be open")
        created = core.create_namespaced_pod(NS, pod("p"))
        assert summary(collector.take(1)) == [("ADDED", "p")]
        core.create_namespaced_secret(NS, {"metadata": {"name": "elsewhere"}})  # moves the global revision on
        assert kube_api.bookmark() == 1  # only the watch that allowed bookmarks
        bookmark = collector.take(1)[0]
        stored_version = collector.watch.resource_version  # set by the client before it yielded the event
        core.create_namespaced_pod(NS, pod("q"))
        plain_events = plain.take(2)  # no BOOKMARK between the two pods for a watch that did not allow them
    finally:
        collector.stop()
        plain.stop()
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["raw_object"] == {"kind": "Pod", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": str(int(created.metadata.resource_version) + 1)}}
    assert stored_version == bookmark["raw_object"]["metadata"]["resourceVersion"]
    assert summary(plain_events) == [("ADDED", "p"), ("ADDED", "q")]


def test_bookmarks_also_arrive_periodically(tmp_path):
    with KubeAPI(bookmark_interval=0.3, log_dir=tmp_path) as kube:
        core = client.CoreV1Api(kube.api_client())
        started = time.monotonic()
        collector = Collector(core.list_namespace, allow_watch_bookmarks=True, resource_version="1", timeout_seconds=30)
        try:
            events = collector.take(6)  # ADDED x4 (the built-in namespaces, created after revision 1), 2 bookmarks
        finally:
            collector.stop()
    assert [event["type"] for event in events] == ["ADDED"] * 4 + ["BOOKMARK"] * 2
    assert time.monotonic() - started < 5


def test_a_watch_from_a_compacted_version_gets_410_expired(core, kube_api):
    since = core.list_namespaced_pod(NS).metadata.resource_version
    core.create_namespaced_pod(NS, pod("p"))
    compacted = kube_api.compact()
    with pytest.raises(ApiException) as gone:
        for _ in watch.Watch().stream(core.list_namespaced_pod, NS, resource_version=since, timeout_seconds=10):
            pass
    assert gone.value.status == 410
    assert gone.value.reason == f"Expired: too old resource version: {since} ({compacted})"
    # on the wire: a 200 stream whose single event is the ERROR Status, then the end of the stream
    response = core.list_namespaced_pod(NS, watch=True, resource_version=since, _preload_content=False)
    assert response.status == 200
    lines = response.data.decode().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
        "message": f"too old resource version: {since} ({compacted})"}}
    # the compacted revision itself (what a relist returns) is still watchable
    collector = Collector(core.list_namespaced_pod, NS, resource_version=str(compacted), timeout_seconds=30)
    try:
        core.delete_namespaced_pod("p", NS)
        assert summary(collector.take(1)) == [("DELETED", "p")]
    finally:
        collector.stop()


def test_a_broken_watch_ends_the_stream(core, kube_api):
    collector = Collector(core.list_namespaced_pod, NS, timeout_seconds=30)
    core.create_namespaced_pod(NS, pod("p"))
    assert summary(collector.take(1)) == [("ADDED", "p")]
    assert kube_api.break_watches() == 1
    assert collector.ended(10), "the watch stream did not end after its connection was dropped"
    assert collector.error is not None, "an aborted stream must not look like a clean end"
    assert "ProtocolError" in type(collector.error).__name__ or "ProtocolError" in repr(collector.error)
    assert kube_api.break_watches() == 0


def test_timeout_seconds_ends_the_stream_cleanly(core):
    started = time.monotonic()
    events = list(watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=1))
    assert events == [] and 0.9 < time.monotonic() - started < 5


# -- errors ------------------------------------------------------------------------------------------------------

def test_conflicts_and_missing_objects_are_the_clients_api_exceptions(core):
    first = core.create_namespaced_config_map(NS, {"metadata": {"name": "c"}, "data": {"k": "1"}})
    with pytest.raises(ApiException) as exists:
        core.create_namespaced_config_map(NS, {"metadata": {"name": "c"}})
    assert (exists.value.status, exists.value.reason) == (409, "Conflict")
    assert '"reason": "AlreadyExists"' in exists.value.body and 'configmaps \\"c\\" already exists' in exists.value.body
    first_version = {"name": "c", "resourceVersion": first.metadata.resource_version}
    core.replace_namespaced_config_map("c", NS, {"metadata": first_version, "data": {"k": "2"}})
    with pytest.raises(ApiException) as stale:
        core.replace_namespaced_config_map("c", NS, {"metadata": first_version, "data": {"k": "3"}})
    assert stale.value.status == 409 and '"reason": "Conflict"' in stale.value.body
    assert "the object has been modified" in stale.value.body
    assert core.read_namespaced_config_map("c", NS).data == {"k": "2"}
    for call in (lambda: core.read_namespaced_config_map("nope", NS),
                 lambda: core.delete_namespaced_config_map("nope", NS),
                 lambda: core.patch_namespaced_config_map("nope", NS, {"data": {}})):
        with pytest.raises(ApiException) as missing:
            call()
        assert missing.value.status == 404 and 'configmaps \\"nope\\" not found' in missing.value.body
    with pytest.raises(ApiException) as no_namespace:
        core.create_namespaced_config_map("absent", {"metadata": {"name": "c"}})
    assert no_namespace.value.status == 404 and 'namespaces \\"absent\\" not found' in no_namespace.value.body


def test_deleting_a_namespace_deletes_its_objects(core):
    collector = Collector(core.list_pod_for_all_namespaces, timeout_seconds=30)
    try:
        core.create_namespaced_pod(NS, pod("p"))
        assert summary(collector.take(1)) == [("ADDED", "p")]
        core.delete_namespace(NS)
        assert summary(collector.take(1)) == [("DELETED", "p")]
    finally:
        collector.stop()
    assert core.list_pod_for_all_namespaces().items == []


def test_an_outage_resets_connections_or_answers_503_and_ends(core, kube_api):
    collector = Collector(core.list_namespaced_pod, NS, timeout_seconds=30)
    wait_for(lambda: "watch" in kube_api.requests()[-1]["query"], 10, what="the watch to be open")
    kube_api.set_down(True)
    assert collector.ended(10) and collector.error is not None
    fast = client.CoreV1Api(kube_api.api_client())
    fast.api_client.configuration.retries = 0
    with pytest.raises(Exception) as reset:
        fast.list_namespaced_pod(NS)
    assert "Connection" in repr(reset.value) or "ProtocolError" in repr(reset.value)
    kube_api.set_down(True, how="503")
    with pytest.raises(ApiException) as unavailable:
        core.list_namespaced_pod(NS)
    assert unavailable.value.status == 503
    kube_api.set_down(False)
    assert core.list_namespaced_pod(NS).items == []


# -- TokenReview -------------------------------------------------------------------------------------------------

def _review(api, token: str, audiences=("txmesh",)):
    body = {"spec": {"token": token, **({"audiences": list(audiences)} if audiences else {})}}
    return client.AuthenticationV1Api(api).create_token_review(body).status


def test_token_review_accepts_a_registered_token(api, kube_api):
    kube_api.add_token("good-token", NS, "frontend", audiences=("txmesh", "other"))
    status = _review(api, "good-token", ("txmesh", "unrelated"))
    assert status.authenticated is True and status.error is None
    assert status.user.username == "system:serviceaccount:demo:frontend"
    assert status.user.groups == ["system:serviceaccounts", "system:serviceaccounts:demo", "system:authenticated"]
    assert status.audiences == ["txmesh"]
    assert {"method": "POST", "path": "/apis/authentication.k8s.io/v1/tokenreviews", "query": {}} in kube_api.requests()


def test_token_review_rejects_unknown_expired_and_wrong_audience_tokens(api, kube_api):
    kube_api.add_token("expired", NS, "frontend", expires_in=-1)
    kube_api.add_token("for-vault", NS, "frontend", audiences=("vault",))
    kube_api.add_token("txmesh-only", NS, "frontend")
    cases = {"unknown": (_review(api, "never-registered"), "invalid bearer token"),
             "expired": (_review(api, "expired"), "expired"),
             "audience": (_review(api, "for-vault"),
                          'token audiences ["vault"] is invalid for the target audiences ["txmesh"]'),
             "api-audience": (_review(api, "txmesh-only", audiences=()), "https://kubernetes.default.svc.cluster.local")}
    for case, (status, message) in cases.items():
        assert not status.authenticated, case
        assert message in status.error, (case, status.error)
        assert not status.user.username, case


# -- Events ------------------------------------------------------------------------------------------------------

def test_events_are_recorded_in_both_api_groups(api, kube_api):
    core = client.CoreV1Api(api)
    core.create_namespaced_event(NS, {"metadata": {"generateName": "vs-bad."}, "message": "route weights sum to 90",
                                      "reason": "InvalidConfig", "type": "Warning",
                                      "involvedObject": {"kind": "VirtualService", "name": "bad", "namespace": NS}})
    client.EventsV1Api(api).create_namespaced_event(NS, {
        "metadata": {"name": "dr-bad.1"}, "note": "unknown subset", "reason": "InvalidConfig", "type": "Warning",
        "regarding": {"kind": "DestinationRule", "name": "dr", "namespace": NS}, "action": "Validate",
        "eventTime": "2026-11-25T10:00:00.000000Z", "reportingController": "txmesh.io/mesh-control",
        "reportingInstance": "mesh-control-0"})
    recorded = kube_api.events()
    assert [(e["apiVersion"], e["reason"]) for e in recorded] == [("v1", "InvalidConfig"),
                                                                  ("events.k8s.io/v1", "InvalidConfig")]
    assert recorded[0]["metadata"]["name"].startswith("vs-bad.") and recorded[0]["message"] == "route weights sum to 90"
    assert recorded[1]["note"] == "unknown subset" and recorded[1]["regarding"]["name"] == "dr"
    # one storage, two representations, as on a real server
    as_core = {e.metadata.name: e for e in core.list_namespaced_event(NS).items}
    assert as_core["dr-bad.1"].message == "unknown subset"
    assert as_core["dr-bad.1"].involved_object.kind == "DestinationRule"
    assert [e["note"] for e in kube_api.events("events.k8s.io/v1")] == ["route weights sum to 90", "unknown subset"]
    with pytest.raises(ApiException) as elsewhere:  # an Event lives in its object's namespace
        core.create_namespaced_event("default", {"metadata": {"name": "x.1"}, "message": "m",
                                                 "involvedObject": {"kind": "Pod", "name": "p", "namespace": NS}})
    assert elsewhere.value.status == 422 and "involvedObject.namespace" in elsewhere.value.body
    assert len(kube_api.events()) == 2


# -- CRDs and custom objects -------------------------------------------------------------------------------------

CRD = {
    "metadata": {"name": "virtualservices.networking.txmesh.io"},
    "spec": {"group": "networking.txmesh.io", "scope": "Namespaced",
             "names": {"plural": "virtualservices", "singular": "virtualservice", "kind": "VirtualService"},
             "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                           "schema": {"openAPIV3Schema": {"type": "object",
                                                          "x-kubernetes-preserve-unknown-fields": True}}}]},
}
GROUP, VERSION, PLURAL = "networking.txmesh.io", "v1", "virtualservices"


def test_creating_a_crd_serves_its_custom_objects(api, kube_api):
    custom = client.CustomObjectsApi(api)
    with pytest.raises(ApiException) as before:
        custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert before.value.status == 404
    crd = client.ApiextensionsV1Api(api).create_custom_resource_definition(CRD)
    assert {c.type: c.status for c in crd.status.conditions} == {"NamesAccepted": "True", "Established": "True"}
    assert crd.status.accepted_names.list_kind == "VirtualServiceList"
    since = custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["metadata"]["resourceVersion"]
    collector = Collector(custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                          resource_version=since, timeout_seconds=30)
    try:
        created = custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualService", "metadata": {"name": "reviews"},
            "spec": {"hosts": ["reviews"]}})
        assert created["metadata"]["generation"] == 1 and created["metadata"]["uid"]
        patched = custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "reviews",
                                                        {"spec": {"hosts": ["reviews", "ratings"]}})
        assert patched["metadata"]["generation"] == 2 and patched["spec"]["hosts"] == ["reviews", "ratings"]
        status = custom.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "reviews",
                                                              {"status": {"validationMessages": ["ok"]}})
        assert status["metadata"]["generation"] == 2 and status["status"] == {"validationMessages": ["ok"]}
        listed = custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
        assert listed["kind"] == "VirtualServiceList" and [i["kind"] for i in listed["items"]] == ["VirtualService"]
        fetched = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "reviews")
        assert fetched["spec"]["hosts"][1] == "ratings"
        custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "reviews")
        events = collector.take(4)
    finally:
        collector.stop()
    assert summary(events) == [("ADDED", "reviews"), ("MODIFIED", "reviews"), ("MODIFIED", "reviews"),
                               ("DELETED", "reviews")]
    assert events[0]["raw_object"]["apiVersion"] == f"{GROUP}/{VERSION}"
    with pytest.raises(ApiException) as conflict:
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, {"metadata": {"name": "x"}})
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, {"metadata": {"name": "x"}})
    assert conflict.value.status == 409


def test_deleting_a_crd_deletes_its_objects_and_stops_serving_them(api):
    extensions, custom = client.ApiextensionsV1Api(api), client.CustomObjectsApi(api)
    extensions.create_custom_resource_definition(CRD)
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, {"metadata": {"name": "reviews"}, "spec": {}})
    collector = Collector(custom.list_cluster_custom_object, GROUP, VERSION, PLURAL, timeout_seconds=30)
    try:
        assert summary(collector.take(1)) == [("ADDED", "reviews")]
        extensions.delete_custom_resource_definition(CRD["metadata"]["name"])
        assert summary(collector.take(1)) == [("DELETED", "reviews")]
        assert collector.ended(10) and collector.error is None  # its watches end cleanly
    finally:
        collector.stop()
    with pytest.raises(ApiException) as gone:
        custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert gone.value.status == 404


def test_invalid_crds_and_patches_are_rejected_with_the_reason(api):
    extensions = client.ApiextensionsV1Api(api)
    with pytest.raises(ApiException) as misnamed:
        extensions.create_custom_resource_definition({**CRD, "metadata": {"name": "vs.networking.txmesh.io"}})
    assert misnamed.value.status == 422 and 'must be spec.names.plural+\\".\\"+spec.group' in misnamed.value.body
    extensions.create_custom_resource_definition(CRD)
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, {"metadata": {"name": "r"}, "spec": {}})
    with pytest.raises(ApiException) as strategic:  # custom resources take no strategic merge patch
        custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "r", {"spec": {"hosts": []}},
                                              _content_type="application/strategic-merge-patch+json")
    assert strategic.value.status == 415 and "application/merge-patch+json" in strategic.value.body
    patched = custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "r",
                                                    [{"op": "add", "path": "/spec/hosts", "value": ["r"]}],
                                                    _content_type="application/json-patch+json")
    assert patched["spec"]["hosts"] == ["r"]
    with pytest.raises(ApiException) as bad_op:
        custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "r",
                                              [{"op": "remove", "path": "/spec/missing"}],
                                              _content_type="application/json-patch+json")
    assert bad_op.value.status == 422 and "/spec/missing" in bad_op.value.body


# -- admissionregistration.k8s.io/v1 mutatingwebhookconfigurations ------------------------------------------------

def webhook_configuration(name: str = "injector", **webhook) -> dict:
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{"name": "sidecar.txmesh.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                          "clientConfig": {"service": {"name": "mesh-control", "namespace": "mesh-system",
                                                       "path": "/inject"}},
                          "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                                     "resources": ["pods"]}], **webhook}]}


def test_mutating_webhook_configurations_are_cluster_scoped_with_the_real_defaults(api, kube_api):
    admission = client.AdmissionregistrationV1Api(api)
    created = admission.create_mutating_webhook_configuration(webhook_configuration())
    assert created.metadata.generation == 1 and created.metadata.namespace is None
    (hook,) = created.webhooks
    assert (hook.failure_policy, hook.match_policy, hook.timeout_seconds, hook.reinvocation_policy) == (
        "Fail", "Equivalent", 10, "Never")
    assert hook.client_config.service.port == 443 and hook.rules[0].scope == "*"
    assert hook.namespace_selector.to_dict() == hook.object_selector.to_dict() == {
        "match_expressions": None, "match_labels": None}
    # list and watch with a metadata.name field selector (what mesh-control watches, and RBAC can name)
    admission.create_mutating_webhook_configuration(webhook_configuration("other"))
    listed = admission.list_mutating_webhook_configuration(field_selector="metadata.name=injector")
    assert [item.metadata.name for item in listed.items] == ["injector"]
    collector = Collector(admission.list_mutating_webhook_configuration, field_selector="metadata.name=injector",
                          resource_version=listed.metadata.resource_version, timeout_seconds=30)
    try:
        admission.patch_mutating_webhook_configuration("other", {"metadata": {"labels": {"a": "b"}}})
        ca_bundle = "Q0EgYnVuZGxl"  # base64 of "CA bundle"
        # a strategic merge patch merges webhooks by name, as on a real server
        patched = admission.patch_mutating_webhook_configuration("injector", {"webhooks": [
            {"name": "sidecar.txmesh.io", "clientConfig": {"caBundle": ca_bundle}}]})
        assert patched.webhooks[0].client_config.ca_bundle == ca_bundle
        assert patched.webhooks[0].client_config.service.path == "/inject", "the rest of the webhook stays"
        assert patched.metadata.generation == 2
        (event,) = collector.take(1)
        assert event["type"] == "MODIFIED" and event["raw_object"]["metadata"]["name"] == "injector"
    finally:
        collector.stop()
    # replace with the read resourceVersion; a stale one is 409 Conflict
    current = admission.read_mutating_webhook_configuration("injector")
    current.webhooks[0].timeout_seconds = 5
    admission.replace_mutating_webhook_configuration("injector", current)
    with pytest.raises(ApiException) as stale:
        admission.replace_mutating_webhook_configuration("injector", current)
    assert stale.value.status == 409 and "the object has been modified" in stale.value.body
    status, _ = http_request("127.0.0.1", kube_api.port,
                             "/apis/admissionregistration.k8s.io/v1/namespaces/demo/mutatingwebhookconfigurations")
    assert status == 404, "cluster-scoped: not served in a namespace"


@pytest.mark.parametrize("webhook, status, message", [
    ({"sideEffects": "Some"}, 422, 'webhooks[0].sideEffects: Unsupported value'),
    ({"admissionReviewVersions": []}, 422, "webhooks[0].admissionReviewVersions: Required value"),
    ({"clientConfig": {"url": "https://x/inject", "service": {"name": "s", "namespace": "n"}}}, 422,
     "exactly one of url or service"),
])
def test_invalid_mutating_webhook_configurations_are_rejected_with_the_reason(api, webhook, status, message):
    admission = client.AdmissionregistrationV1Api(api)
    with pytest.raises(ApiException) as rejected:
        admission.create_mutating_webhook_configuration(webhook_configuration(**webhook))
    assert rejected.value.status == status and message in rejected.value.body


def test_a_ca_bundle_that_is_not_base64_is_400(kube_api):
    """(The client checks that itself, so the request is sent raw, as another client could.)"""
    body = webhook_configuration(clientConfig={"url": "https://x/inject", "caBundle": "not base64!"})
    status, answer = http_request("127.0.0.1", kube_api.port,
                                  "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                                  method="POST", body=json.dumps(body).encode(),
                                  headers={"content-type": "application/json"})
    assert status == 400 and b"illegal base64 data" in answer


def test_forbidden_writes_are_403_as_rbac_words_them_until_allowed_again(core, kube_api):
    core.create_namespaced_config_map(NS, {"metadata": {"name": "c"}, "data": {"k": "1"}})
    kube_api.forbid("configmaps", ["update", "create"])
    with pytest.raises(ApiException) as update:
        core.replace_namespaced_config_map("c", NS, {"metadata": {"name": "c"}, "data": {"k": "2"}})
    assert update.value.status == 403 and '"reason": "Forbidden"' in update.value.body
    assert ('configmaps \\"c\\" is forbidden: User \\"txmesh-test\\" cannot update resource \\"configmaps\\" in API '
            'group \\"\\" in the namespace \\"demo\\"') in update.value.body
    with pytest.raises(ApiException) as create:
        core.create_namespaced_config_map(NS, {"metadata": {"name": "d"}})
    assert create.value.status == 403 and "cannot create resource" in create.value.body
    assert core.read_namespaced_config_map("c", NS).data == {"k": "1"}, "reads stay allowed"
    core.patch_namespaced_config_map("c", NS, {"data": {"k": "3"}})  # patch was not forbidden
    kube_api.forbid("configmaps", ["update", "create"], forbidden=False)
    core.replace_namespaced_config_map("c", NS, {"metadata": {"name": "c"}, "data": {"k": "2"}})
    assert core.read_namespaced_config_map("c", NS).data == {"k": "2"}
