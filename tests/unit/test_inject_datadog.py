"""Datadog's Autodiscovery annotations on injected pods: ``meshctl inject --datadog`` and the webhook's
JSON patch for a pod annotated ``mesh.txmesh.io/datadog: "true"`` (mesh.control.inject.datadog).

The annotations are Datadog's "AD annotations v2" (Agent 7.36+): ``ad.datadoghq.com/<container>.checks``,
a JSON object of check name -> ``init_config`` and ``instances``, here the OpenMetrics check on the
sidecar's ``/stats/prometheus``; and ``ad.datadoghq.com/<container>.logs``, a JSON array of log configs
with ``source`` and ``service``.
"""

from __future__ import annotations

import base64
import copy
import json

import yaml

from mesh.control.inject import InjectSettings, inject_object
from mesh.control.inject.sidecar import METRICS_PORT, SIDECAR_NAME, pod_template_of
from mesh.control.webhook import review_response
from tests.unit.test_inject import POD_SPEC, WORKLOADS, _review, apply_patch, assert_model_clean, run_inject

CHECKS = f"ad.datadoghq.com/{SIDECAR_NAME}.checks"
LOGS = f"ad.datadoghq.com/{SIDECAR_NAME}.logs"


def _inject(text: str, *args) -> tuple[int, list, str]:
    code, out, err = run_inject(text, *args)
    return code, list(yaml.safe_load_all(out)), err


def _annotations(obj) -> dict:
    return pod_template_of(obj)["metadata"].get("annotations") or {}


def test_meshctl_inject_datadog_annotates_every_workload_for_the_agent():
    code, out, err = _inject(yaml.safe_dump(WORKLOADS["Deployment"]), "--datadog")
    assert code == 0, err
    (deployment,) = out
    annotations = _annotations(deployment)
    checks = json.loads(annotations[CHECKS])
    assert checks == {"openmetrics": {"init_config": {}, "instances": [{
        "openmetrics_endpoint": f"http://%%host%%:{METRICS_PORT}/stats/prometheus",
        "namespace": "txmesh", "metrics": ["istio_.*", "mesh_.*"]}]}}
    assert json.loads(annotations[LOGS]) == [{"source": "envoy", "service": "user-service"}]
    # the container the annotations name is the sidecar, and it serves the port the check scrapes
    (sidecar,) = [c for c in pod_template_of(deployment)["spec"]["initContainers"] if c["name"] == SIDECAR_NAME]
    assert {"name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"} in sidecar["ports"]
    assert_model_clean(deployment)
    code, again, _ = _inject(yaml.safe_dump(deployment), "--datadog")
    assert code == 0 and again == [deployment]  # idempotent


def test_without_the_flag_or_the_annotation_no_datadog_annotations():
    for obj in WORKLOADS.values():
        assert not {key for key in _annotations(inject_object(obj)) if key.startswith("ad.datadoghq.com/")}


def test_the_pods_annotation_decides_first():
    opted_in = copy.deepcopy(WORKLOADS["Pod"])
    opted_in["metadata"]["annotations"] = {"mesh.txmesh.io/datadog": "true"}
    assert CHECKS in _annotations(inject_object(opted_in))
    opted_out = copy.deepcopy(WORKLOADS["Pod"])
    opted_out["metadata"]["annotations"] = {"mesh.txmesh.io/datadog": "false"}
    assert CHECKS not in _annotations(inject_object(opted_out, InjectSettings(datadog=True)))
    own = copy.deepcopy(WORKLOADS["Pod"])
    own["metadata"]["annotations"] = {LOGS: '[{"source":"txmesh","service":"mine"}]'}
    injected = _annotations(inject_object(own, InjectSettings(datadog=True)))
    assert injected[LOGS] == '[{"source":"txmesh","service":"mine"}]' and CHECKS in injected


def test_the_webhook_patch_adds_the_annotations_of_an_annotated_pod():
    pod = {"metadata": {"generateName": "reviews-v2-7f9c-", "labels": {"app": "reviews"},
                        "annotations": {"mesh.txmesh.io/datadog": "true"}},
           "spec": copy.deepcopy(POD_SPEC)}
    response = review_response(_review(pod))["response"]
    patch = json.loads(base64.b64decode(response["patch"]))
    added = {op["path"]: op["value"] for op in patch if op["op"] == "add"}
    # RFC 6901: the "/" of the annotation key is written "~1" in the patch's path
    assert json.loads(added["/metadata/annotations/ad.datadoghq.com~1txmesh-proxy.logs"]) == [
        {"source": "envoy", "service": "reviews"}]
    assert "/metadata/annotations/ad.datadoghq.com~1txmesh-proxy.checks" in added
    patched = apply_patch(pod, patch)
    assert json.loads(patched["metadata"]["annotations"][CHECKS])["openmetrics"]["instances"][0][
        "openmetrics_endpoint"] == "http://%%host%%:15090/stats/prometheus"
    plain = copy.deepcopy(pod)
    del plain["metadata"]["annotations"]
    assert "ad.datadoghq.com" not in base64.b64decode(review_response(_review(plain))["response"]["patch"]).decode()
