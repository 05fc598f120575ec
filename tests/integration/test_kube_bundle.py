"""mesh-control --kubernetes publishes the trust bundle and keeps the webhook's caBundle (real processes).

Two replicas ``twistd mesh-control --kubernetes --ca-secret txmesh-ca --webhook-port P`` started at once
against the test API server (the real ``kubernetes`` client on both sides):

- ConfigMap ``txmesh-ca-root-cert`` (``root-cert.pem``: the replicas' bundle, labelled as managed by
  mesh-control) appears in every namespace, new ones too, never in kube-system, kube-public,
  kube-node-lease; one deleted, edited or stripped of its label is written back (keys someone added stay)
- the two replicas never fight: every ConfigMap is created by exactly one of them (the other's create
  gets 409 and reads it), neither ever replaces one whose content was right, and no write failure is logged
- the MutatingWebhookConfiguration's caBundle is set at start, written back after an edit, and python's
  ``ssl`` with the decoded caBundle as its only CA verifies the real webhook port's certificate for
  ``mesh-control.mesh-system.svc``
- a missing webhook configuration is logged with what to apply, and its caBundle is set once it appears
  (a third replica, for another configuration, with the ConfigMap publisher disabled by --disable-plugin)
- ``mesh_control_kube_writes_total`` counts the writes
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
from pathlib import Path

import pytest
import yaml

from tests.harness import Control, KubeAPI, free_port, wait_for
from tests.harness.processes import REPO_ROOT

CONTROL_NS = "mesh-system"
NAME = "txmesh-ca-root-cert"
KEY = "root-cert.pem"
MANAGED = {"app.kubernetes.io/managed-by": "mesh-control"}
SKIPPED = {"kube-system", "kube-public", "kube-node-lease"}
WEBHOOK_CONFIG = "txmesh-sidecar-injector"
DNS_NAME = "mesh-control.mesh-system.svc"
MANIFEST = Path(REPO_ROOT) / "deploy/base/webhook/mutatingwebhookconfiguration.yaml"


@pytest.fixture(scope="module")
def kube(process_log_dir):
    from kubernetes import client

    with KubeAPI(log_dir=process_log_dir) as kube:
        core = client.CoreV1Api(kube.api_client())
        for namespace in (CONTROL_NS, "shop", "bank"):
            core.create_namespace({"metadata": {"name": namespace}})
        client.AdmissionregistrationV1Api(kube.api_client()).create_mutating_webhook_configuration(
            yaml.safe_load(MANIFEST.read_text()))
        yield kube


@pytest.fixture(scope="module")
def api(kube):
    from kubernetes import client

    api_client = kube.api_client()
    return {"core": client.CoreV1Api(api_client), "admission": client.AdmissionregistrationV1Api(api_client)}


def control_args(kube, directory: Path, webhook_port: int, *extra) -> list[str]:
    kubeconfig = kube.write_kubeconfig(directory / f"kubeconfig-{webhook_port}")
    return ["--kubernetes", "--kubeconfig", str(kubeconfig), "--ca-secret", "txmesh-ca",
            "--webhook-port", str(webhook_port), *extra]


@pytest.fixture(scope="module")
def replicas(kube, process_log_dir):
    """Two replicas sharing the CA Secret, started at the same time."""
    pair = []
    for _ in range(2):
        port = free_port()
        replica = Control(extra_args=control_args(kube, process_log_dir, port), log_dir=process_log_dir)
        replica.webhook_port = port
        pair.append(replica)
    try:
        for replica in pair:
            replica.spawn()
        for replica in pair:
            replica.wait_ready(replica.ready_timeout)
        assert pair[0].root_cert.read_bytes() == pair[1].root_cert.read_bytes(), "one CA (the Secret)"
        yield pair
    finally:
        for replica in pair:
            replica.stop()


def config_maps(api) -> dict:
    """namespace -> the ConfigMap txmesh-ca-root-cert there (as a dict)."""
    items = api["core"].list_config_map_for_all_namespaces(field_selector=f"metadata.name={NAME}").items
    return {item.metadata.namespace: api["core"].api_client.sanitize_for_serialization(item) for item in items}


def published(config_map, bundle: str) -> bool:
    return (config_map is not None and (config_map.get("data") or {}).get(KEY) == bundle
            and MANAGED.items() <= (config_map["metadata"].get("labels") or {}).items())


def wait_published(api, namespaces, bundle: str, what: str) -> dict:
    """Wait until every namespace in ``namespaces`` has the ConfigMap with ``bundle``; return them all."""
    return wait_for(lambda: (lambda found: all(published(found.get(ns), bundle) for ns in namespaces) and found)(
        config_maps(api)), 10, what=what)


def writes(kube, verb: str, namespace: str = "[^/]+") -> int:
    """Requests of ``verb`` (POST: create, PUT: replace) to ConfigMaps txmesh-ca-root-cert (in ``namespace``)."""
    path = re.compile(rf"/api/v1/namespaces/{namespace}/configmaps" + ("" if verb == "POST" else f"/{NAME}"))
    return sum(1 for request in kube.requests() if request["method"] == verb and path.fullmatch(request["path"]))


def objects_seen(replica, kind: str) -> int:
    """``mesh_control_kube_objects{kind}`` of a replica: what its watch of ``kind`` holds now."""
    text = replica.admin_request("/metrics")[1].decode()
    match = re.search(rf'^mesh_control_kube_objects{{kind="{kind}"}} (\S+)$', text, re.M)
    return int(float(match[1])) if match else -1


def assert_no_write_failures(*controls) -> None:
    for control in controls:
        text = control.log_path.read_text()
        assert "cannot write" not in text and "Traceback" not in text, control.describe("a write failed")


# -- the trust bundle in every namespace ------------------------------------------------------------------

def test_every_namespace_but_the_system_ones_gets_the_bundle_from_exactly_one_replica(replicas, kube, api):
    bundle = replicas[0].root_cert.read_text()
    found = wait_published(api, {"default", CONTROL_NS, "shop", "bank"}, bundle, "the ConfigMaps")
    assert not SKIPPED & set(found), "kube-system, kube-public and kube-node-lease get none"
    assert found["shop"]["metadata"]["labels"] == {"app.kubernetes.io/part-of": "txmesh", **MANAGED}
    assert found["shop"]["data"] == {KEY: bundle}
    # the API server has the object before the replica that wrote it has its answer (and logs it)
    created = wait_for(lambda: [line for replica in replicas for line in replica.log_path.read_text().splitlines()
                                if f"created ConfigMap shop/{NAME}" in line], 10, what="the creator's log line")
    assert len(created) == 1, "one replica creates it; the other's create gets 409 and reads it"
    assert writes(kube, "POST", "shop") <= 2 and writes(kube, "PUT") == 0, "no replace of a right ConfigMap"
    assert_no_write_failures(*replicas)


def test_a_new_namespace_gets_the_bundle(replicas, api):
    api["core"].create_namespace({"metadata": {"name": "fresh"}})
    wait_published(api, {"fresh"}, replicas[0].root_cert.read_text(), "the ConfigMap in the new namespace")


@pytest.mark.parametrize("change", ["delete", "edit", "unlabel"])
def test_a_deleted_or_changed_config_map_is_written_back(replicas, kube, api, change):
    bundle = replicas[0].root_cert.read_text()
    wait_published(api, {"bank"}, bundle, "the ConfigMap before the change")
    core = api["core"]
    if change == "delete":
        core.delete_namespaced_config_map(NAME, "bank")
    elif change == "edit":  # another bundle, and a key of someone else's that must stay
        core.patch_namespaced_config_map(NAME, "bank", {"data": {KEY: "not a bundle\n", "extra": "kept"}})
    else:
        core.patch_namespaced_config_map(NAME, "bank", {"metadata": {"labels": {
            "app.kubernetes.io/managed-by": None}}})
    found = wait_published(api, {"bank"}, bundle, f"the ConfigMap written back after the {change}")
    if change == "edit":
        assert found["bank"]["data"] == {KEY: bundle, "extra": "kept"}
    assert_no_write_failures(*replicas)


def test_two_replicas_do_not_fight(replicas, kube, api):
    bundle = replicas[0].root_cert.read_text()
    wait_published(api, {"shop", "bank"}, bundle, "the ConfigMaps")
    puts, posts = writes(kube, "PUT"), writes(kube, "POST")
    api["core"].delete_namespaced_config_map(NAME, "shop")
    api["core"].create_namespace({"metadata": {"name": "later"}})
    found = wait_published(api, {"shop", "later"}, bundle, "the deleted and the new ConfigMap")
    # both replicas' watches have seen every ConfigMap: a fight would have begun by now
    wait_for(lambda: all(objects_seen(replica, "configmaps") == len(found) for replica in replicas), 10,
             what="both replicas to see every ConfigMap")
    assert writes(kube, "PUT") == puts, "a replica replaced a ConfigMap that was right"
    assert writes(kube, "POST") - posts <= 4, "at most one create per replica and ConfigMap"
    assert_no_write_failures(*replicas)


# -- the webhook's caBundle ---------------------------------------------------------------------------------

def ca_bundles(api, name: str = WEBHOOK_CONFIG) -> list:
    configuration = api["admission"].read_mutating_webhook_configuration(name)
    return [webhook.client_config.ca_bundle for webhook in configuration.webhooks]


def expected_ca_bundle(control) -> str:
    return base64.b64encode(control.root_cert.read_bytes()).decode()


def verified_certificate(ca_bundle: str, port: int, hostname: str = DNS_NAME) -> dict:
    """The webhook port's certificate as python's ssl verified it with the decoded caBundle as the only CA."""
    context = ssl.create_default_context(cadata=base64.b64decode(ca_bundle).decode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=hostname) as tls:
            return tls.getpeercert()


def test_the_webhook_ca_bundle_is_set_at_start_and_verifies_the_webhook(replicas, api):
    expected = expected_ca_bundle(replicas[0])
    (ca_bundle,) = wait_for(lambda: (lambda found: found == [expected] and found)(ca_bundles(api)), 10,
                            what="the caBundle of the webhook configuration")
    for replica in replicas:  # each replica's own serving certificate, from the shared CA
        cert = verified_certificate(ca_bundle, replica.webhook_port)
        assert ("DNS", DNS_NAME) in cert["subjectAltName"]
    with pytest.raises(ssl.SSLCertVerificationError):
        verified_certificate(ca_bundle, replicas[0].webhook_port, hostname="mesh-control.default.svc")


def test_an_edited_ca_bundle_is_written_back(replicas, api):
    expected = expected_ca_bundle(replicas[0])
    wait_for(lambda: ca_bundles(api) == [expected], 10, what="the caBundle before the edit")
    configuration = api["admission"].read_mutating_webhook_configuration(WEBHOOK_CONFIG)
    generation = configuration.metadata.generation
    configuration.webhooks[0].client_config.ca_bundle = base64.b64encode(b"someone else's CA").decode()
    configuration.webhooks[0].timeout_seconds = 7  # a concurrent edit of another field must survive
    api["admission"].replace_mutating_webhook_configuration(WEBHOOK_CONFIG, configuration)
    wait_for(lambda: ca_bundles(api) == [expected], 10, what="the caBundle written back")
    restored = api["admission"].read_mutating_webhook_configuration(WEBHOOK_CONFIG)
    assert restored.webhooks[0].timeout_seconds == 7
    assert restored.metadata.generation == generation + 2, "the edit and one write back, not a fight"
    assert_no_write_failures(*replicas)


def test_a_missing_webhook_configuration_is_logged_and_set_once_it_appears(replicas, kube, api, process_log_dir):
    name = "txmesh-injector-elsewhere"
    port = free_port()
    control = Control(extra_args=control_args(kube, process_log_dir, port, "--webhook-config-name", name,
                                              "--disable-plugin", "builtin.kubernetes_root_cert"),
                      log_dir=process_log_dir).start()
    try:
        wait_for(lambda: f"MutatingWebhookConfiguration {name} does not exist" in control.log_path.read_text(),
                 10, what="the log line about the missing configuration")
        assert "deploy/base/webhook/mutatingwebhookconfiguration.yaml" in control.log_path.read_text()
        assert control.running, "a missing configuration is not fatal"
        manifest = yaml.safe_load(MANIFEST.read_text())
        manifest["metadata"]["name"] = name
        api["admission"].create_mutating_webhook_configuration(manifest)
        (ca_bundle,) = wait_for(lambda: (lambda found: found == [expected_ca_bundle(control)] and found)(
            ca_bundles(api, name)), 10, what="the caBundle of the configuration that appeared")
        verified_certificate(ca_bundle, port)
        counted = re.compile(r'^mesh_control_kube_writes_total{result="updated",writer="kubernetes:webhook-ca"} 1\.0$',
                             re.M)
        wait_for(lambda: counted.search(control.admin_request("/metrics")[1].decode()), 10,
                 what="the write in mesh_control_kube_writes_total")
        assert_no_write_failures(control)
        assert "kubernetes:root-cert" not in control.log_path.read_text(), "disabled: no ConfigMaps from this one"
        assert objects_seen(control, "configmaps") == -1
    finally:
        control.stop()


def failed_writes(replica) -> int:
    text = replica.admin_request("/metrics")[1].decode()
    match = re.search(r'^mesh_control_kube_writes_total{result="failed",writer="kubernetes:root-cert"} (\S+)$', text,
                      re.M)
    return int(float(match[1])) if match else 0


def test_a_write_mesh_control_may_not_make_is_logged_once_retried_and_done_once_allowed(replicas, kube, api):
    """Runs last: it leaves 'cannot write' lines in the replicas' logs (RBAC without update on configmaps)."""
    bundle = replicas[0].root_cert.read_text()
    api["core"].create_namespace({"metadata": {"name": "vault"}})  # its backoff starts small (bank's grew)
    wait_published(api, {"vault"}, bundle, "the ConfigMap before the change")
    kube.forbid("configmaps", ["update"])
    try:
        api["core"].patch_namespaced_config_map(NAME, "vault", {"data": {KEY: "stale\n"}})
        wait_for(lambda: all(failed_writes(replica) >= 2 for replica in replicas), 10,
                 what="each replica to try the write twice")
        assert not published(config_maps(api)["vault"], bundle)
        for replica in replicas:
            lines = [line for line in replica.log_path.read_text().splitlines() if "cannot write" in line]
            assert len(lines) == 1, replica.describe("logged once, however often it is retried")
            assert (f"cannot write ConfigMap vault/{NAME}: 403 Forbidden: mesh-control's service account may not "
                    "write it; apply deploy/base/control-plane/rbac.yaml; retrying with backoff") in lines[0]
            assert replica.running
    finally:
        kube.forbid("configmaps", ["update"], forbidden=False)
    wait_published(api, {"vault"}, bundle, "the ConfigMap written once allowed")
    wait_for(lambda: all(f"ConfigMap vault/{NAME} is in sync again" in replica.log_path.read_text()
                         for replica in replicas), 10, what="each replica to log the recovery")
