"""``meshctl inject`` and mesh.control.inject: every workload kind, opt-outs, idempotence, the client's models."""

from __future__ import annotations

import base64
import copy
import io
import json
import shlex
import textwrap
from contextlib import redirect_stderr, redirect_stdout

import pytest
import yaml

from mesh.cli.main import main as meshctl
from mesh.control.inject import InjectError, InjectSettings, inject_object
from mesh.control.inject.jsonpatch import diff
from mesh.control.inject.sidecar import (
    INIT_NAME,
    POD_TEMPLATE_PATHS,
    SIDECAR_NAME,
    STATUS_ANNOTATION,
    TLS_MODE_LABEL,
    pod_template_of,
)
from mesh.control.webhook import MalformedReview, review_response

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client (pip install txmesh[kubernetes])")
from mesh.control.inject.models import check_model  # noqa: E402

POD_SPEC = {
    "serviceAccountName": "user-service",
    "initContainers": [{"name": "migrate", "image": "busybox", "command": ["true"]}],
    "containers": [{"name": "app", "image": "ghcr.io/example/user-service:1", "ports": [{"containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}}],
    "volumes": [{"name": "data", "emptyDir": {}}],
}
TEMPLATE = {"metadata": {"labels": {"app": "user-service", "version": "v1"}}, "spec": POD_SPEC}
SELECTOR = {"matchLabels": {"app": "user-service"}}

WORKLOADS = {
    "Pod": {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "user-service", "namespace": "demo", "labels": {"app": "user-service"}},
            "spec": POD_SPEC},
    "Deployment": {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "user-service-v1"},
                   "spec": {"replicas": 2, "selector": SELECTOR, "template": TEMPLATE}},
    "StatefulSet": {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
                    "spec": {"serviceName": "db", "selector": SELECTOR, "template": TEMPLATE}},
    "DaemonSet": {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
                  "spec": {"selector": SELECTOR, "template": TEMPLATE}},
    "ReplicaSet": {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "rs"},
                   "spec": {"selector": SELECTOR, "template": TEMPLATE}},
    "Job": {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "batch"},
            "spec": {"template": {**TEMPLATE, "spec": {**POD_SPEC, "restartPolicy": "Never"}}}},
    "CronJob": {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
                "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": {
                    **TEMPLATE, "spec": {**POD_SPEC, "restartPolicy": "OnFailure"}}}}}},
}

PASS_THROUGH = [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "user-service"},
     "spec": {"selector": {"app": "user-service"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}},
    {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "vs"},
     "spec": {"hosts": ["user-service"], "http": [{"route": [{"destination": {"host": "user-service"}}]}]}},
]


def run_inject(text: str, *args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    stdin = io.StringIO(text)
    import sys
    saved, sys.stdin = sys.stdin, stdin
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = meshctl(["inject", "-f", "-", *args])
    finally:
        sys.stdin = saved
    return code, out.getvalue(), err.getvalue()


def assert_model_clean(obj):
    model, problems = check_model(obj)
    assert model is not None and problems == [], problems


def containers(pod):
    return {c["name"]: c for c in pod["spec"]["initContainers"]}


# -- every workload kind ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(WORKLOADS))
def test_every_workload_kind_is_injected_and_loads_into_its_model(kind):
    original = WORKLOADS[kind]
    assert_model_clean(original)
    injected = inject_object(original)
    assert_model_clean(injected)
    pod = pod_template_of(injected)
    names = [c["name"] for c in pod["spec"]["initContainers"]]
    assert names == [INIT_NAME, SIDECAR_NAME, "migrate"], "iptables first, then the sidecar, then the user's"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app"]
    sidecar = containers(pod)[SIDECAR_NAME]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    assert pod["metadata"]["labels"][TLS_MODE_LABEL] == "istio"
    assert json.loads(pod["metadata"]["annotations"][STATUS_ANNOTATION])["initContainers"] == [INIT_NAME,
                                                                                             SIDECAR_NAME]
    assert original == WORKLOADS[kind], "the input is not modified"
    # the model agrees on the shape too
    model, _ = check_model(injected)
    node = model
    for key in POD_TEMPLATE_PATHS[kind] or ():
        node = getattr(node, {"jobTemplate": "job_template"}.get(key, key))
    assert node.spec.init_containers[1].restart_policy == "Always"
    assert node.spec.volumes[-3].projected.sources[0].service_account_token.audience == "txmesh"


def test_the_sidecar_spec():
    pod = pod_template_of(inject_object(WORKLOADS["Deployment"], InjectSettings(image="reg/txmesh:dev")))
    init, sidecar = containers(pod)[INIT_NAME], containers(pod)[SIDECAR_NAME]
    assert init["image"] == sidecar["image"] == "reg/txmesh:dev"
    assert init["command"][:2] == ["meshctl", "iptables"]
    assert init["securityContext"]["runAsUser"] == 0
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    command = sidecar["command"]
    assert command[:4] == ["twistd", "-n", "--pidfile=", "mesh-proxy"]
    flags = dict(zip(command[4::2], command[5::2]))
    assert flags["--control"] == "mesh-control.mesh-system.svc:15012"
    assert flags["--token-file"] == "/var/run/secrets/tokens/txmesh-token"
    assert flags["--namespace"] == "$(POD_NAMESPACE)" and flags["--service-account"] == "$(SERVICE_ACCOUNT)"
    assert flags["--workload"] == "user-service" and flags["--app-port"] == "8080"
    assert "app=user-service" in command and "version=v1" in command
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sidecar["env"] if "valueFrom" in e}
    assert env["POD_NAMESPACE"] == "metadata.namespace" and env["SERVICE_ACCOUNT"] == "spec.serviceAccountName"
    assert sidecar["securityContext"]["runAsUser"] == 1337 and sidecar["securityContext"]["runAsNonRoot"]
    assert init["command"][init["command"].index("--proxy-uid") + 1] == "1337"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # Istio's, on the proxy's health port
        assert sidecar[probe]["httpGet"] == {"path": "/healthz/ready", "port": 15021}, probe
    assert flags["--health-port"] == "15021"
    assert {"name": "http-health", "containerPort": 15021, "protocol": "TCP"} in sidecar["ports"]
    assert sidecar["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert init["resources"]["requests"]
    token = next(v for v in pod["spec"]["volumes"] if v["name"] == "txmesh-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"] == {
        "audience": "txmesh", "expirationSeconds": 3600, "path": "txmesh-token"}
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    assert mounts["txmesh-token"] == "/var/run/secrets/tokens"
    assert [v["name"] for v in pod["spec"]["volumes"]][0] == "data", "the user's volumes stay first"


def test_the_sidecar_command_parses_with_mesh_proxy_options(monkeypatch):
    from mesh.proxy.app_probes import AppProbe
    from mesh.proxy.tap import Options
    pod = pod_template_of(inject_object(WORKLOADS["Deployment"]))
    command = containers(pod)[SIDECAR_NAME]["command"]
    for env in containers(pod)[SIDECAR_NAME]["env"]:  # mesh-proxy reads $TXMESH_APP_PROBERS
        if "value" in env:
            monkeypatch.setenv(env["name"], env["value"])
    argv = [a.replace("$(POD_NAMESPACE)", "demo").replace("$(SERVICE_ACCOUNT)", "user-service")
            for a in command[command.index("mesh-proxy") + 1:]]
    options = Options()
    options.parseOptions(argv)
    assert options["control"] == ("mesh-control.mesh-system.svc", 15012)
    assert options["labels"] == {"app": "user-service", "version": "v1"}
    assert options["namespace"] == "demo" and options["app-port"] == 8080
    # the probes reach the port the proxy serves /healthz/ready on
    assert options["health-port"] == containers(pod)[SIDECAR_NAME]["readinessProbe"]["httpGet"]["port"]
    # and the app's rewritten probe is one the health port runs
    assert options["app-probers"] == {"/app-health/app/readyz": AppProbe(port=8080, timeout=1.0, path="/healthz")}


def test_the_init_command_parses_with_meshctl_iptables():
    iptables = pytest.importorskip("mesh.cli.iptables")
    template = copy.deepcopy(WORKLOADS["Deployment"])
    template["spec"]["template"]["metadata"]["annotations"] = {
        "traffic.sidecar.istio.io/excludeOutboundPorts": "5432, 6379",
        "traffic.sidecar.istio.io/excludeInboundPorts": "9000",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "169.254.169.254/32,10.0.0.0/8"}
    pod = pod_template_of(inject_object(template))
    command = containers(pod)[INIT_NAME]["command"]
    import argparse
    parser = argparse.ArgumentParser()
    iptables.add_parser(parser.add_subparsers())
    spec = iptables.spec_from_args(parser.parse_args(command[1:]))
    assert spec.proxy_uid == 1337 and spec.outbound_port == 15001 and spec.inbound_port == 15006
    assert spec.exclude_outbound_ports == (5432, 6379)
    assert spec.exclude_inbound_ports == (9000,)
    assert spec.exclude_outbound_ip_ranges == ("169.254.169.254/32", "10.0.0.0/8")


# -- opt-outs, annotations, pass-through, idempotence ------------------------------------------

@pytest.mark.parametrize("where", ["annotations", "labels"])
def test_opt_out_on_the_template_or_the_pod(where):
    for kind in ("Deployment", "Pod", "CronJob"):
        obj = copy.deepcopy(WORKLOADS[kind])
        pod_template_of(obj)["metadata"].setdefault(where, {})["sidecar.istio.io/inject"] = "false"
        assert inject_object(obj) == obj, kind


def test_inject_true_and_host_network():
    obj = copy.deepcopy(WORKLOADS["Deployment"])
    pod_template_of(obj)["metadata"]["annotations"] = {"sidecar.istio.io/inject": "true"}
    assert SIDECAR_NAME in containers(pod_template_of(inject_object(obj)))
    pod_template_of(obj)["spec"]["hostNetwork"] = True
    assert inject_object(obj) == obj


def test_non_workload_kinds_pass_through_unchanged():
    for obj in PASS_THROUGH:
        assert inject_object(obj) == obj
    text = yaml.safe_dump_all(PASS_THROUGH, sort_keys=False)
    code, out, _ = run_inject(text)
    assert code == 0 and list(yaml.safe_load_all(out)) == PASS_THROUGH


def test_excludes_become_iptables_flags():
    obj = copy.deepcopy(WORKLOADS["Pod"])
    obj["metadata"]["annotations"] = {"traffic.sidecar.istio.io/excludeOutboundPorts": "5432,6379",
                                      "traffic.sidecar.istio.io/excludeInboundPorts": "9000",
                                      "traffic.sidecar.istio.io/excludeOutboundIPRanges": "169.254.169.254/32"}
    command = containers(inject_object(obj))[INIT_NAME]["command"]
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags["--exclude-outbound-ports"] == "5432,6379"
    assert flags["--exclude-inbound-ports"] == "9000"
    assert flags["--exclude-outbound-ip-ranges"] == "169.254.169.254/32"
    plain = containers(inject_object(WORKLOADS["Pod"]))[INIT_NAME]["command"]
    assert not any(a.startswith("--exclude") for a in plain)


@pytest.mark.parametrize("key, value, words", [
    ("traffic.sidecar.istio.io/excludeOutboundPorts", "5432,http", "'http' is not a port"),
    ("traffic.sidecar.istio.io/excludeInboundPorts", "70000", "'70000' is not a port"),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.0/33", "not an IPv4 range"),
    ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "fd00::/8", "not an IPv4 range"),
])
def test_bad_annotations_are_errors_naming_the_object(key, value, words):
    obj = copy.deepcopy(WORKLOADS["Deployment"])
    pod_template_of(obj)["metadata"]["annotations"] = {key: value}
    with pytest.raises(InjectError, match="Deployment/user-service-v1"):
        inject_object(obj)
    code, out, err = run_inject(yaml.safe_dump(obj))
    assert code == 1 and out == ""
    assert key in err and words in err and "nothing written" in err


def test_idempotent_dicts_and_text():
    documents = list(WORKLOADS.values()) + PASS_THROUGH
    text = yaml.safe_dump_all(documents, sort_keys=False)
    code, once, err = run_inject(text)
    assert code == 0, err
    code, twice, _ = run_inject(once)
    assert twice == once
    for obj in yaml.safe_load_all(once):
        assert inject_object(obj) == obj
        if obj["kind"] in WORKLOADS:
            assert [c["name"] for c in pod_template_of(obj)["spec"]["initContainers"]].count(SIDECAR_NAME) == 1


def test_multi_document_cli_output_loads_into_the_models(tmp_path):
    source = tmp_path / "in.yaml"
    source.write_text(textwrap.dedent("""\
        # a comment, an empty document and a List
        ---
        apiVersion: v1
        kind: List
        items:
        - apiVersion: v1
          kind: Pod
          metadata: {name: p}
          spec:
            containers: [{name: c, image: nginx}]
        ---
        """) + yaml.safe_dump_all(list(WORKLOADS.values()) + PASS_THROUGH, sort_keys=False))
    target = tmp_path / "out.yaml"
    assert meshctl(["inject", "-f", str(source), "-o", str(target), "--image", "txmesh/txmesh:test"]) == 0
    text = target.read_text()
    assert "&id" not in text and "*id" not in text, "no YAML anchors in manifests"
    out = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in out] == ["List"] + list(WORKLOADS) + [d["kind"] for d in PASS_THROUGH]
    assert_model_clean(out[0]["items"][0])
    assert containers(out[0]["items"][0])[SIDECAR_NAME]["image"] == "txmesh/txmesh:test"
    for obj in out[1:1 + len(WORKLOADS)]:
        assert_model_clean(obj)


def test_yaml_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Pod\nmetadata: {name: [\n")
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        assert meshctl(["inject", "-f", str(bad)]) == 1
    assert f"{bad}:" in err.getvalue() and "yaml:" in err.getvalue()


# -- JSON Patch: the webhook's diff, checked with an independent RFC 6902 applier --------------

def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_patch(document, operations):
    """A small RFC 6902 applier (add, remove, replace, test) for checking patches."""
    document = copy.deepcopy(document)
    for op in operations:
        tokens = [_unescape(t) for t in op["path"].split("/")[1:]]
        if not tokens:
            if op["op"] in ("add", "replace"):
                document = copy.deepcopy(op["value"])
                continue
            raise ValueError(f"cannot {op['op']} the root")
        parent = document
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if op["op"] == "add":
                if not 0 <= index <= len(parent):
                    raise IndexError(op["path"])
                parent.insert(index, copy.deepcopy(op["value"]))
            elif op["op"] == "remove":
                del parent[index]
            elif op["op"] == "replace":
                parent[index] = copy.deepcopy(op["value"])
            elif op["op"] == "test":
                assert parent[index] == op["value"]
            else:
                raise ValueError(op)
        else:
            if op["op"] == "add":
                parent[last] = copy.deepcopy(op["value"])
            elif op["op"] in ("remove", "replace"):
                if last not in parent:
                    raise KeyError(op["path"])
                if op["op"] == "remove":
                    del parent[last]
                else:
                    parent[last] = copy.deepcopy(op["value"])
            elif op["op"] == "test":
                assert parent[last] == op["value"]
            else:
                raise ValueError(op)
    return document


@pytest.mark.parametrize("before, after", [
    ({"a": 1}, {"a": 1, "b/c~": [1]}),
    ({"a": [1, 2, 3]}, {"a": [0, 1, 9, 2, 3, 4]}),
    ({"a": [{"name": "x", "v": 1}]}, {"a": [{"name": "y"}, {"name": "x", "v": 2}]}),
    ({"a": [1, 2, 3]}, {"a": [3]}),
    ({"a": {"b": 1}, "c": 2}, {"a": {"b": "1"}}),
    ({"a": True}, {"a": 1}),
    ({}, {"metadata": {"annotations": {"sidecar.istio.io/status": "{}"}}}),
])
def test_diff_applies_back(before, after):
    assert apply_patch(before, diff(before, after)) == after
    assert diff(after, after) == []


def test_pod_patch_adds_containers_and_rewrites_only_the_users_probes():
    pod = copy.deepcopy(WORKLOADS["Pod"])
    injected = inject_object(pod)
    patch = diff(pod, injected)
    assert apply_patch(pod, patch) == injected
    paths = {(op["op"], op["path"]) for op in patch}
    assert ("add", "/spec/initContainers/0") in paths and ("add", "/spec/initContainers/1") in paths
    assert ("add", "/metadata/annotations") in paths
    assert ("add", "/metadata/labels/security.istio.io~1tlsMode") in paths
    assert {op["path"] for op in patch if op["path"].startswith("/spec/containers")} == {
        "/spec/containers/0/readinessProbe/httpGet/path", "/spec/containers/0/readinessProbe/httpGet/port",
        "/spec/containers/0/readinessProbe/httpGet/scheme"}


def _review(obj, uid="705ab4f5-6393-11e8-b7cc-42010a800002", **request):
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "namespace": "demo", "operation": "CREATE", "object": obj, **request}}


def test_review_response_unit():
    pod = {"metadata": {"generateName": "user-service-v1-5d8f-", "labels": {"app": "user-service"}},
           "spec": copy.deepcopy(POD_SPEC)}
    answer = review_response(_review(pod))
    response = answer["response"]
    assert answer["apiVersion"] == "admission.k8s.io/v1" and response["allowed"] is True
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002" and response["patchType"] == "JSONPatch"
    patched = apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    assert SIDECAR_NAME in containers(patched)
    # opted out, already injected, not a pod CREATE: allowed, no patch
    for review in (_review(patched),
                   _review({**pod, "metadata": {"annotations": {"sidecar.istio.io/inject": "false"}}}),
                   _review(pod, operation="UPDATE"),
                   _review(pod, kind={"group": "apps", "version": "v1", "kind": "Deployment"})):
        assert review_response(review)["response"] == {"uid": review["request"]["uid"], "allowed": True}
    bad = copy.deepcopy(pod)
    bad["metadata"]["annotations"] = {"traffic.sidecar.istio.io/excludeOutboundPorts": "x"}
    response = review_response(_review(bad))["response"]
    assert response["allowed"] is True and "patch" not in response and "is not a port" in response["warnings"][0]
    for malformed in ([], {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"},
                      {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}},
                      _review("not a pod")):
        with pytest.raises(MalformedReview):
            review_response(malformed)


def test_shlex_friendly_commands():
    """Every command argument is a plain string (no numbers that YAML would retype)."""
    pod = pod_template_of(inject_object(WORKLOADS["Deployment"]))
    for container in pod["spec"]["initContainers"][:2]:
        assert all(isinstance(a, str) for a in container["command"]), shlex.join(map(str, container["command"]))


# -- app probes (mesh.control.inject.probes): through the sidecar's health port, as Istio rewrites them ------------

PROBED_POD = {
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "web"}},
    "spec": {"containers": [
        {"name": "web", "image": "web:1", "ports": [{"name": "http", "containerPort": 8080},
                                                      {"name": "admin", "containerPort": 9090}],
         "livenessProbe": {"httpGet": {"path": "/live", "port": "http", "scheme": "HTTPS",
                                       "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                           "periodSeconds": 7, "timeoutSeconds": 4, "failureThreshold": 5},
         "readinessProbe": {"tcpSocket": {"port": "admin"}, "initialDelaySeconds": 2},
         "startupProbe": {"exec": {"command": ["cat", "/tmp/started"]}}},
        {"name": "worker", "image": "worker:1",
         "livenessProbe": {"grpc": {"port": 7070}},
         "readinessProbe": {"httpGet": {"path": "/ready", "port": 80, "host": "10.0.0.9"}},
         "startupProbe": {"httpGet": {"port": 8081}}},
    ]},
}


def app_probers(pod) -> dict:
    env = {e["name"]: e.get("value") for e in containers(pod)[SIDECAR_NAME]["env"]}
    return json.loads(env["TXMESH_APP_PROBERS"]) if "TXMESH_APP_PROBERS" in env else None


def to_health_port(container: str, kind: str) -> dict:
    return {"path": f"/app-health/{container}/{kind}", "port": 15021, "scheme": "HTTP"}


def test_http_and_tcp_probes_go_through_the_health_port():
    injected = inject_object(PROBED_POD)
    assert_model_clean(injected)
    web, worker = injected["spec"]["containers"]
    # rewritten: the kubelet asks the sidecar; everything but the check itself stays
    assert web["livenessProbe"] == {"httpGet": to_health_port("web", "livez"), "periodSeconds": 7,
                                    "timeoutSeconds": 4, "failureThreshold": 5}
    assert web["readinessProbe"] == {"httpGet": to_health_port("web", "readyz"), "initialDelaySeconds": 2}
    assert worker["startupProbe"] == {"httpGet": to_health_port("worker", "startupz")}
    # left alone: exec (runs in the container), grpc (not spoken by the sidecar), a probe of another host
    original_web, original_worker = PROBED_POD["spec"]["containers"]
    assert web["startupProbe"] == original_web["startupProbe"]
    assert worker["livenessProbe"] == original_worker["livenessProbe"]
    assert worker["readinessProbe"] == original_worker["readinessProbe"]
    # the originals, for the sidecar: named ports resolved, defaults (path /, scheme, timeout 1) made explicit
    assert app_probers(injected) == {
        "/app-health/web/livez": {"httpGet": {"path": "/live", "port": 8080, "scheme": "HTTPS",
                                              "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                                  "timeoutSeconds": 4},
        "/app-health/web/readyz": {"tcpSocket": {"port": 9090}, "timeoutSeconds": 1},
        "/app-health/worker/startupz": {"httpGet": {"path": "/", "port": 8081, "scheme": "HTTP"},
                                        "timeoutSeconds": 1},
    }
    # the sidecar takes them as they are
    from mesh.proxy.app_probes import parse_app_probers
    assert set(parse_app_probers(json.dumps(app_probers(injected)))) == set(app_probers(injected))
    assert inject_object(injected) == injected, "injecting again does not rewrite twice"


@pytest.mark.parametrize("value", ["false", "False", "0"])
def test_rewrite_app_http_probers_false_leaves_the_probes(value):
    pod = copy.deepcopy(PROBED_POD)
    pod["metadata"]["annotations"] = {"sidecar.istio.io/rewriteAppHTTPProbers": value}
    injected = inject_object(pod)
    assert injected["spec"]["containers"] == PROBED_POD["spec"]["containers"]
    assert app_probers(injected) is None
    assert SIDECAR_NAME in containers(injected), "the sidecar itself is injected"


def test_a_pod_without_probes_gets_no_probers():
    pod = copy.deepcopy(WORKLOADS["Pod"])
    del pod["spec"]["containers"][0]["readinessProbe"]
    assert app_probers(inject_object(pod)) is None


def test_an_unknown_named_probe_port_is_an_error_naming_the_object_and_container():
    obj = copy.deepcopy(WORKLOADS["Deployment"])
    pod_template_of(obj)["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = "metrics"
    with pytest.raises(InjectError) as raised:
        inject_object(obj)
    assert str(raised.value) == ("Deployment/user-service-v1: container 'app': the readinessProbe's port 'metrics' "
                                 "is neither a port number nor the name of one of the container's ports (it names "
                                 "none); give the number or name the containerPort")
    code, out, err = run_inject(yaml.safe_dump(obj))
    assert code == 1 and out == "" and "'metrics'" in err and "nothing written" in err
    # the webhook admits such a pod without a sidecar and says why
    pod = {"metadata": {"name": "p"}, "spec": copy.deepcopy(pod_template_of(obj)["spec"])}
    response = review_response(_review(pod))["response"]
    assert response["allowed"] is True and "patch" not in response
    assert "the readinessProbe's port 'metrics'" in response["warnings"][0]
