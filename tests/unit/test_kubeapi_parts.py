"""The parts of the test Kubernetes API server that need no socket: selectors, patches, the store's
revisions, history and compaction, and what the HTTP layer answers when the fake itself fails."""

from __future__ import annotations

import io
import json

import pytest
from twisted.web.test.requesthelper import DummyRequest

from tests.harness.kubeapi import KubeApiServer
from tests.harness.kubepatch import PatchError, UnsupportedMediaType, apply_patch, json_patch, merge_patch
from tests.harness.kubeselectors import SelectorError, field_selector, label_selector
from tests.harness.kubestore import Expired, Store


@pytest.mark.parametrize("text, labels, expected", [
    ("app=web", {"app": "web"}, True),
    ("app==web,tier=front", {"app": "web"}, False),
    ("app!=web", {}, True),
    ("app", {"app": ""}, True),
    ("!app", {"app": "x"}, False),
    ("app in (web, db)", {"app": "db"}, True),
    ("app in (web,db)", {}, False),
    ("app notin (web,db),tier", {"tier": "x"}, True),
    ("", {}, True),
])
def test_label_selectors(text, labels, expected):
    assert label_selector(text)(labels) is expected


def test_selectors_that_do_not_parse_say_what_to_write():
    with pytest.raises(SelectorError, match="unable to parse requirement: 'app in web'"):
        label_selector("app in web")
    with pytest.raises(SelectorError, match="field label not supported: status.phase"):
        field_selector("status.phase=Running")
    assert field_selector("metadata.namespace!=kube-system")({"metadata": {"namespace": "demo"}})


def test_merge_patch_merges_objects_removes_nulls_and_replaces_lists():
    target = {"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"hosts": ["x", "y"]}}
    patched = merge_patch(target, {"metadata": {"labels": {"a": None, "c": "3"}}, "spec": {"hosts": ["z"]}})
    assert patched == {"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"hosts": ["z"]}}
    assert target["metadata"]["labels"] == {"a": "1", "b": "2"}  # the target is not changed


def test_strategic_merge_patch_merges_keyed_lists_by_their_key():
    target = {"metadata": {"name": "x"}, "webhooks": [{"name": "a", "timeoutSeconds": 10, "clientConfig": {"url": "u"}},
                                                     {"name": "b"}]}
    patch = {"webhooks": [{"name": "a", "clientConfig": {"caBundle": "Q0E="}}, {"name": "b", "$patch": "delete"},
                          {"name": "c"}], "metadata": {"labels": {"l": "v"}}}
    strategic = "application/strategic-merge-patch+json"
    merged = apply_patch(strategic, target, patch, strategic_allowed=True, merge_keys={"webhooks": "name"})
    assert merged["webhooks"] == [{"name": "a", "timeoutSeconds": 10, "clientConfig": {"url": "u", "caBundle": "Q0E="}},
                                  {"name": "c"}]
    assert merged["metadata"] == {"name": "x", "labels": {"l": "v"}}
    assert target["webhooks"][1] == {"name": "b"}, "the target is not modified"
    # a JSON merge patch replaces the list, as on a real server
    plain = apply_patch("application/merge-patch+json", target, patch, strategic_allowed=True,
                        merge_keys={"webhooks": "name"})
    assert plain["webhooks"] == patch["webhooks"]
    with pytest.raises(PatchError, match="merge key 'name'"):
        apply_patch(strategic, target, {"webhooks": [{"timeoutSeconds": 5}]}, strategic_allowed=True,
                    merge_keys={"webhooks": "name"})


def test_json_patch_operations_and_their_errors():
    target = {"spec": {"hosts": ["a"], "port": 1}}
    patched = json_patch(target, [{"op": "add", "path": "/spec/hosts/-", "value": "b"},
                                  {"op": "replace", "path": "/spec/port", "value": 2},
                                  {"op": "copy", "from": "/spec/port", "path": "/spec/copy"},
                                  {"op": "move", "from": "/spec/copy", "path": "/spec/moved"},
                                  {"op": "test", "path": "/spec/hosts/1", "value": "b"}])
    assert patched == {"spec": {"hosts": ["a", "b"], "port": 2, "moved": 2}}
    with pytest.raises(PatchError, match="test operation failed"):
        json_patch(target, [{"op": "test", "path": "/spec/port", "value": 9}])
    with pytest.raises(PatchError, match="index 5 is out of range"):
        json_patch(target, [{"op": "remove", "path": "/spec/hosts/5"}])
    with pytest.raises(PatchError, match="unknown JSON patch operation 'merge'"):
        json_patch(target, [{"op": "merge", "path": "/spec"}])
    with pytest.raises(UnsupportedMediaType, match="application/merge-patch\\+json"):
        apply_patch("application/apply-patch+yaml", target, {}, strategic_allowed=True)


def test_store_revisions_history_compaction_and_reads_at_a_revision():
    store = Store()
    seen = []
    store.subscribe("/pods", seen.append)
    first = store.put("/pods", {"metadata": {"name": "a", "namespace": "ns"}, "v": 1})
    store.put("/secrets", {"metadata": {"name": "s", "namespace": "ns"}})
    second = store.put("/pods", {"metadata": {"name": "a", "namespace": "ns"}, "v": 2})
    gone = store.remove("/pods", "ns", "a")
    assert [int(obj["metadata"]["resourceVersion"]) for obj in (first, second, gone)] == [2, 4, 5]
    assert [(change.type, change.revision) for change in seen] == [("ADDED", 2), ("MODIFIED", 4), ("DELETED", 5)]
    assert [change.type for change in store.changes_since("/pods", 2)] == ["MODIFIED", "DELETED"]
    assert store.items_at("/pods", 4) == [second] and store.items_at("/pods", 1) == [] and store.items("/pods") == []
    assert store.compact() == 5
    with pytest.raises(Expired, match=r"too old resource version: 4 \(5\)"):
        store.changes_since("/pods", 4)
    with pytest.raises(Expired):
        store.items_at("/pods", 4)
    assert store.changes_since("/pods", 5) == []


def test_a_failure_inside_the_fake_is_a_500_status_that_says_so(monkeypatch):
    api = KubeApiServer()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(api.resources, "list", broken)
    request = DummyRequest([b""])
    request.method, request.path, request.uri = b"GET", b"/api/v1/pods", b"/api/v1/pods"
    request.content = io.BytesIO()
    status = json.loads(api.render(request))
    assert request.responseCode == 500
    assert status["reason"] == "InternalError"
    assert "test API server" in status["message"] and "boom" in status["message"]
