"""Kubernetes Event bodies (mesh.control.kube.events) and the "file" names of custom objects
(mesh.control.kube.crds)."""

import re

from mesh.control.kube.crds import origin, resources
from mesh.control.kube.events import MAX_MESSAGE, event_body

CR = {"apiVersion": "networking.txmesh.io/v1", "kind": "VirtualService",
      "metadata": {"name": "reviews", "namespace": "shop", "uid": "u-1", "resourceVersion": "42",
                   "labels": {"a": "b"}}, "spec": {}}


def test_an_event_names_the_object_and_is_named_by_what_it_reports():
    body = event_body(CR, "Warning", "InvalidConfig", "bad", "host-1", 1795645932.5)
    assert body["involvedObject"] == {"apiVersion": "networking.txmesh.io/v1", "kind": "VirtualService",
                                      "name": "reviews", "namespace": "shop", "uid": "u-1", "resourceVersion": "42"}
    assert body["metadata"]["namespace"] == "shop"
    name = body["metadata"]["name"]
    assert re.fullmatch(r"reviews\.[0-9a-f]{16}", name), name
    # the same report from another replica, later, has the same name (so the API server keeps one Event) ...
    assert event_body(CR, "Warning", "InvalidConfig", "bad", "host-2", 1795645999.0)["metadata"]["name"] == name
    # ... a new version of the object, or another reason, another name
    newer = {**CR, "metadata": {**CR["metadata"], "resourceVersion": "43"}}
    assert event_body(newer, "Warning", "InvalidConfig", "bad", "host-1", 0.0)["metadata"]["name"] != name
    assert event_body(CR, "Warning", "Other", "bad", "host-1", 0.0)["metadata"]["name"] != name
    assert (body["type"], body["reason"], body["message"], body["count"]) == ("Warning", "InvalidConfig", "bad", 1)
    assert body["firstTimestamp"] == body["lastTimestamp"] == "2026-11-25T22:32:12Z"
    assert body["source"] == {"component": "mesh-control"} and body["reportingInstance"] == "host-1"


def test_long_messages_are_cut_to_what_kubernetes_keeps():
    body = event_body(CR, "Warning", "InvalidConfig", "x" * 5000, "h", 0.0)
    assert len(body["message"]) == MAX_MESSAGE and body["message"].endswith("...")


def test_watched_custom_resources_and_their_names_in_errors():
    assert len(resources()) == 9 and len(resources(istio=True)) == 18
    assert ("security.istio.io", "v1", "requestauthentications") in resources(istio=True)
    assert ("security.istio.io", "v1", "peerauthentications") in resources(istio=True)
    assert ("security.istio.io", "v1", "peerauthentications") not in resources()
    assert origin("virtualservices", "networking.txmesh.io", CR) == \
        "kubernetes:virtualservices.networking.txmesh.io/shop/reviews"
