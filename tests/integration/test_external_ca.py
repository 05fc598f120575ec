"""``mesh-control --ca NAME``: a CA a plugin provides signs the workloads; its status drives /ready and metrics.

The CA is tests/plugins/txmesh_testca.py (``testca``), found through its ``mesh.plugins`` entry point
on mesh-control's ``PYTHONPATH`` only; the test switches it between ready, unavailable and broken by
rewriting its ``state.json``, which it re-reads on every call, and mesh-control asks for its status
every 200 ms (``--ca-status-interval``).  Two sidecars fed by the control plane (certificates and
config: frontend -> user-service over mTLS, new connections every 10 requests) get 10 s certificates
from it.

- a ``--ca`` that no plugin provides: mesh-control refuses to start, naming the CAs there are and
  what to install;
- the workloads' and the control plane's own certificates come from testca; ``meshctl proxy-config
  cert`` shows the CA;
- testca unavailable: ``/ready`` 503 with its reason, ``mesh_ca_ready`` 0, a CSR is answered 503 with
  the reason and ``Retry-After``; the sidecars' renewals fail, they keep serving on their
  certificates, traffic flows; testca back: they renew;
- testca's roots change (a rotation: old and new): the new bundle is pushed to the running sidecars;
- testca broken: a CSR is answered 500 without the error, which the control plane logs;
- ``mesh_ca_csr_total{ca,result}`` and ``mesh_ca_csr_duration_seconds`` count all of it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness import free_port, venv_bin, wait_for
from tests.integration.test_distribution_support import ControlledProxy, proxies, selector_service
from tests.integration.test_identity_csr_api import csr_for, post
from tests.integration.test_identity_support import make_ca, spiffe
from tests.integration.test_meshctl_ops import meshctl
from tests.integration.test_proxy_support import destination_rule, write_config

PLUGIN_DIR = Path(__file__).parents[1] / "plugins"
NS = "bank"
CERT_TTL = "10s"


def plugin_env(tmp_path_factory, ca_dir: Path) -> dict:
    """The environment that makes mesh-control load tests/plugins/txmesh_testca.py with its state in ``ca_dir``."""
    dist = tmp_path_factory.mktemp("testca-dist")
    info = dist / "txmesh_testca-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: txmesh-testca\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mesh.plugins]\ntestca = txmesh_testca:plugin\n")
    pythonpath = os.pathsep.join(filter(None, [str(PLUGIN_DIR), str(dist), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": pythonpath, "TXMESH_TESTCA_DIR": str(ca_dir)}


def write_pem(path: Path, cert) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class CAState:
    """The testca directory: its signing root (``root-1``), a second root for the rotation, ``state.json``."""

    def __init__(self, directory: Path):
        self.directory = directory
        key, self.root = make_ca("testca root 1")
        (directory / "ca-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        write_pem(directory / "ca-cert.pem", self.root)
        write_pem(directory / "root-1.pem", self.root)
        _, self.next_root = make_ca("testca root 2")
        write_pem(directory / "root-2.pem", self.next_root)
        self.set("ready")

    def set(self, mode: str, reason: str = "", roots=("root-1.pem",), identity: str | None = None) -> None:
        """``identity``: the only SPIFFE id whose CSRs the ``error`` mode fails (None: every CSR)."""
        state = {"mode": mode, "reason": reason, "roots": list(roots)}
        if identity is not None:
            state["identity"] = identity
        tmp = self.directory / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.directory / "state.json")  # never half-written for the plugin


@pytest.fixture(scope="module")
def testca(tmp_path_factory):
    return CAState(tmp_path_factory.mktemp("testca"))


@pytest.fixture(scope="module")
def mesh(testca, control_factory, backend_factory, process_log_dir, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("ca-config"), selector_service("user-service", namespace=NS),
                          destination_rule("user-service", "user-service", namespace=NS, traffic_policy={
                              "connectionPool": {"http": {"maxRequestsPerConnection": 10}}}))
    control = control_factory(workload_cert_ttl="1h", env=plugin_env(tmp_path_factory, testca.directory),
                              extra_args=["--ca", "testca", "--ca-status-interval", "200ms", "--config-dir", config])
    app = backend_factory("user-service")
    server = ControlledProxy(control, "user-service", namespace=NS, app_port=app.port, labels={"app": "user-service"},
                             extra_args=["--cert-ttl", CERT_TTL], log_dir=process_log_dir).start()
    client = ControlledProxy(control, "frontend", namespace=NS, extra_args=["--cert-ttl", CERT_TTL],
                             log_dir=process_log_dir).start()
    wait_for(lambda: client.curl("user-service", "/").status == 200, 10, what="frontend to reach user-service")
    yield control, server, client
    client.stop()
    server.stop()


def certificate(proxy) -> dict:
    return proxy.admin("/config_dump")["certificate"]


def metric(control, line_start: str) -> float:
    """The value of the first /metrics sample whose line starts with ``line_start``, or 0."""
    _, body = control.admin_request("/metrics")
    for line in body.decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def csr_result(control, result: str) -> float:
    return metric(control, f'mesh_ca_csr_total{{ca="testca",result="{result}"}}')


def test_a_ca_no_plugin_provides_refuses_to_start(tmp_path):
    argv = [venv_bin("twistd"), "-n", "--pidfile=", "mesh-control", "--state-dir", str(tmp_path / "state"),
            "--address", "127.0.0.1", "--port", str(free_port()), "--admin-port", str(free_port()),
            "--ca", "hsm"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr + proc.stdout
    line = proc.stderr.strip().splitlines()[-1]
    prefix = "mesh-control: --ca hsm: no installed plugin provides a CA named 'hsm' (CAs available: "
    assert line.startswith(prefix), proc.stderr
    available = line[len(prefix):].partition(")")[0].split(", ")
    assert "builtin" in available and "testca" not in available  # the test CA is this module's mesh-control's
    assert "To use it: install the plugin that provides the CA 'hsm'; or choose one of those available" in line


def test_workloads_and_the_control_plane_get_their_certificates_from_the_selected_ca(mesh, testca):
    control, server, client = mesh
    for proxy, account in ((server, "user-service"), (client, "frontend")):
        cert = certificate(proxy)
        assert cert["identity"] == spiffe(NS, account)
        assert cert["issuer"] == "CN=testca root 1" and cert["ca_issuer"] == f"testca {testca.directory.name}", cert
    ready = control.admin()
    assert ready["ready"] is True and ready["reason"] is None
    assert ready["ca"] == {"name": "testca", "ready": True, "reason": None, "issuer": f"testca {testca.directory.name}",
                           "roots": 1}
    assert x509.load_pem_x509_certificates(control.root_cert.read_bytes()) == [testca.root]
    code, out, err = meshctl("proxy-config", "cert", "--admin", f"127.0.0.1:{client.admin_port}")
    assert code == 0, err
    assert f"ca                  testca {testca.directory.name}" in out, out
    assert metric(control, 'mesh_ca_ready{ca="testca"}') == 1.0
    assert csr_result(control, "signed") >= 2
    assert client.curl("user-service", "/").status == 200


def test_while_the_ca_is_unavailable_csrs_get_503_and_the_sidecars_keep_serving(mesh, testca):
    control, server, client = mesh
    before = {proxy: certificate(proxy)["serial"] for proxy in (server, client)}
    testca.set("unavailable", reason="sealed for the test: unseal it")
    status, body = wait_for(lambda: (lambda answer: answer[0] == 503 and answer)(control.admin_request("/ready")),
                            10, what="/ready to say the CA is not ready")
    assert json.loads(body)["reason"] == "CA 'testca' not ready: sealed for the test: unseal it"
    assert metric(control, 'mesh_ca_ready{ca="testca"}') == 0.0
    code, out, err = meshctl("proxy-status", "--control-admin", f"127.0.0.1:{control.admin_port}")
    assert code == 0 and "frontend" in out and "user-service" in out, err  # /ready's 503 is still read
    answer = post(control, {"credential": control.token(NS, "teller"), "csr": csr_for("teller")})
    assert answer.status == 503 and answer.headers["retry-after"] == "1", answer
    assert answer.json() == {"error": "CA unavailable: sealed for the test: unseal it"}
    for proxy in (server, client):  # their renewal (at about half of 10 s) is refused, and retried
        failing = wait_for(lambda proxy=proxy: "(503)" in (certificate(proxy)["last_renewal_error"] or "")
                           and certificate(proxy), 8, what=f"{proxy} to fail a renewal")
        assert "sealed for the test" in failing["last_renewal_error"] and failing["serial"] == before[proxy]
        assert proxy.admin_request("/ready")[0] == 200
    for index in range(12):  # new mTLS connections every 10 requests: the certificates in use still work
        assert client.curl("user-service", f"/during-{index}").status == 200
    assert csr_result(control, "unavailable") >= 3
    testca.set("ready")
    for proxy in (server, client):
        renewed = wait_for(lambda proxy=proxy: certificate(proxy)["serial"] != before[proxy] and certificate(proxy),
                           15, what=f"{proxy} to renew once the CA is back")
        assert renewed["last_renewal_error"] is None
    assert control.admin_request("/ready")[0] == 200
    assert client.curl("user-service", "/after").status == 200


def test_a_change_of_the_ca_roots_is_pushed_to_the_running_sidecars(mesh, testca):
    control, server, client = mesh
    acked = {workload: row["version_acked"] for workload, row in proxies(control).items()}
    testca.set("ready", roots=("root-1.pem", "root-2.pem"))
    for proxy in (server, client):  # a new snapshot (its version covers the bundle), applied: not a renewal's
        wait_for(lambda proxy=proxy: (lambda row: row["version_acked"] != acked[proxy.workload]
                                      and not row["stale"])(proxies(control)[proxy.workload]), 10,
                 what=f"{proxy} to ACK a snapshot with the new trust bundle")
        assert certificate(proxy)["trust_bundle_roots"] == 2
    assert x509.load_pem_x509_certificates(control.root_cert.read_bytes()) == [testca.root, testca.next_root]
    assert control.admin()["ca"]["roots"] == 2
    status, body = control.admin_request("/ca/root-cert.pem")
    assert status == 200 and body == control.root_cert.read_bytes()
    assert client.curl("user-service", "/rotated").status == 200
    assert "trust bundle of CA testca: 2 root(s)" in control.log_path.read_text()


def test_a_failing_ca_is_a_500_that_tells_the_caller_nothing_but_to_read_the_log(mesh, testca):
    control, _, _ = mesh
    errors = csr_result(control, "error")
    # only the teller's CSR: a sidecar renewing meanwhile (every ~5 s) would add its own 500 and traceback
    testca.set("error", roots=("root-1.pem", "root-2.pem"), identity=spiffe(NS, "teller"))
    try:
        answer = post(control, {"credential": control.token(NS, "teller"), "csr": csr_for("teller")})
    finally:
        testca.set("ready", roots=("root-1.pem", "root-2.pem"))
    assert answer.status == 500 and answer.json() == {"error": "signing failed; see the control plane log"}
    assert b"fails on purpose" not in answer.body and "retry-after" not in answer.headers
    assert csr_result(control, "error") == errors + 1
    alarms = wait_for(lambda: control.new_log_alarms(), 10, what="the traceback in the control plane's log")
    assert len(alarms) == 1 and "Traceback" in alarms[0], alarms  # expected: taken off the suite's check
    assert "RuntimeError: txmesh_testca fails on purpose" in control.log_path.read_text()


def test_csr_results_and_latency_are_counted_by_ca(mesh):
    control, _, _ = mesh
    signed = csr_result(control, "signed")
    answer = post(control, {"credential": control.token(NS, "teller"),
                            "csr": csr_for("teller", ec.generate_private_key(ec.SECP256R1()))})
    assert answer.status == 200 and answer.json()["issuer"].startswith("testca ")
    assert csr_result(control, "signed") >= signed + 1  # and the sidecars' renewals (every ~5 s) meanwhile
    answer = post(control, {"credential": "not-a-token", "csr": csr_for("teller")})
    assert answer.status == 401 and csr_result(control, "rejected") >= 1
    observed = metric(control, 'mesh_ca_csr_duration_seconds_count{ca="testca"}')
    assert observed >= csr_result(control, "signed") + csr_result(control, "unavailable") + \
        csr_result(control, "error")
