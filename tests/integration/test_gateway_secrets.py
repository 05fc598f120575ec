"""``credentialName`` from a Kubernetes Secret: mesh-control --kubernetes sends it to the gateway, as istiod by SDS.

The test API server holds a ``kubernetes.io/tls`` Secret ``bookinfo-tls`` in namespace ``shop`` and a
Gateway CR (Istio's group) whose HTTPS server names it, selecting ``istio=ingressgateway``, and a Role
allowing ``get`` on Secrets there, bound (RoleBinding) to the service account ``ingressgateway``.  Four
proxies are fed by the control plane, none with ``--gateway-credentials-dir``:

- the gateway of ``shop`` serves HTTPS with the Secret's certificate (curl ``--cacert`` of the CA that
  issued it), and, after the Secret is updated with a certificate of another CA, with the new one;
- a second gateway of ``shop``, of service account ``ingress-unbound`` that no RoleBinding names, gets
  no Secret (mesh-control's SubjectAccessReview says no) and NACKs naming the permission to grant;
  once a RoleBinding grants it, it gets the Secret within the verdict cache's TTL (1 s here);
- a gateway of namespace ``other`` that the Gateway selects too never gets the Secret (Istio's rule: a
  gateway reads Secrets of its own namespace), so it refuses the config saying which Secret it lacks;
- a sidecar of ``shop`` with the gateway's labels never gets it either (only gateways do).
"""

from __future__ import annotations

import base64
import os
import stat

import pytest

from tests.harness import KubeAPI, curl, free_port, wait_for
from tests.harness.certs import ScratchCA
from tests.integration.test_distribution_support import ControlledProxy, proxies
from tests.integration.test_kube_support import install_crds

NS, OTHER = "shop", "other"
SECRET = "bookinfo-tls"
LABELS = {"istio": "ingressgateway"}
ISTIO = ("networking.istio.io", "v1")


def tls_secret(cert, key) -> dict:
    """The Secret ``bookinfo-tls`` (type kubernetes.io/tls) of ``cert`` and ``key`` (paths)."""
    encode = lambda path: base64.b64encode(path.read_bytes()).decode()  # noqa: E731
    return {"metadata": {"name": SECRET}, "type": "kubernetes.io/tls",
            "data": {"tls.crt": encode(cert), "tls.key": encode(key)}}


@pytest.fixture(scope="module")
def cluster(control_factory, process_log_dir, tmp_path_factory):
    from kubernetes import client

    pki = tmp_path_factory.mktemp("gateway-secret-pki")
    for name in ("first", "second"):
        (pki / name).mkdir()
    first, second = ScratchCA.create(pki / "first", "first-ca"), ScratchCA.create(pki / "second", "second-ca")
    kube = KubeAPI(log_dir=process_log_dir).start()
    api = kube.api_client()
    install_crds(api, istio=True)
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    for namespace in (NS, OTHER):
        core.create_namespace({"metadata": {"name": namespace}})
    core.create_namespaced_secret(NS, tls_secret(*first.issue(pki / "first", "bookinfo", ["bookinfo.com"])))
    core.create_namespaced_secret(NS, {"metadata": {"name": "unrelated"}, "type": "Opaque",
                                       "data": {"token": base64.b64encode(b"not for gateways").decode()}})
    custom.create_namespaced_custom_object(*ISTIO, NS, "gateways", {
        "apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "bookinfo-gateway"},
        "spec": {"selector": LABELS, "servers": [{
            "port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["bookinfo.com"],
            "tls": {"mode": "SIMPLE", "credentialName": SECRET}}]}})
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(NS, {"metadata": {"name": "secret-reader"}, "rules": [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}]})
    bind_secret_reader(rbac, "ingressgateway")
    custom.create_namespaced_custom_object(*ISTIO, NS, "virtualservices", {
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "bookinfo"},
        "spec": {"hosts": ["bookinfo.com"], "gateways": ["bookinfo-gateway"],
                 "http": [{"directResponse": {"status": 200, "body": {"string": "secure bookinfo"}}}]}})
    control = control_factory(extra_args=["--kubernetes", "--istio-crds", "--secret-review-ttl", "1s",
                                          "--kubeconfig", str(kube.write_kubeconfig(pki / "kubeconfig"))])
    port = free_port()
    gateway = ControlledProxy(control, "ingressgateway", namespace=NS, labels=LABELS, log_dir=process_log_dir,
                              extra_args=["--gateway", "--gateway-address", "127.0.0.1",
                                          "--gateway-port", f"443={port}"]).start()
    sidecar = ControlledProxy(control, "frontend", namespace=NS, labels=LABELS, log_dir=process_log_dir).start()
    other = ControlledProxy(control, "ingress-other", namespace=OTHER, labels=LABELS, log_dir=process_log_dir,
                            extra_args=["--gateway", "--gateway-address", "127.0.0.1",
                                        "--gateway-port", f"443={free_port()}"])
    other.spawn()
    unbound = ControlledProxy(control, "ingress-unbound", namespace=NS, labels=LABELS, log_dir=process_log_dir,
                              extra_args=["--gateway", "--gateway-address", "127.0.0.1",
                                          "--gateway-port", f"443={free_port()}"])
    unbound.spawn()
    yield {"core": core, "rbac": rbac, "control": control, "gateway": gateway, "sidecar": sidecar, "other": other,
           "unbound": unbound, "port": port, "first": first, "second": second, "pki": pki}
    for proxy in (unbound, other, sidecar, gateway):
        proxy.stop()
    kube.stop()


def bind_secret_reader(rbac, service_account: str) -> None:
    """A RoleBinding of the Role secret-reader (get Secrets in shop) to ``service_account`` of shop."""
    rbac.create_namespaced_role_binding(NS, {
        "metadata": {"name": f"{service_account}-secrets"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "secret-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": NS}]})


def https(cluster, ca):
    port = cluster["port"]
    return curl(f"https://bookinfo.com:{port}/", timeout=5,
                extra_args=["--resolve", f"bookinfo.com:{port}:127.0.0.1", "--cacert", str(ca.cert_path)])


def secret_files(proxy) -> list:
    """The files (relative paths) of ``proxy``'s private credentials directory; None if it has none."""
    root = proxy.state_dir / "gateway-credentials"
    if not root.exists():
        return None
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_no_other_namespace_and_no_sidecar_gets_the_secret(cluster):
    other, sidecar = cluster["other"], cluster["sidecar"]
    # the Gateway of shop selects the gateway of namespace other too, but a Secret of shop is not for it
    nack = wait_for(lambda: proxies(cluster["control"]).get("ingress-other", {}).get("last_nack"), 10,
                    what="the other namespace's gateway to refuse the config without the Secret")
    assert SECRET in nack
    assert secret_files(other) in (None, [])
    assert secret_files(sidecar) is None
    assert "BEGIN" not in str(sidecar.admin("/config_dump"))


def test_a_gateway_whose_service_account_may_not_read_secrets_gets_them_once_granted(cluster):
    unbound = cluster["unbound"]
    nack = wait_for(lambda: (lambda reason: reason if reason and "may not get Secrets" in reason else None)(
        proxies(cluster["control"]).get("ingress-unbound", {}).get("last_nack")), 10,
        what="the unbound gateway to refuse the config, saying which permission it lacks")
    assert SECRET in nack and f"service account {NS}/ingress-unbound" in nack and "RoleBinding" in nack
    assert secret_files(unbound) in (None, [])
    bind_secret_reader(cluster["rbac"], "ingress-unbound")
    wait_for(lambda: secret_files(unbound) == [SECRET, f"{SECRET}/tls.crt", f"{SECRET}/tls.key"], 10,
             what="the Secret once the RoleBinding grants it (the verdict cache's TTL is 1 s)")
    wait_for(lambda: not proxies(cluster["control"])["ingress-unbound"]["stale"], 10, what="its ACK")


def test_the_gateway_serves_the_secret_and_follows_its_rotation(cluster):
    gateway = cluster["gateway"]
    result = wait_for(lambda: (lambda r: r if r.status == 200 else None)(https(cluster, cluster["first"])), 10,
                      what="HTTPS with the Secret's certificate")
    assert result.body == b"secure bookinfo"
    root = gateway.state_dir / "gateway-credentials"
    assert secret_files(gateway) == [SECRET, f"{SECRET}/tls.crt", f"{SECRET}/tls.key"]  # not the Opaque one
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root / SECRET / "tls.key").st_mode) == 0o600
    # rotate: the Secret now holds a certificate of another CA
    pki = cluster["pki"]
    cluster["core"].replace_namespaced_secret(SECRET, NS, tls_secret(*cluster["second"].issue(
        pki / "second", "bookinfo", ["bookinfo.com"])))
    wait_for(lambda: https(cluster, cluster["second"]).status == 200, 10, what="HTTPS with the rotated certificate")
    assert https(cluster, cluster["first"]).exit_code == 60  # the old certificate is gone
    assert "BEGIN" not in gateway.log_path.read_text() and "BEGIN" not in cluster["control"].log_path.read_text()
    # the Secret deleted: its files are removed, and the gateway refuses the config that names it
    cluster["core"].delete_namespaced_secret(SECRET, NS)
    wait_for(lambda: secret_files(gateway) == [], 10, what="the deleted Secret's files to go")
    nack = wait_for(lambda: proxies(cluster["control"])["ingressgateway"]["last_nack"], 10, what="the NACK")
    assert SECRET in nack
