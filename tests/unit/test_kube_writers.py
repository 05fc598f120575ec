"""Pure parts of mesh-control's Kubernetes writers: what a right ConfigMap / caBundle is, and write pacing."""

from __future__ import annotations

import base64

from mesh.control.kube.reconcile import QUIET, _Pace
from mesh.control.kube.root_cert import KEY, LABELS, NAME, in_sync, wanted
from mesh.control.kube.webhook_ca import with_ca_bundle

BUNDLE = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_a_new_config_map_holds_the_bundle_and_the_labels():
    body = wanted("shop", BUNDLE)
    assert body == {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": NAME, "namespace": "shop", "labels": LABELS}, "data": {KEY: BUNDLE}}
    assert in_sync(body, BUNDLE)


def test_a_written_back_config_map_keeps_its_version_and_what_others_added():
    current = {"metadata": {"name": NAME, "namespace": "shop", "resourceVersion": "42", "labels": {"team": "a"}},
               "data": {KEY: "old", "extra": "x"}}
    assert not in_sync(current, BUNDLE)
    body = wanted("shop", BUNDLE, current)
    assert body["metadata"] == {"name": NAME, "namespace": "shop", "resourceVersion": "42",
                                "labels": {"team": "a", **LABELS}}
    assert body["data"] == {KEY: BUNDLE, "extra": "x"}
    assert current["data"][KEY] == "old" and current["metadata"]["labels"] == {"team": "a"}, "not modified in place"
    assert in_sync(body, BUNDLE)


def test_a_config_map_without_the_label_or_with_another_bundle_is_not_in_sync():
    assert not in_sync(None, BUNDLE)
    assert not in_sync({"metadata": {"labels": {}}, "data": {KEY: BUNDLE}}, BUNDLE)
    assert not in_sync({"metadata": {"labels": LABELS}, "data": {KEY: BUNDLE + "x"}}, BUNDLE)


def test_every_webhook_gets_the_ca_bundle_and_nothing_else_changes():
    ca_bundle = base64.b64encode(BUNDLE.encode()).decode()
    configuration = {"metadata": {"name": "injector", "resourceVersion": "7"}, "webhooks": [
        {"name": "a", "clientConfig": {"service": {"name": "s"}, "caBundle": "b2xk"}}, {"name": "b"}]}
    patched = with_ca_bundle(configuration, ca_bundle)
    assert [hook["clientConfig"].get("caBundle") for hook in patched["webhooks"]] == [ca_bundle, ca_bundle]
    assert patched["webhooks"][0]["clientConfig"]["service"] == {"name": "s"}
    assert configuration["webhooks"][0]["clientConfig"]["caBundle"] == "b2xk", "a copy"
    assert with_ca_bundle(patched, ca_bundle) == patched
    assert with_ca_bundle({"metadata": {}}, ca_bundle) == {"metadata": {}}


def test_a_key_written_again_soon_waits_a_growing_backoff_and_is_counted_as_contested():
    pace = _Pace()
    assert pace.delay(100.0) == 0.0, "the first write goes at once"
    delays = []
    for _ in range(10):  # a tug of war: out of sync again right after each attempt
        delays.append(pace.delay(pace.last + 0.05))
    assert all(0 < delay <= pace.backoff.maximum for delay in delays)
    assert delays[0] <= 0.2 and delays[-1] >= pace.backoff.maximum / 2, "grows to about 30 s, not reset"
    assert pace.streak == 10
    assert pace.delay(pace.last + QUIET) == 0.0 and pace.streak == 0, "after a quiet period: at once again"
