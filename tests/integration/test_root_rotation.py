"""Rotating the root CA under load, the documented way (docs/operations.md, "Rotating the root CA"):

1. trust the new root too: put it in ``STATE/extra-roots.pem`` and restart mesh-control (same CA); every
   snapshot carries the trust bundle, so both sidecars rebuild their TLS contexts (and their certificate
   agents verify the control plane) with [old, new];
2. sign with the new root: restart mesh-control with ``--ca-cert/--ca-key`` of the new root and the old
   root in ``extra-roots.pem`` (bundle [new, old]); the sidecars renew at half-life (8 s certificates here)
   and get certificates of the new root;
3. drop the old root: empty ``extra-roots.pem``, restart; bundle [new].

Real processes: mesh-control with ``--config-dir``, a server sidecar (user-service, a registry endpoint) and a
client sidecar (frontend), both ``--control`` only. h2load drives 4 connections x 25 requests/s through the
client sidecar for the whole rotation; a DestinationRule caps upstream connections at 10 requests, so new
mTLS handshakes between the sidecars happen all the time, across every step. Asserted: ZERO failed
requests; after step 2 both sidecars hold certificates issued by the new root; after step 3 their bundle
is the new root alone, a client certificate of the old root is refused by the server sidecar and one of
the new root is accepted.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness import wait_for
from tests.integration.test_distribution_support import ControlledProxy, proxies, selector_service
from tests.integration.test_identity_support import issue_cert, mesh_ca, parse_h2load, s_client, spiffe
from tests.integration.test_proxy_support import destination_rule, write_config

TTL = "8s"
LOAD_SECONDS = 40
NEW_ROOT_CN = "txmesh root CA cluster.local 2027"


def new_root(directory):
    """A second self-signed ECDSA P-256 root (as an operator would make it): ``(key, cert, cert_path, key_path)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local"),
                      x509.NameAttribute(NameOID.COMMON_NAME, NEW_ROOT_CN)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "new-root.pem", directory / "new-root-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return key, cert, cert_path, key_path


@pytest.fixture(scope="module")
def mesh(control_factory, backend_factory, process_log_dir, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("root-rotation-config"), selector_service("user-service"),
                          destination_rule("user-service", "user-service", traffic_policy={
                              "connectionPool": {"http": {"maxRequestsPerConnection": 10}}}))
    control = control_factory(workload_cert_ttl=TTL, extra_args=["--config-dir", str(config)])
    app = backend_factory("user-service")
    server = ControlledProxy(control, "user-service", app_port=app.port, labels={"app": "user-service"},
                             log_dir=process_log_dir).start()
    client = ControlledProxy(control, "frontend", log_dir=process_log_dir).start()
    yield {"control": control, "config": config, "app": app, "server": server, "client": client,
           "factory": control_factory}
    client.stop()
    server.stop()


#: what the report shows of each access-log entry that did not answer 2xx
FAILURE_FIELDS = ("start_time", "direction", "response_code", "response_flags", "response_code_details",
                  "upstream_transport_failure_reason", "upstream_host")


def failures_logged(*proxies) -> str:
    """The sidecars' access-log entries that did not answer 2xx, then their warnings and the refusals and
    failures they logged: what a failed run needs."""
    failed, warnings = [], []
    for proxy in proxies:
        for line in proxy.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if not 200 <= entry["response_code"] < 300:
                    fields = " ".join(str(entry[name]) for name in FAILURE_FIELDS)
                    failed.append(f"{proxy.workload}: {fields}")
            elif any(word in line for word in ("#warn]", "#error]", "#critical]", "refused", "failed")):
                warnings.append(f"{proxy.workload}: {line}")
    return "\n".join(failed[:40] + warnings[:30])


def certificate(proxy) -> dict:
    return proxy.admin("/config_dump")["certificate"]


def synced(control, workloads=("frontend", "user-service")) -> bool:
    try:
        rows = proxies(control)
    except Exception:  # restarting
        return False
    return all(workload in rows and rows[workload]["connected"] and not rows[workload]["stale"]
               for workload in workloads)


@pytest.mark.timeout(LOAD_SECONDS + 120)
def test_root_rotation_under_load_fails_no_request(mesh, tmp_path):
    control, server, client, factory = mesh["control"], mesh["server"], mesh["client"], mesh["factory"]
    state = control.state_dir
    old_key, old_root = mesh_ca(state)
    _, _, new_cert, new_key = new_root(tmp_path)
    old_root_pem = (state / "ca-cert.pem").read_bytes()
    assert client.curl("user-service", "/before").status == 200
    for proxy in (client, server):
        assert certificate(proxy)["trust_bundle_roots"] == 1

    def restart(*ca_args):
        nonlocal control
        control.stop()
        control = factory(state_dir=state, port=control.port, admin_port=control.admin_port, workload_cert_ttl=TTL,
                          extra_args=["--config-dir", str(mesh["config"]), *ca_args])
        return control

    timeline = []

    def mark(what):
        timeline.append(f"{time.monotonic() - started:6.1f}s {what}")

    load = subprocess.Popen(
        ["h2load", "--h1", "-c", "4", "--rps", "25", "-D", str(LOAD_SECONDS), "-H", ":authority: user-service",
         f"{client.outbound_url}/rotate"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    started = time.monotonic()
    try:
        time.sleep(3)
        # 1. add the new root to the trust bundle
        (state / "extra-roots.pem").write_bytes(new_cert.read_bytes())
        restart()
        mark("step 1: control plane restarted with extra-roots.pem = new root")
        wait_for(lambda: synced(control) and all(certificate(p)["trust_bundle_roots"] == 2 for p in (client, server)),
                 30, interval=0.2, what="both sidecars to apply the bundle [old, new]")
        mark("step 1: both sidecars trust [old, new] (config stream)")

        # 2. sign with the new root; the old one stays trusted
        (state / "extra-roots.pem").write_bytes(old_root_pem)
        restart("--ca-cert", str(new_cert), "--ca-key", str(new_key))
        mark("step 2: control plane restarted with --ca-cert new root, extra-roots.pem = old root")
        wait_for(lambda: synced(control) and all(NEW_ROOT_CN in certificate(p)["issuer"] for p in (client, server)),
                 30, interval=0.2, what="both sidecars to hold certificates issued by the new root")
        mark("step 2: both sidecars hold new-root certificates")
        time.sleep(3)  # handshakes of new-root certificates against [new, old] bundles, both ways

        # 3. remove the old root
        (state / "extra-roots.pem").unlink()
        restart("--ca-cert", str(new_cert), "--ca-key", str(new_key))
        mark("step 3: control plane restarted without extra-roots.pem")
        wait_for(lambda: synced(control) and all(certificate(p)["trust_bundle_roots"] == 1 for p in (client, server)),
                 30, interval=0.2, what="both sidecars to apply the bundle [new]")
        mark("step 3: both sidecars trust [new] only")
        assert load.poll() is None, "the load ended before the rotation did: raise LOAD_SECONDS"
        assert all(NEW_ROOT_CN in certificate(p)["issuer"] for p in (client, server))
        output = load.communicate(timeout=LOAD_SECONDS + 30)[0]
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    mark("load done")
    result = parse_h2load(output)
    report = (f"h2load: {result.done} done, {result.succeeded} succeeded, {result.failed} failed, "
              f"{result.errored} errored, {result.timeout} timeout, {result.status}\n" + "\n".join(timeline)
              + "\n" + output[-1200:] + "\n" + failures_logged(client, server))
    print(report)
    assert result.done >= 0.9 * 100 * LOAD_SECONDS, report
    assert (result.failed, result.errored, result.timeout) == (0, 0, 0), report
    assert result.succeeded == result.done == result.status["2xx"], report

    # the old root is really gone from the server sidecar's inbound trust; the new one works
    uri = spiffe("default", "probe")
    old_cert, old_cert_key = issue_cert(tmp_path, "old-probe", (old_key, old_root), uri)
    new_issuer = (serialization.load_pem_private_key(new_key.read_bytes(), password=None),
                  x509.load_pem_x509_certificate(new_cert.read_bytes()))
    new_probe, new_probe_key = issue_cert(tmp_path, "new-probe", new_issuer, uri)
    refused = s_client(server.inbound_port, cafile=new_cert, cert=old_cert, key=old_cert_key)
    accepted = s_client(server.inbound_port, cafile=new_cert, cert=new_probe, key=new_probe_key)
    assert not refused.http_response, refused
    assert accepted.http_response, accepted
    assert client.curl("user-service", "/after").status == 200
