"""deploy/: every manifest loads into the kubernetes client's model for its kind, custom resources fit
their CRD's schema (and txmesh's own validation), kustomizations reference existing files only, and
the pieces agree with each other (ports, names, the proxy UID)."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mesh.config.loader import load_documents
from mesh.config.validate import validate
from mesh.control.inject import inject_object
from mesh.control.inject.sidecar import PROXY_UID, pod_template_of

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client (pip install txmesh[kubernetes])")
from mesh.control.inject.models import check_model, model_name  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OTHERS = {"grafana"}  # deploy/ subtrees that are not Kubernetes manifests of this layout


def manifest_files():
    return sorted(p for p in DEPLOY.rglob("*.yaml")
                  if p.relative_to(DEPLOY).parts[0] not in OTHERS and p.name != "kustomization.yaml")


def documents(path: Path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_documents():
    return [(path, doc) for path in manifest_files() for doc in documents(path)]


def crds() -> dict:
    """(group, kind) -> the v1 openAPIV3Schema."""
    found = {}
    for _, doc in all_documents():
        if doc["kind"] == "CustomResourceDefinition":
            spec = doc["spec"]
            (version,) = spec["versions"]
            found[(spec["group"], spec["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return found


# -- a structural check of a CR against its CRD's schema (the subset of OpenAPI v3 the CRDs use) --

_CHECKED = {"type", "properties", "required", "items", "additionalProperties", "enum", "minimum", "maximum",
            "pattern", "minItems", "maxItems", "maxProperties", "description", "x-kubernetes-preserve-unknown-fields"}


def schema_problems(value, schema, path="") -> list[str]:
    unknown = set(schema) - _CHECKED
    assert not unknown, f"{path}: the checker does not know {unknown}"
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool}
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{path}: {value!r} is not an integer"]
    elif kind and not isinstance(value, types[kind]):
        return [f"{path}: {value!r} is not a {kind}"]
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"] or "maximum" in schema and value > schema["maximum"]:
        problems.append(f"{path}: {value} out of range")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        problems.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if kind == "array":
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            problems.append(f"{path}: {len(value)} items")
        for i, item in enumerate(value):
            problems += schema_problems(item, schema["items"], f"{path}[{i}]")
    if kind == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields") or path == ".metadata":
            return problems
        if len(value) > schema.get("maxProperties", len(value)):
            problems.append(f"{path}: at most {schema['maxProperties']} fields")
        problems += [f"{path}.{key}: required" for key in schema.get("required", ()) if key not in value]
        for key, item in value.items():
            if key in schema.get("properties", {}):
                problems += schema_problems(item, schema["properties"][key], f"{path}.{key}")
            elif "additionalProperties" in schema:
                problems += schema_problems(item, schema["additionalProperties"], f"{path}.{key}")
            else:
                problems.append(f"{path}.{key}: unknown field (the API server would prune or refuse it)")
    return problems


# -- the tests ----------------------------------------------------------------------------------

def test_there_are_manifests():
    kinds = {doc["kind"] for _, doc in all_documents()}
    assert {"Namespace", "CustomResourceDefinition", "Deployment", "Service", "ServiceAccount", "ClusterRole",
            "ClusterRoleBinding", "Role", "RoleBinding", "MutatingWebhookConfiguration",
            "AuthorizationPolicy", "PeerAuthentication", "VirtualService", "DestinationRule"} <= kinds


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_loads_into_its_model_or_fits_its_crd(path):
    schemas = crds()
    for doc in documents(path):
        where = f"{path.relative_to(DEPLOY)}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if model_name(doc):
            model, problems = check_model(doc)
            assert model is not None and problems == [], f"{where}: {problems}"
            assert model.metadata.name
        else:
            group, _, version = doc["apiVersion"].partition("/")
            assert (group, doc["kind"]) in schemas, f"{where}: no model and no CRD for {doc['apiVersion']}"
            assert version == "v1"
            assert schema_problems(doc, schemas[(group, doc["kind"])]) == [], where
            assert doc["metadata"].get("namespace"), f"{where}: set the namespace"


def test_crd_schemas_reject_what_they_should():
    schemas = crds()
    vs = schemas[("networking.txmesh.io", "VirtualService")]
    good = {"apiVersion": "networking.txmesh.io/v1", "kind": "VirtualService", "metadata": {"name": "a"},
            "spec": {"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}}], "timeout": "1.5s"}]}}
    assert schema_problems(good, vs) == []
    bad = yaml.safe_load(yaml.safe_dump(good))
    bad["spec"]["http"][0].update({"timeout": 5, "delegate": {}})
    bad["spec"]["http"][0]["route"][0]["weight"] = -1
    problems = "\n".join(schema_problems(bad, vs))
    assert "timeout: 5 is not a string" in problems and "delegate: unknown field" in problems
    assert "weight: -1 out of range" in problems
    pa = schemas[("security.txmesh.io", "PeerAuthentication")]
    assert schema_problems({"spec": {"mtls": {"mode": "STRICTER"}}}, pa)


def test_every_crd_is_structural_and_preserves_unknown_fields_only_in_status():
    def walk(schema, path):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            assert path.endswith(".status"), path
        assert "type" in schema or path == "", f"{path}: structural schemas need a type"
        for key, sub in schema.get("properties", {}).items():
            walk(sub, f"{path}.{key}")
        if isinstance(schema.get("additionalProperties"), dict):
            walk(schema["additionalProperties"], f"{path}.*")
        if "items" in schema:
            walk(schema["items"], f"{path}[]")
    schemas = crds()
    assert {group for group, _ in schemas} == {"networking.txmesh.io", "security.txmesh.io"}
    assert {kind for _, kind in schemas} == {"VirtualService", "DestinationRule", "ServiceEntry", "WorkloadEntry",
                                             "Sidecar", "Gateway", "AuthorizationPolicy", "PeerAuthentication",
                                             "RequestAuthentication"}
    for schema in schemas.values():
        walk(schema, "")


def test_generated_crds_are_up_to_date():
    result = subprocess.run([sys.executable, str(DEPLOY / "tools" / "gen_crds.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_kustomizations_reference_existing_files_and_every_file_is_referenced():
    kustomizations = sorted(p for p in DEPLOY.rglob("kustomization.yaml") if p.relative_to(DEPLOY).parts[0]
                            not in OTHERS)
    assert kustomizations
    referenced = set()
    for path in kustomizations:
        k = yaml.safe_load(path.read_text())
        assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
        for entry in k.get("resources", []):
            target = (path.parent / entry).resolve()
            assert target.exists(), f"{path.relative_to(DEPLOY)}: {entry} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), f"{entry}: a directory needs a kustomization.yaml"
            else:
                referenced.add(target)
    orphans = [str(p.relative_to(DEPLOY)) for p in manifest_files() if p.resolve() not in referenced]
    assert orphans == [], "manifests no kustomization includes"
    base = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    assert base["resources"] == ["namespace.yaml", "crds", "control-plane", "webhook"]


def _by_kind(kind, name=None):
    found = [doc for _, doc in all_documents() if doc["kind"] == kind and (name is None
                                                                         or doc["metadata"]["name"] == name)]
    assert found, (kind, name)
    return found


def test_control_plane_service_webhook_and_rbac_agree():
    (deployment,) = _by_kind("Deployment", "mesh-control")
    (service,) = _by_kind("Service", "mesh-control")
    (webhook,) = _by_kind("MutatingWebhookConfiguration")
    assert deployment["spec"]["replicas"] == 2
    assert {p["port"] for p in service["spec"]["ports"]} == {15012, 15014, 15017}
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    served = {p["containerPort"] for c in deployment["spec"]["template"]["spec"]["containers"]
              for p in c.get("ports", [])}
    assert served == {15012, 15014, 15017}
    (hook,) = webhook["webhooks"]
    assert hook["clientConfig"]["service"] == {"name": "mesh-control", "namespace": "mesh-system",
                                               "path": "/inject", "port": 15017}
    assert hook["namespaceSelector"] == {"matchLabels": {"txmesh-injection": "enabled"}}
    assert hook["admissionReviewVersions"] == ["v1"] and hook["sideEffects"] == "None"
    assert hook["rules"][0]["resources"] == ["pods"] and hook["rules"][0]["operations"] == ["CREATE"]
    # least privilege: no wildcards; read-only except tokenreviews/events, the trust-bundle ConfigMaps and the
    # webhook configuration, which only their own names may be read or updated (create cannot be named)
    (cluster_role,) = _by_kind("ClusterRole", "mesh-control")
    named = {"configmaps": "txmesh-ca-root-cert", "mutatingwebhookconfigurations": webhook["metadata"]["name"]}
    for rule in cluster_role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert not {"delete", "deletecollection", "patch"} & set(rule["verbs"]) or rule["resources"] == ["events"]
        writes = set(rule["verbs"]) - {"get", "list", "watch"}
        if rule["resources"] == ["configmaps"] and "resourceNames" not in rule:
            assert rule["verbs"] == ["create"], rule
        elif set(rule["resources"]) & set(named):
            (resource,) = rule["resources"]
            assert rule["resourceNames"] == [named[resource]] and writes == {"update"}, rule
        elif writes:
            assert rule["resources"] in (["tokenreviews"], ["subjectaccessreviews"], ["events"]), rule
        assert "secrets" not in rule["resources"] or (rule["resources"] == ["secrets"]
                                                      and rule["verbs"] == ["get", "list", "watch"]), rule
    crd_groups = {group for group, _ in crds()}
    granted = {g for rule in cluster_role["rules"] for g in rule["apiGroups"]}
    assert crd_groups <= granted
    assert not {"networking.istio.io", "security.istio.io"} & granted, "only --istio-crds needs Istio's groups"
    (role,) = _by_kind("Role", "mesh-control")
    assert role["metadata"]["namespace"] == "mesh-system"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["txmesh-ca"],
                              "verbs": ["get"]},
                             {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}]
    for binding in _by_kind("ClusterRoleBinding", "mesh-control") + _by_kind("RoleBinding", "mesh-control"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mesh-control",
                                        "namespace": "mesh-system"}]


def test_the_names_rbac_allows_are_the_ones_mesh_control_watches_and_writes():
    """list/watch restricted by resourceNames work only with a metadata.name field selector naming the object."""
    from kubernetes import client

    from mesh.control.kube.root_cert import NAME, RootCertPublisher
    from mesh.control.kube.webhook_ca import WebhookCABundle
    from mesh.control.tap import Options
    (deployment,) = _by_kind("Deployment", "mesh-control")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    options = Options()
    options.parseOptions(command[command.index("mesh-control") + 1:])
    (webhook,) = _by_kind("MutatingWebhookConfiguration")
    assert options["webhook-config-name"] == webhook["metadata"]["name"]
    (cluster_role,) = _by_kind("ClusterRole", "mesh-control")
    names = {rule["resources"][0]: rule["resourceNames"] for rule in cluster_role["rules"] if "resourceNames" in rule}
    assert names == {"configmaps": [NAME], "mutatingwebhookconfigurations": [options["webhook-config-name"]]}
    api_client = client.ApiClient()
    writers = [RootCertPublisher(None, api_client, bytes), WebhookCABundle(None, api_client, bytes,
                                                                         options["webhook-config-name"])]
    selectors = {reflector.kind: getattr(reflector.lister, "keywords", {}).get("field_selector")
                 for writer in writers for reflector in writer.reflectors}
    assert selectors == {"namespaces": None, "configmaps": f"metadata.name={NAME}",
                         "mutatingwebhookconfigurations": f"metadata.name={webhook['metadata']['name']}"}
    granted = {(resource, verb) for rule in cluster_role["rules"] for resource in rule["resources"]
               for verb in rule["verbs"]}
    assert {("namespaces", "list"), ("namespaces", "watch"), ("configmaps", "create")} <= granted
    # the Gateways' credentialName: every Secret is listed and watched, unfiltered, so read access to all
    from mesh.control.kube.secretaccess import SecretAccess
    from mesh.control.kube.secrets import GatewaySecrets
    (reflector,) = GatewaySecrets(None, api_client, dict).reflectors
    assert reflector.kind == "secrets" and not getattr(reflector.lister, "keywords", {}).get("field_selector")
    assert {("secrets", "list"), ("secrets", "watch")} <= granted
    # a gateway gets them only once a SubjectAccessReview allows its service account
    review = inspect.getsource(SecretAccess._review)
    assert "AuthorizationV1Api" in review and "create_subject_access_review" in review
    assert {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
            "verbs": ["create"]} in cluster_role["rules"]


def test_mesh_control_serves_the_webhook_the_configuration_calls():
    """One container: mesh-control serves the webhook itself, with a certificate for the Service's name."""
    from mesh.control.injector import default_dns_names
    from mesh.control.tap import Options
    (deployment,) = _by_kind("Deployment", "mesh-control")
    (hook,) = _by_kind("MutatingWebhookConfiguration")[0]["webhooks"]
    pod = deployment["spec"]["template"]["spec"]
    (control,) = pod["containers"]
    command = control["command"]
    options = Options()
    options.parseOptions(command[command.index("mesh-control") + 1:])
    service = hook["clientConfig"]["service"]
    assert options["webhook-port"] == service["port"] == 15017
    names = options["webhook-dns-names"] or default_dns_names(options["namespace"])
    assert names[0] == f"{service['name']}.{service['namespace']}.svc", "the name the API server verifies"
    assert options["proxy-image"] == control["image"]
    for probe in ("readinessProbe", "livenessProbe"):  # ready = serving webhook calls
        assert control[probe]["httpGet"] == {"path": "/healthz", "port": 15017, "scheme": "HTTPS"}, probe
    assert options["admin-address"] == "0.0.0.0", "the Service's monitoring port reaches /metrics"
    assert not any("secret" in volume and volume["secret"]["secretName"] == "mesh-webhook-tls"
                   for volume in pod["volumes"]), "no hand-made webhook certificate"


def test_every_python_module_a_manifest_runs_exists():
    import importlib.util
    for path, doc in all_documents():
        template = pod_template_of(doc)
        spec = (template or {}).get("spec") or {}
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            probes = [container.get(p, {}).get("exec", {}).get("command", []) for p in
                      ("readinessProbe", "livenessProbe", "startupProbe")]
            for argv in [container.get("command", []), *probes]:
                if "-m" in argv:
                    module = argv[argv.index("-m") + 1]
                    assert importlib.util.find_spec(module), f"{path.name}: {container['name']} runs {module}"


def test_the_control_plane_command_parses():
    from mesh.control.tap import Options
    (deployment,) = _by_kind("Deployment", "mesh-control")
    control = deployment["spec"]["template"]["spec"]["containers"][0]
    command = control["command"]
    options = Options()
    options.parseOptions(command[command.index("mesh-control") + 1:])
    assert options["port"] == 15012 and options["namespace"] == "mesh-system"
    # config from the CRs and the registry from the API: no config directory to mount
    assert options["kubernetes"] and options["config-dir"] is None and not options["istio-crds"]
    # the CA and token key come from the Secret the Role may get (and create), kept in a memory-backed state dir
    (role,) = _by_kind("Role", "mesh-control")
    assert options["ca-secret"] == role["rules"][0]["resourceNames"][0] == "txmesh-ca"
    assert options["ca-cert"] is None and options["ca-key"] is None
    pod = deployment["spec"]["template"]["spec"]
    (state,) = [m for m in control["volumeMounts"] if m["mountPath"] == options["state-dir"]]
    assert {v["name"]: v for v in pod["volumes"]}[state["name"]]["emptyDir"]["medium"] == "Memory"
    assert all(volume.get("secret", {}).get("secretName") != "txmesh-ca" for volume in pod["volumes"]), \
        "the CA Secret is read through the API, not mounted"


def test_the_seed_sample_injects_cleanly_and_its_crs_pass_txmesh_validation():
    sample = DEPLOY / "samples" / "seed"
    workloads = [d for d in documents(sample / "workloads.yaml") if d["kind"] == "Deployment"]
    assert sorted(d["metadata"]["name"] for d in workloads) == ["frontend", "payment-service", "user-service-v1",
                                                                 "user-service-v2"]
    for deployment in workloads:
        injected = inject_object(deployment)
        assert check_model(injected)[1] == []
        for container in pod_template_of(injected)["spec"]["containers"]:
            assert container["securityContext"]["runAsUser"] != PROXY_UID, "the app's traffic would not be captured"
    namespaces = {d["metadata"]["name"]: d for d in documents(sample / "namespaces.yaml")}
    assert all(ns["metadata"]["labels"]["txmesh-injection"] == "enabled" for ns in namespaces.values())
    # the CRs are txmesh config: the same loader and validation as the config dir (mesh-control --kubernetes)
    crs = list(documents(sample / "mesh-config.yaml"))
    assert {d["apiVersion"] for d in crs} == {"networking.txmesh.io/v1", "security.txmesh.io/v1"}
    loaded = load_documents(crs, "deploy/samples/seed/mesh-config.yaml")
    assert loaded.errors == []
    objects, errors = validate(loaded.resources)
    assert errors == [] and len(objects) == len(crs)


def test_dockerfile_user_matches_the_injected_proxy_uid():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert f"ARG TXMESH_UID={PROXY_UID}" in text and f"USER {PROXY_UID}:{PROXY_UID}" in text
    assert "iptables" in text, "the init container runs meshctl iptables from this image"
    for path in ("setup.cfg", "pyproject.toml", "README.md", "mesh", "twisted"):
        assert (DEPLOY.parent / path).exists(), f"the Dockerfile copies {path}"


#: The oldest kustomize (built into kubectl) that builds these kustomizations: directories as resources and
#: inline target patches.  kubectl 1.21 has v4.0.5; Debian 12's kubernetes-client (kubectl 1.20) has v2.0.3.
MIN_KUSTOMIZE = (4, 0)


def kubectl_with_kustomize() -> str:
    """kubectl's path, if its built-in kustomize can build deploy/.  Otherwise the test fails under CI
    (CI=true: a missing tool must not pass as a skip) and is skipped, saying why, elsewhere."""
    import os
    import shutil
    kubectl = shutil.which("kubectl")
    problem = None
    if kubectl is None:
        problem = "kubectl is not installed"
    else:
        result = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True,
                                timeout=60)
        version = re.match(r"v(\d+)\.(\d+)", (json.loads(result.stdout or "{}").get("kustomizeVersion") or ""))
        if version is None:
            problem = f"{kubectl} reports no kustomize version (kubectl 1.20 or older)"
        elif tuple(map(int, version.groups())) < MIN_KUSTOMIZE:
            problem = f"{kubectl} has kustomize {version[0]}, older than v{MIN_KUSTOMIZE[0]}"
    if problem is None:
        return kubectl
    message = (f"{problem}: these tests need kubectl 1.21 or newer (https://kubernetes.io/docs/tasks/tools/; "
               "Debian 12's kubernetes-client is 1.20, too old)")
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.mark.parametrize("overlay", ["base", "samples/seed"])
def test_kubectl_kustomize_builds(overlay):
    """With kubectl on PATH (its built-in kustomize), each kustomization builds and its output loads."""
    kubectl = kubectl_with_kustomize()
    result = subprocess.run([kubectl, "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(built) == sum(len(documents(p)) for p in manifest_files()
                             if (DEPLOY / overlay) in p.parents)
    for doc in built:
        if model_name(doc):
            assert check_model(doc)[1] == [], doc["metadata"]["name"]


def test_istio_crds_overlay_adds_the_flag_and_read_access():
    """deploy/overlays/istio-crds: mesh-control gets --istio-crds and read access to exactly the kinds it watches."""
    from mesh.control.kube.crds import ISTIO_GROUPS, resources
    from mesh.control.tap import Options
    kubectl = kubectl_with_kustomize()
    result = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / "istio-crds")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    for doc in built:
        if model_name(doc):
            assert check_model(doc)[1] == [], doc["metadata"]["name"]
    (deployment,) = [d for d in built if d["kind"] == "Deployment" and d["metadata"]["name"] == "mesh-control"]
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    options = Options()
    options.parseOptions(command[command.index("mesh-control") + 1:])
    assert options["istio-crds"] and options["kubernetes"]
    (role,) = [d for d in built if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "mesh-control-istio-crds"]
    granted = {(group, plural) for rule in role["rules"] for group in rule["apiGroups"] for plural in rule["resources"]
               if rule["verbs"] == ["get", "list", "watch"]}
    istio_groups = {group for group, _ in ISTIO_GROUPS}
    assert granted == {(group, plural) for group, _, plural in resources(istio=True) if group in istio_groups}
    (binding,) = [d for d in built if d["kind"] == "ClusterRoleBinding"
                  and d["roleRef"]["name"] == "mesh-control-istio-crds"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mesh-control", "namespace": "mesh-system"}]
