"""The injection webhook inside a real ``twistd mesh-control --webhook-port`` over TLS: its certificate
chains to the mesh root (STATE/root-cert.pem) and carries the Service's DNS name; AdmissionReview v1 round
trips whose JSONPatch, applied to a real Deployment's pod, gives exactly what ``meshctl inject`` gives;
its limits; and the certificate's renewal at half life."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import socket
import ssl
import subprocess
import uuid

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.harness import venv_bin, wait_for
from tests.harness.net import free_port

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client (pip install txmesh[kubernetes])")
from mesh.control.inject.models import check_model  # noqa: E402
from tests.unit.test_inject import apply_patch  # noqa: E402 -- the independent RFC 6902 applier

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: user-service-v2
  namespace: demo
  labels: {app: user-service, version: v2}
spec:
  replicas: 2
  selector:
    matchLabels: {app: user-service, version: v2}
  template:
    metadata:
      labels: {app: user-service, version: v2}
      annotations:
        traffic.sidecar.istio.io/excludeOutboundPorts: "5432"
        traffic.sidecar.istio.io/excludeOutboundIPRanges: "169.254.169.254/32"
    spec:
      serviceAccountName: user-service
      containers:
      - name: user-service
        image: ghcr.io/example/user-service:2.0
        args: ["--listen", "0.0.0.0:8080"]
        ports:
        - {name: http, containerPort: 8080}
        readinessProbe:
          httpGet: {path: /healthz, port: http}
        resources:
          requests: {cpu: 50m, memory: 64Mi}
"""


DNS_NAME = "mesh-control.mesh-system.svc"  # the webhook Service, as the API server calls it


@pytest.fixture(scope="module")
def control(control_factory):
    """``twistd mesh-control --webhook-port P`` (namespace mesh-system: the default DNS name)."""
    control = control_factory(extra_args=["--webhook-port", str(free_port()), "--proxy-image", "reg/txmesh:test"])
    control.webhook_port = int(control.argv[control.argv.index("--webhook-port") + 1])
    return control


def tls_context(control) -> ssl.SSLContext:
    """What the API server does with the webhook's caBundle: trust the mesh root (STATE/root-cert.pem)."""
    return ssl.create_default_context(cafile=str(control.root_cert))


class _ServiceConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1, with the Service's DNS name as SNI and as the name to verify."""

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def post(control, body, path="/inject", method="POST", context=None, hostname=DNS_NAME):
    connection = _ServiceConnection(hostname, control.webhook_port, timeout=10,
                                    context=context or tls_context(control))
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.getheader("content-type"), response.read()
    finally:
        connection.close()


def server_certificate(control, hostname=DNS_NAME) -> x509.Certificate:
    """The webhook's certificate, after python's ssl verified it against the root and ``hostname``."""
    with socket.create_connection(("127.0.0.1", control.webhook_port), timeout=10) as sock:
        with tls_context(control).wrap_socket(sock, server_hostname=hostname) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def admission_review(pod, operation="CREATE"):
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                        "namespace": "demo", "operation": operation,
                        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                        "object": pod, "oldObject": None, "dryRun": False,
                        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}}


def review(control, pod, **kwargs):
    sent = admission_review(pod)
    status, content_type, body = post(control, json.dumps(sent).encode(), **kwargs)
    assert status == 200, body
    assert content_type == "application/json"
    answer = json.loads(body)
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == sent["request"]["uid"]
    assert answer["response"]["allowed"] is True
    return answer["response"]


def patch_of(response):
    assert response["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(response["patch"], validate=True))


def meshctl_inject(control, text: str) -> list:
    """``meshctl inject`` as mesh-control's webhook is set up (its image, its CA/config port)."""
    result = subprocess.run([venv_bin("meshctl"), "inject", "-f", "-", "--image", "reg/txmesh:test",
                             "--control", f"{DNS_NAME}:{control.port}"],
                            input=text, capture_output=True, text=True, timeout=30, check=True)
    return list(yaml.safe_load_all(result.stdout))


def test_the_certificate_chains_to_the_mesh_root_and_names_the_service(control):
    cert = server_certificate(control)  # python's ssl verified the chain and the name
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [DNS_NAME]
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [], "no workload identity"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    root = x509.load_pem_x509_certificate(control.root_cert.read_bytes())
    assert cert.issuer == root.subject
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        server_certificate(control, hostname="mesh-control.default.svc")
    with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the mesh root
        post(control, b"{}", context=ssl.create_default_context())


def test_patch_of_the_deployments_pod_template_equals_meshctl_inject(control):
    deployment = yaml.safe_load(DEPLOYMENT)
    template = deployment["spec"]["template"]
    patched = apply_patch(template, patch_of(review(control, template)))
    (expected,) = meshctl_inject(control, DEPLOYMENT)
    assert patched == expected["spec"]["template"]
    _, problems = check_model({"apiVersion": "v1", "kind": "Pod", **patched})
    assert problems == []
    # what the pod now runs: iptables first, then the native sidecar, with the projected token
    init, sidecar = patched["spec"]["initContainers"]
    assert init["command"][:2] == ["meshctl", "iptables"] and init["image"] == "reg/txmesh:test"
    assert "--exclude-outbound-ports" in init["command"] and "5432" in init["command"]
    assert sidecar["name"] == "txmesh-proxy" and sidecar["restartPolicy"] == "Always"
    command = sidecar["command"]
    assert command[command.index("--control") + 1] == f"{DNS_NAME}:{control.port}"
    assert command[command.index("--health-port") + 1] == "15021"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["httpGet"] == {"path": "/healthz/ready", "port": 15021}, probe
    (token,) = [v for v in patched["spec"]["volumes"] if v["name"] == "txmesh-token"]
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "txmesh"
    # the app container: only its probe changes, to the sidecar's health port (named port resolved)
    (app,), (original,) = patched["spec"]["containers"], template["spec"]["containers"]
    assert app["readinessProbe"] == {"httpGet": {"path": "/app-health/user-service/readyz", "port": 15021,
                                                 "scheme": "HTTP"}}
    assert {**app, "readinessProbe": None} == {**original, "readinessProbe": None}
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert json.loads(env["TXMESH_APP_PROBERS"]) == {"/app-health/user-service/readyz": {
        "httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"}, "timeoutSeconds": 1}}


def test_patch_of_a_pod_as_the_replicaset_creates_it(control):
    """The pod the API server sees: generateName, pod-template-hash, ownerReferences, defaults filled in."""
    deployment = yaml.safe_load(DEPLOYMENT)
    pod = copy.deepcopy(deployment["spec"]["template"])
    pod["metadata"].update({
        "generateName": "user-service-v2-6d4cf56db6-", "namespace": "demo",
        "labels": {**pod["metadata"]["labels"], "pod-template-hash": "6d4cf56db6"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "user-service-v2-6d4cf56db6",
                             "uid": str(uuid.uuid4()), "controller": True, "blockOwnerDeletion": True}]})
    pod["spec"].update({"restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "terminationGracePeriodSeconds": 30,
                        "schedulerName": "default-scheduler", "securityContext": {}})
    pod["spec"]["containers"][0].update({"terminationMessagePath": "/dev/termination-log",
                                         "imagePullPolicy": "IfNotPresent"})
    patch = patch_of(review(control, pod))
    assert all(op["path"].startswith("/spec/containers/0/readinessProbe/") for op in patch
               if op["path"].startswith("/spec/containers")), "of the app container, only the probe changes"
    patched = apply_patch(pod, patch)
    (expected,) = meshctl_inject(control, DEPLOYMENT)
    template = expected["spec"]["template"]
    assert patched["spec"]["initContainers"] == template["spec"]["initContainers"]
    assert patched["spec"]["volumes"] == template["spec"]["volumes"]
    assert patched["metadata"]["annotations"] == template["metadata"]["annotations"]
    assert patched["metadata"]["labels"] == {**template["metadata"]["labels"], "pod-template-hash": "6d4cf56db6"}
    _, problems = check_model({"apiVersion": "v1", "kind": "Pod", **patched})
    assert problems == []
    # admitting the injected pod again (e.g. a re-invocation) adds nothing
    assert "patch" not in review(control, patched)


def test_opt_out_and_other_requests_get_no_patch(control):
    template = yaml.safe_load(DEPLOYMENT)["spec"]["template"]
    template["metadata"]["annotations"]["sidecar.istio.io/inject"] = "false"
    assert "patch" not in review(control, template)
    template["metadata"]["annotations"]["sidecar.istio.io/inject"] = "true"
    template["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] = "postgres"
    response = review(control, template)
    assert "patch" not in response and "'postgres' is not a port" in response["warnings"][0]


@pytest.mark.parametrize("body, words", [
    (b"{not json", b"not JSON"),
    (b"[]", b"JSON object"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                 "request": {"uid": "x"}}).encode(), b"admissionReviewVersions"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(), b"request.uid"),
])
def test_malformed_reviews_are_400_with_the_reason(control, body, words):
    status, content_type, answer = post(control, body)
    assert status == 400 and words in answer, answer
    assert json.loads(answer)["error"]


def test_methods_health_and_size_limit(control):
    assert post(control, None, method="GET")[0] == 405
    assert post(control, None, path="/healthz", method="GET")[:1] == (200,)
    huge = b'{"pad": "' + b"x" * (9 * 1024 * 1024) + b'"}'  # beyond the 8 MiB an AdmissionReview may have
    try:
        status, _, answer = post(control, huge)
    except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
        pytest.fail("the webhook cut the connection without answering 413")
    assert status == 413 and b"larger than" in answer, answer
    assert post(control, None, path="/healthz", method="GET")[0] == 200, "and it still serves"


def test_the_certificate_is_renewed_at_half_life(control_factory):
    names = "injector.mesh.example.svc,injector.mesh.example"
    control = control_factory(workload_cert_ttl="4s", extra_args=["--webhook-port", str(free_port()),
                                                                  "--webhook-dns-names", names])
    control.webhook_port = int(control.argv[control.argv.index("--webhook-port") + 1])
    first = server_certificate(control, "injector.mesh.example.svc")
    listed = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert listed.get_values_for_type(x509.DNSName) == names.split(",")
    assert (first.not_valid_after_utc - first.not_valid_before_utc).total_seconds() <= 4 + 5 * 60  # + clock skew
    renewed = wait_for(lambda: (cert := server_certificate(control, "injector.mesh.example"))
                       .serial_number != first.serial_number and cert, timeout=10,
                       what="a new webhook certificate (renewal at 2 s)")
    assert renewed.not_valid_after_utc > first.not_valid_after_utc
    assert "injection webhook certificate for injector.mesh.example.svc,injector.mesh.example" in \
        control.log_path.read_text()
