"""The injection webhook over real HTTP(S) on loopback: AdmissionReview v1 round trips whose JSONPatch,
applied to a real Deployment's pod, gives exactly what ``meshctl inject`` gives; and the sidecar's exec
probe (``python -m mesh.inject.probe``) against a real proxy's admin port."""

from __future__ import annotations

import base64
import copy
import datetime
import http.client
import json
import ssl
import subprocess
import uuid

import pytest
import yaml

from tests.harness import ManagedProcess, venv_bin
from tests.harness.net import free_port

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client (pip install txmesh[kubernetes])")
from mesh.inject.models import check_model  # noqa: E402
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


class Webhook(ManagedProcess):
    kind = "webhook"

    def __init__(self, log_dir, *extra):
        self.port_file = log_dir / f"webhook-{uuid.uuid4().hex[:8]}.port"
        super().__init__("webhook", [venv_bin("python"), "-m", "mesh.control.webhook", "--address", "127.0.0.1",
                                     "--port", "0", "--port-file", self.port_file, *extra],
                         log_dir / "webhook.log")

    def is_ready(self):
        return self.port_file.exists()

    @property
    def port(self) -> int:
        return int(self.port_file.read_text())


@pytest.fixture(scope="module")
def webhook(process_log_dir):
    with Webhook(process_log_dir, "--plaintext").start() as process:
        yield process


def post(port, body: bytes, path="/inject", method="POST", context=None, host="127.0.0.1"):
    if context is None:
        connection = http.client.HTTPConnection(host, port, timeout=10)
    else:
        connection = http.client.HTTPSConnection(host, port, timeout=10, context=context)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.getheader("content-type"), response.read()
    finally:
        connection.close()


def admission_review(pod, operation="CREATE"):
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"},
                        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                        "namespace": "demo", "operation": operation,
                        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                        "object": pod, "oldObject": None, "dryRun": False,
                        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}}


def review(port, pod, **kwargs):
    sent = admission_review(pod)
    status, content_type, body = post(port, json.dumps(sent).encode(), **kwargs)
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


def meshctl_inject(text: str, *args) -> list:
    result = subprocess.run([venv_bin("meshctl"), "inject", "-f", "-", *args], input=text, capture_output=True,
                            text=True, timeout=30, check=True)
    return list(yaml.safe_load_all(result.stdout))


def test_patch_of_the_deployments_pod_template_equals_meshctl_inject(webhook):
    deployment = yaml.safe_load(DEPLOYMENT)
    template = deployment["spec"]["template"]
    response = review(webhook.port, template)
    patched = apply_patch(template, patch_of(response))
    (expected,) = meshctl_inject(DEPLOYMENT)
    assert patched == expected["spec"]["template"]
    _, problems = check_model({"apiVersion": "v1", "kind": "Pod", **patched})
    assert problems == []


def test_patch_of_a_pod_as_the_replicaset_creates_it(webhook):
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
    patch = patch_of(review(webhook.port, pod))
    assert not any(op["path"].startswith("/spec/containers") for op in patch), "the app container is untouched"
    patched = apply_patch(pod, patch)
    (expected,) = meshctl_inject(DEPLOYMENT)
    template = expected["spec"]["template"]
    assert patched["spec"]["initContainers"] == template["spec"]["initContainers"]
    assert patched["spec"]["volumes"] == template["spec"]["volumes"]
    assert patched["metadata"]["annotations"] == template["metadata"]["annotations"]
    assert patched["metadata"]["labels"] == {**template["metadata"]["labels"], "pod-template-hash": "6d4cf56db6"}
    _, problems = check_model({"apiVersion": "v1", "kind": "Pod", **patched})
    assert problems == []
    # admitting the injected pod again (e.g. a re-invocation) adds nothing
    assert "patch" not in review(webhook.port, patched)


def test_opt_out_and_other_requests_get_no_patch(webhook):
    template = yaml.safe_load(DEPLOYMENT)["spec"]["template"]
    template["metadata"]["annotations"]["sidecar.istio.io/inject"] = "false"
    assert "patch" not in review(webhook.port, template)
    template["metadata"]["annotations"]["sidecar.istio.io/inject"] = "true"
    template["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] = "postgres"
    response = review(webhook.port, template)
    assert "patch" not in response and "'postgres' is not a port" in response["warnings"][0]


@pytest.mark.parametrize("body, words", [
    (b"{not json", b"not JSON"),
    (b"[]", b"JSON object"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                 "request": {"uid": "x"}}).encode(), b"admissionReviewVersions"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(), b"request.uid"),
])
def test_malformed_reviews_are_400_with_the_reason(webhook, body, words):
    status, content_type, answer = post(webhook.port, body)
    assert status == 400 and words in answer, answer
    assert json.loads(answer)["error"]


def test_methods_and_health(webhook):
    assert post(webhook.port, None, method="GET")[0] == 405
    assert post(webhook.port, None, path="/healthz", method="GET")[:1] == (200,)


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh-webhook.mesh-system.svc")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mesh-webhook.mesh-system.svc"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_as_the_api_server_calls_it(process_log_dir, tmp_path):
    cert, key = _self_signed(tmp_path)
    with Webhook(process_log_dir, "--tls-cert", str(cert), "--tls-key", str(key)).start() as tls_webhook:
        context = ssl.create_default_context(cafile=str(cert))  # the webhook's caBundle
        template = yaml.safe_load(DEPLOYMENT)["spec"]["template"]
        response = review(tls_webhook.port, template, context=context)
        (expected,) = meshctl_inject(DEPLOYMENT)
        assert apply_patch(template, patch_of(response)) == expected["spec"]["template"]
        with pytest.raises(ssl.SSLError):  # and it is really TLS: an unverified peer is refused by the client
            post(tls_webhook.port, b"{}", context=ssl.create_default_context())


def test_exec_probe_against_a_real_proxy(proxy_factory, tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    proxy = proxy_factory(config, "w")

    def probe(kind, port):
        return subprocess.run([venv_bin("python"), "-m", "mesh.inject.probe", "--port", str(port), kind],
                              capture_output=True, text=True, timeout=30)

    ready = probe("ready", proxy.admin_port)
    assert ready.returncode == 0 and '"ready": true' in ready.stdout, ready
    assert probe("live", proxy.admin_port).returncode == 0
    closed = free_port("127.0.0.1")
    down = probe("live", closed)
    assert down.returncode == 1 and "does not answer" in down.stderr
