"""Sidecar injection: a pod spec in, the same pod with the txmesh sidecar out.

Plain dicts in, plain dicts out (the shapes of the Kubernetes API), so that
``meshctl inject`` (files) and the admission webhook (AdmissionReview) share
one implementation.  Nothing here imports the ``kubernetes`` package.

What an injected pod gets (docs/kubernetes.md):

- ``initContainers[0]``: ``txmesh-init`` runs ``meshctl iptables`` as root
  with ``NET_ADMIN``/``NET_RAW`` (the traffic-capture rules of the pod's network
  namespace); Istio's ``traffic.sidecar.istio.io/exclude*`` annotations become
  its flags.
- ``initContainers[1]``: ``txmesh-proxy``, the sidecar as a *native sidecar*
  (``restartPolicy: Always``, Kubernetes >= 1.29): it starts before the app
  containers, which start only once its startup probe (``httpGet
  :15021/healthz/ready``, the proxy's health port) passes, and it does not
  keep a Job from completing.  It runs ``twistd -n mesh-proxy --control ...``
  as UID 1337 (the UID ``meshctl iptables --proxy-uid`` exempts from capture).
- the volumes: the projected service-account token (audience ``txmesh``,
  1 h), the mesh's root certificate (ConfigMap ``txmesh-ca-root-cert``) and an
  emptyDir for the last-known-good config.
- the app containers' ``httpGet`` and ``tcpSocket`` probes go to the sidecar's
  health port, which probes the app on localhost (``mesh.control.inject.probes``;
  Istio's ``sidecar.istio.io/rewriteAppHTTPProbers: "false"`` opts out).
- the label ``security.istio.io/tlsMode: istio`` and the annotation
  ``sidecar.istio.io/status``, which marks the pod as injected: injecting it
  again changes nothing.
- with ``InjectSettings.datadog`` (``meshctl inject --datadog``) or the pod's
  ``mesh.txmesh.io/datadog: "true"``: Datadog's Autodiscovery annotations
  (``mesh.control.inject.datadog``).

User init containers come after the two, so they run inside the mesh, as in
Istio with native sidecars.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from dataclasses import dataclass, field

from mesh import __version__
from mesh.control.inject import datadog
from mesh.control.inject.probes import REWRITE_ANNOTATION, ProbeError, rewrite_app_probes
from mesh.sidecar_contract import (
    ADMIN_PORT,
    APP_PROBERS_ENV,
    HEALTH_PORT,
    INBOUND_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
    TLS_MODE_LABEL,
    TOKEN_AUDIENCE,
    TOKEN_VOLUME,
)

SIDECAR_NAME = "txmesh-proxy"
INIT_NAME = "txmesh-init"
TOKEN_DIR = "/var/run/secrets/tokens"
TOKEN_FILE = f"{TOKEN_DIR}/txmesh-token"
TOKEN_TTL_SECONDS = 3600
CA_VOLUME = "txmesh-ca-root-cert"
CA_CONFIGMAP = "txmesh-ca-root-cert"
CA_DIR = "/var/run/secrets/txmesh"
STATE_VOLUME = "txmesh-state"
STATE_DIR = "/var/lib/txmesh"

#: The image of the sidecar and its init container (deploy/Dockerfile builds it).
DEFAULT_IMAGE = f"txmesh/txmesh:{__version__}"
#: The UID the proxy runs as; ``meshctl iptables --proxy-uid`` exempts its traffic (Istio's 1337).
PROXY_UID = 1337

INJECT_ANNOTATION = "sidecar.istio.io/inject"
STATUS_ANNOTATION = "sidecar.istio.io/status"
EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
EXCLUDE_OUTBOUND_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"

#: Labels that the controllers add to pods and that are no part of a workload's identity.
_CONTROLLER_LABELS = frozenset({"pod-template-hash", "controller-revision-hash",
                                "statefulset.kubernetes.io/pod-name", "apps.kubernetes.io/pod-index",
                                "batch.kubernetes.io/job-name", "job-name", "controller-uid",
                                "batch.kubernetes.io/controller-uid", "batch.kubernetes.io/job-completion-index"})

#: kind -> path from the object to its pod template (``None``: the object is a pod).
POD_TEMPLATE_PATHS = {
    "Pod": None,
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class InjectError(ValueError):
    """A workload that cannot be injected as asked (a bad annotation); the message says what to fix."""


@dataclass(frozen=True)
class InjectSettings:
    """What the injector writes into pods; the defaults match deploy/base."""

    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    control: str = "mesh-control.mesh-system.svc:15012"
    trust_domain: str = "cluster.local"
    proxy_uid: int = PROXY_UID
    proxy_requests: dict = field(default_factory=lambda: {"cpu": "100m", "memory": "128Mi"})
    init_requests: dict = field(default_factory=lambda: {"cpu": "10m", "memory": "32Mi"})
    datadog: bool = False  # Datadog's Autodiscovery annotations on every pod (a pod's annotation decides first)


def pod_template_of(obj: dict):
    """The pod (or pod template) dict inside a workload object, or None for other kinds."""
    if not isinstance(obj, dict) or obj.get("kind") not in POD_TEMPLATE_PATHS:
        return None
    path = POD_TEMPLATE_PATHS[obj["kind"]]
    node = obj
    for key in path or ():
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def is_injected(pod: dict) -> bool:
    spec = pod.get("spec") or {}
    names = {c.get("name") for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])}
    return STATUS_ANNOTATION in ((pod.get("metadata") or {}).get("annotations") or {}) or SIDECAR_NAME in names


def skip_reason(pod: dict) -> str | None:
    """Why this pod must not get a sidecar, or None if it should."""
    metadata = pod.get("metadata") or {}
    for where in ("annotations", "labels"):
        value = (metadata.get(where) or {}).get(INJECT_ANNOTATION)
        if _is_false(value):
            return f"{INJECT_ANNOTATION}: {value!r} ({where[:-1]})"
    if (pod.get("spec") or {}).get("hostNetwork"):
        return "hostNetwork: true (the pod shares the node's network namespace)"
    if is_injected(pod):
        return "already injected"
    return None


def _is_false(value) -> bool:
    """An annotation or label that says no (``"false"``, ``"no"``, ``"0"``, ``"off"``, ...)."""
    return value is not None and str(value).strip().lower() in ("false", "no", "n", "0", "off")


def _port_list(annotations: dict, key: str) -> list[str]:
    raw = str(annotations.get(key, "") or "")
    ports = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise InjectError(f"annotation {key}: {item!r} is not a port (1-65535); write a comma-separated "
                              "list such as \"5432,6379\"")
        ports.append(str(int(item)))
    return ports


def _range_list(annotations: dict, key: str) -> list[str]:
    raw = str(annotations.get(key, "") or "")
    ranges = []
    for item in (r.strip() for r in raw.split(",")):
        if not item:
            continue
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            network = None
        if network is None or network.version != 4:
            raise InjectError(f"annotation {key}: {item!r} is not an IPv4 range (capture is IPv4 only); write "
                              "CIDRs such as \"10.0.0.0/8,169.254.169.254/32\"")
        ranges.append(str(network))
    return ranges


def _dedup(items):
    return list(dict.fromkeys(items))


def workload_name(pod: dict, fallback: str = None) -> str:
    """The mesh workload name: label ``app`` (Istio's convention), else the owner's or pod's name."""
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    name = labels.get("app") or labels.get("app.kubernetes.io/name") or fallback or metadata.get("name")
    if not name and metadata.get("generateName"):
        name = metadata["generateName"].rstrip("-")
    return str(name or "workload")


def app_port(spec: dict):
    """The first TCP containerPort of the first app container that declares one (the proxy's --app-port)."""
    for container in spec.get("containers") or []:
        for port in container.get("ports") or []:
            if str(port.get("protocol", "TCP")).upper() == "TCP" and port.get("containerPort"):
                return int(port["containerPort"])
    return None


def _probes() -> dict:
    """Startup (the app starts after it passes), readiness and liveness probes: Istio's httpGet :15021/healthz/ready.

    The liveness probe starts only once the startup probe has passed, so a
    proxy still waiting for its first certificate and config is not
    restarted; afterwards it fails only while draining (shorter than its 30 s
    of failures) or once the certificate has expired (a restart then asks
    for a new one).
    """
    def check():  # a fresh dict per probe: no shared objects (YAML anchors) in the output
        return {"httpGet": {"path": "/healthz/ready", "port": HEALTH_PORT}}

    return {
        "startupProbe": {**check(), "periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 600},
        "readinessProbe": {**check(), "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
        "livenessProbe": {**check(), "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3},
    }


def _init_container(annotations: dict, settings: InjectSettings) -> dict:
    command = ["meshctl", "iptables", "--proxy-uid", str(settings.proxy_uid),
               "--outbound-port", str(OUTBOUND_PORT), "--inbound-port", str(INBOUND_PORT)]
    # meshctl iptables never captures the proxy's own ports (15000-15090) inbound.
    inbound = _port_list(annotations, EXCLUDE_INBOUND_PORTS)
    if inbound:
        command += ["--exclude-inbound-ports", ",".join(_dedup(inbound))]
    outbound = _port_list(annotations, EXCLUDE_OUTBOUND_PORTS)
    if outbound:
        command += ["--exclude-outbound-ports", ",".join(_dedup(outbound))]
    ranges = _range_list(annotations, EXCLUDE_OUTBOUND_RANGES)
    if ranges:
        command += ["--exclude-outbound-ip-ranges", ",".join(_dedup(ranges))]
    return {
        "name": INIT_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "resources": {"requests": dict(settings.init_requests)},
        "securityContext": {
            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "privileged": False,
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def _sidecar(pod: dict, settings: InjectSettings, fallback_name: str = None, app_probers: dict = None) -> dict:
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    command = ["twistd", "-n", "--pidfile=", "mesh-proxy",
               "--control", settings.control,
               "--ca-bundle", f"{CA_DIR}/root-cert.pem",
               "--token-file", TOKEN_FILE,
               "--trust-domain", settings.trust_domain,
               "--workload", workload_name(pod, fallback_name),
               "--namespace", "$(POD_NAMESPACE)",
               "--service-account", "$(SERVICE_ACCOUNT)",
               "--state-dir", STATE_DIR,
               "--outbound-port", str(OUTBOUND_PORT),
               "--inbound-port", str(INBOUND_PORT),
               "--admin-port", str(ADMIN_PORT),
               "--health-port", str(HEALTH_PORT)]  # metrics: mesh-proxy's default port, 15090
    port = app_port(spec)
    if port:
        command += ["--app-port", str(port)]
    labels = metadata.get("labels") or {}
    for key in sorted(labels):
        if key not in _CONTROLLER_LABELS and key != TLS_MODE_LABEL:
            command += ["--label", f"{key}={labels[key]}"]
    ports = [{"name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
             {"name": "http-health", "containerPort": HEALTH_PORT, "protocol": "TCP"}]
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
        {"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    if app_probers:  # what /app-health/... on the health port sends to the app (mesh.control.inject.probes)
        env.append({"name": APP_PROBERS_ENV, "value": json.dumps(app_probers, sort_keys=True, separators=(",", ":"))})
    return {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "restartPolicy": "Always",
        "command": command,
        "env": env,
        "ports": ports,
        **_probes(),
        "resources": {"requests": dict(settings.proxy_requests)},
        "securityContext": {
            "runAsUser": settings.proxy_uid, "runAsGroup": settings.proxy_uid, "runAsNonRoot": True,
            "privileged": False, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True},
            {"name": STATE_VOLUME, "mountPath": STATE_DIR},
        ],
    }


def _volumes() -> list[dict]:
    return [
        {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE, "expirationSeconds": TOKEN_TTL_SECONDS, "path": "txmesh-token"}}]}},
        {"name": CA_VOLUME, "configMap": {"name": CA_CONFIGMAP, "optional": False}},
        {"name": STATE_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]


def inject_pod(pod: dict, settings: InjectSettings = InjectSettings(), fallback_name: str = None) -> dict:
    """Return an injected deep copy of ``pod`` (a Pod or a pod template: ``{metadata, spec}``).

    Returns an unchanged copy when :func:`skip_reason` says so.  Raises
    :class:`InjectError` for a malformed ``traffic.sidecar.istio.io/*`` annotation
    or an app probe whose named port the container does not declare.
    ``fallback_name`` names the workload when the pod has no ``app`` label.
    """
    pod = copy.deepcopy(pod)
    if skip_reason(pod):
        return pod
    metadata = pod.setdefault("metadata", {})
    if metadata.get("annotations") is None:
        metadata["annotations"] = {}
    annotations = metadata["annotations"]
    spec = pod.setdefault("spec", {})
    init = _init_container(annotations, settings)
    probers = {}
    if not _is_false(annotations.get(REWRITE_ANNOTATION)):
        try:
            probers = rewrite_app_probes(spec, HEALTH_PORT)
        except ProbeError as error:
            raise InjectError(str(error)) from None
    sidecar = _sidecar(pod, settings, fallback_name, probers)
    spec["initContainers"] = [init, sidecar] + list(spec.get("initContainers") or [])
    volumes = _volumes()
    spec["volumes"] = list(spec.get("volumes") or []) + volumes
    if metadata.get("labels") is None:
        metadata["labels"] = {}
    metadata["labels"][TLS_MODE_LABEL] = "istio"
    annotations[STATUS_ANNOTATION] = json.dumps({
        "initContainers": [INIT_NAME, SIDECAR_NAME], "containers": [],
        "volumes": [v["name"] for v in volumes], "imagePullSecrets": None,
        "revision": f"txmesh-{__version__}"}, sort_keys=True, separators=(",", ":"))
    if datadog.wanted(annotations, settings.datadog):
        for key, value in datadog.autodiscovery_annotations(SIDECAR_NAME, METRICS_PORT,
                                                            workload_name(pod, fallback_name)).items():
            annotations.setdefault(key, value)
    return pod


def inject_object(obj, settings: InjectSettings = InjectSettings()):
    """Inject one Kubernetes object (or every item of a ``List``); other kinds come back unchanged."""
    if not isinstance(obj, dict):
        return obj
    if obj.get("kind") == "List" and isinstance(obj.get("items"), list):
        out = copy.deepcopy(obj)
        out["items"] = [inject_object(item, settings) for item in obj["items"]]
        return out
    template = pod_template_of(obj)
    if template is None:
        return copy.deepcopy(obj)
    name = (obj.get("metadata") or {}).get("name")
    try:
        injected = inject_pod(template, settings, fallback_name=name)
    except InjectError as error:
        raise InjectError(f"{obj.get('kind')}/{name}: {error}") from None
    out = copy.deepcopy(obj)
    path = POD_TEMPLATE_PATHS[obj["kind"]]
    if path is None:
        return injected
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = injected
    return out
