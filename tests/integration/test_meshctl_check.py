"""``meshctl check`` and ``meshctl bug-report`` against a real local mesh (``meshctl up`` and ``meshctl run``).

The verdicts a healthy mesh cannot show (skewed clocks, NACKs, certificates near their end) and the
redaction rules are unit-tested in tests/unit/test_meshctl_check_verdicts.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tarfile
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.identity.ca import CertificateAuthority
from tests.harness import free_port, wait_for
from tests.integration.local_mesh_support import LocalMeshUnderTest, app_command, hello_config, meshctl


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A local mesh with hello-v1 (an app on a free port) and a frontend, both started by meshctl run."""
    mesh = LocalMeshUnderTest(tmp_path_factory.mktemp("check-mesh"), hello_config(weights=(100, 0)))
    mesh.up()
    app_port = free_port()
    mesh.run("--service", "hello", "--port", app_port, "--label", "version=v1", "--",
             *app_command("hello-v1", app_port))
    mesh.run("--service", "frontend", "--", "sleep", "600")
    yield mesh
    mesh.clean_up()
    assert mesh.log_alarms() == []


def lines(output: str) -> dict:
    """``{subject: (status, detail)}`` of meshctl check's lines."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"(PASS|WARN|FAIL)  (.+?): (.*)$", line)
        if match:
            found[match[2]] = (match[1], match[3])
    return found


def test_preflight_on_a_fresh_host_passes(tmp_path):
    port, admin_port = free_port(), free_port()
    mesh = LocalMeshUnderTest(tmp_path)
    result = mesh.meshctl("check", "--pre", "--control", f"127.0.0.1:{port}",
                          "--control-admin", f"127.0.0.1:{admin_port}")
    assert result.returncode == 0, result
    found = lines(result.stdout)
    assert set(found) == {"install", "state directory", "control plane ports", "CA"}, result.stdout
    assert all(status == "PASS" for status, _ in found.values()), result.stdout
    assert f"{port} and {admin_port} are free on 127.0.0.1 for `meshctl up`" in found["control plane ports"][1]
    assert "none yet in" in found["CA"][1] and "`meshctl up` creates one" in found["CA"][1]
    assert "4 checks: 0 failed, 0 warning(s)" in result.stdout


def test_preflight_fails_on_a_taken_port_and_a_readable_ca_key(tmp_path):
    mesh = LocalMeshUnderTest(tmp_path)
    CertificateAuthority.load_or_create(str(mesh.mesh.control_dir), "cluster.local")
    key = mesh.mesh.control_dir / "ca-key.pem"
    os.chmod(key, 0o644)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = mesh.meshctl("check", "--pre", "--control", f"127.0.0.1:{port}",
                              "--control-admin", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1, result
    found = lines(result.stdout)
    assert found["control plane ports"][0] == "FAIL"
    assert f"port 127.0.0.1:{port} is in use; find the process with `ss -ltnp 'sport = :{port}'`" \
        in found["control plane ports"][1]
    assert found["CA key"] == ("FAIL", f"{key} has mode 0644: others can read the mesh's CA key; `chmod 600 {key}` "
                                       "(and consider a new CA if it leaked)")
    assert found["CA"][0] == "PASS" and "valid until" in found["CA"][1]


def test_a_healthy_local_mesh_passes_every_check(local):
    result = local.meshctl("check")
    assert result.returncode == 0, result
    found = lines(result.stdout)
    assert {"control plane", "control plane TLS", "clock skew", "config", "config sync", "proxy hello-v1",
            "proxy frontend"} <= set(found), result.stdout
    assert all(status == "PASS" for status, _ in found.values()), result.stdout
    assert f"are the local control plane's (pid {local.mesh.control()['process']['pid']})" \
        in found["control plane ports"][1]
    assert found["control plane TLS"][1].startswith(
        f"127.0.0.1:{local.port} presents spiffe://cluster.local/ns/mesh-system/sa/mesh-control, verified against "
        "the trust bundle")
    assert "2 proxies, all SYNCED" in found["config sync"][1]
    assert found["proxy hello-v1"][1].startswith("ready, certificate spiffe://cluster.local/ns/default/sa/hello "
                                                 "valid 23h")


def test_check_fails_on_rejected_config_and_names_the_resource(local):
    bad = local.config_dir / "bad.yaml"
    bad.write_text("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: broken}\n"
                   "spec: {hosts: [hello]}\n")
    try:
        wait_for(lambda: json.loads(_admin(local, "/ready"))["config_errors"], timeout=15,
                 what="the control plane rejects bad.yaml")
        result = local.meshctl("check")
    finally:
        bad.unlink()
    assert result.returncode == 1, result
    status, detail = lines(result.stdout)["config"]
    assert status == "FAIL" and f"1 resource(s) rejected: {bad}:" in detail and "VirtualService/default/broken" \
        in detail and "fix them (`meshctl validate DIR` shows the same)" in detail
    wait_for(lambda: not json.loads(_admin(local, "/ready"))["config_errors"], timeout=15, what="bad.yaml gone")


def test_check_fails_when_the_control_plane_cannot_be_reached(tmp_path):
    port = free_port()
    result = meshctl("check", "--state-dir", tmp_path, "--control-admin", f"127.0.0.1:{port}")
    assert result.returncode == 1
    status, detail = lines(result.stdout)["control plane"]
    assert status == "FAIL" and f"http://127.0.0.1:{port}/ready" in detail
    assert f"start it with `meshctl up --state-dir {tmp_path}` or point --control-admin at it" in detail


def test_check_fails_when_the_trust_bundle_is_another_mesh_s(local, tmp_path):
    CertificateAuthority.load_or_create(str(tmp_path), "cluster.local")
    result = local.meshctl("check", "--ca-bundle", tmp_path / "root-cert.pem")
    assert result.returncode == 1
    status, detail = lines(result.stdout)["control plane TLS"]
    assert status == "FAIL"
    assert f"127.0.0.1:{local.port}'s certificate does not verify against {tmp_path / 'root-cert.pem'}" in detail
    assert "is it the bundle of this mesh (--ca-bundle)?" in detail


def test_check_fails_for_a_sidecar_that_does_not_answer(local):
    port = free_port()
    result = local.meshctl("check", "--admin", f"127.0.0.1:{port}")
    assert result.returncode == 1
    status, detail = lines(result.stdout)[f"proxy 127.0.0.1:{port}"]
    assert status == "FAIL" and "is it running? Its log says why" in detail


def _admin(local, path) -> bytes:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{local.admin_port}{path}", timeout=5) as response:
        return response.read()


# -- bug-report -----------------------------------------------------------------------------

def _members(archive) -> dict:
    with tarfile.open(archive, "r:gz") as tar:
        return {member.name.split("/", 1)[1]: tar.extractfile(member).read().decode()
                for member in tar.getmembers() if member.isfile()}


def test_bug_report_has_dumps_logs_versions_and_checks_and_no_secret(local, tmp_path):
    key_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    token = meshctl("token", "create", "--state-dir", local.mesh.control_dir, "--namespace", "default",
                    "--service-account", "web").stdout.strip()
    assert token.startswith("txm1.")
    given = tmp_path / "given"
    given.mkdir()
    (given / "app.log").write_text(f"starting\n{key_pem}token={token}\nGET / Authorization: Bearer s3cr3t-value\n"
                                   f'{{"authorization": "Basic aGVsbG86c2VjcmV0"}}\ndone\n')
    (given / "tls-key.pem").write_text(key_pem)
    (given / "blob.bin").write_bytes(os.urandom(64) + b"\xff\xfe")
    archive = tmp_path / "report.tar.gz"
    result = local.meshctl("bug-report", "--log", given, "-o", archive)
    assert result.returncode == 0, result
    assert f"Wrote {archive} (" in result.stdout and "Read it before you share it." in result.stdout
    assert oct(archive.stat().st_mode & 0o777) == "0o600"
    members = _members(archive)

    # what a report needs
    assert {"README.txt", "check.txt", "versions.json", "control/ready.json", "control/proxies.json",
            "control/resources.json",
            "control/metrics.txt", "local/up.json", "local/config/mesh.yaml", "logs/local/control-plane.log",
            "logs/given/given/app.log"} <= set(members), sorted(members)
    for proxy in ("hello-v1", "frontend"):
        dump = json.loads(members[f"proxies/{proxy}/config_dump.json"])
        assert dump["workload"]["name"] == proxy and dump["certificate"]["identity"]
        assert f"logs/local/{proxy}-sidecar.log" in members
    assert "PASS  proxy hello-v1: ready" in members["check.txt"]
    sources = {r["document"]["kind"]: r["source"] for r in json.loads(members["control/resources.json"])["resources"]}
    assert sources["VirtualService"].startswith(str(local.config_dir / "mesh.yaml"))
    versions = json.loads(members["versions.json"])
    assert versions["meshctl"] and {"builtin.balancing"} <= {p["name"] for p in versions["plugins"]}
    assert sorted(versions["proxies"].values()) == [versions["meshctl"]] * 2
    assert "starting" in members["logs/given/given/app.log"] and "done" in members["logs/given/given/app.log"]

    # secrets: the planted key, token and credentials, the sidecars' real join tokens, the CA key
    secrets = [line for line in key_pem.splitlines() if "-----" not in line]
    secrets += [token, "s3cr3t-value", "aGVsbG86c2VjcmV0"]
    secrets += [path.read_text().strip() for path in local.mesh.token_dir.glob("*.token")]
    ca_key = (local.mesh.control_dir / "ca-key.pem").read_text()
    secrets += [line for line in ca_key.splitlines() if "-----" not in line]
    for name, text in members.items():
        for secret in secrets:
            assert secret not in text, f"{name} holds a secret: {secret[:20]}..."
        assert "PRIVATE KEY-----\n" not in text, name
    readme = members["README.txt"]
    assert f"{given / 'tls-key.pem'}: a secret by its name" in readme and f"{given / 'blob.bin'}: binary" in readme


def test_bug_report_refuses_to_overwrite(local, tmp_path):
    archive = tmp_path / "exists.tar.gz"
    archive.write_text("keep me")
    result = local.meshctl("bug-report", "-o", archive)
    assert result.returncode == 1
    assert f"meshctl bug-report: {archive} exists; give another -o FILE or remove it" in result.stderr
    assert archive.read_text() == "keep me"


def test_bug_report_says_when_it_cannot_write(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = meshctl("bug-report", "--state-dir", tmp_path / "none", "--control-admin", f"127.0.0.1:{free_port()}",
                     "-o", blocker / "report.tar.gz")
    assert result.returncode == 1
    assert f"meshctl bug-report: cannot write {blocker / 'report.tar.gz'}: " in result.stderr
    assert "give a writable -o FILE" in result.stderr and "Traceback" not in result.stderr


def test_bug_report_without_a_mesh_still_writes_what_it_can(tmp_path):
    archive = tmp_path / "lonely.tar.gz"
    result = meshctl("bug-report", "--state-dir", tmp_path / "none", "--control-admin",
                     f"127.0.0.1:{free_port()}", "-o", archive, cwd=tmp_path)
    assert result.returncode == 0, result
    members = _members(archive)
    assert "FAIL  control plane: " in members["check.txt"]
    assert "control plane /ready: cannot reach" in members["README.txt"]
    assert time.time() - archive.stat().st_mtime < 60
