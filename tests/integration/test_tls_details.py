"""TLS details of the sidecar's inbound port and the control plane's port, seen by the real ``openssl s_client``.

- The certificate chain sent is the leaf and its intermediates: never the self-signed root (the peer has
  it; Envoy does not send it either).
- Key exchange: only the groups Envoy offers, X25519, P-256 and P-384; a client offering only others
  (ffdhe2048, P-521) gets a handshake failure.
- Resumption: the inbound port resumes TLS 1.3 sessions (``-sess_out`` / ``-sess_in``) and a resumed
  connection is still bound to the client's identity (x-forwarded-client-cert, as after the full
  handshake); a resumed session whose client certificate has expired since is refused; the control
  plane's port issues no resumable session.

One control plane (its CA is a root) and one sidecar (user-service, in front of the demo app) serve the
module; a second control plane whose CA is an intermediate checks that the intermediate is sent.
"""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness.waiting import wait_for
from tests.integration.test_identity_support import cert_sha256, issue_cert, make_ca, mesh_ca, s_client, spiffe
from tests.integration.test_proxy_support import write_config

NS = "shop"
CLIENT_ID = spiffe(NS, "frontend")
ACCEPTED_GROUPS = {"X25519": "X25519", "P-256": "prime256v1", "P-384": "secp384r1"}
REFUSED_GROUPS = ("ffdhe2048", "P-521")


@pytest.fixture(scope="module")
def mesh(control_factory, backend_factory, proxy_factory, tmp_path_factory):
    """``(control, sidecar, client certificate (cert, key))``."""
    control = control_factory()
    app = backend_factory("user-service")
    config = write_config(tmp_path_factory.mktemp("tls-details-config"))
    sidecar = proxy_factory(config, "user-service", namespace=NS, app_port=app.port,
                            extra_args=control.proxy_args(NS, "user-service"))
    client = issue_cert(tmp_path_factory.mktemp("tls-details-client"), "frontend", mesh_ca(control.state_dir),
                        CLIENT_ID)
    return control, sidecar, client


def ports(mesh) -> dict:
    control, sidecar, _ = mesh
    return {"inbound": sidecar.inbound_port, "control": control.port}


def client_args(mesh, port_name: str) -> dict:
    """``s_client`` keyword arguments: the bundle, and the client certificate for the inbound port."""
    control, _, (cert, key) = mesh
    return {"cafile": control.root_cert, **({"cert": cert, "key": key} if port_name == "inbound" else {})}


def chain_sent(port: int, args=(), **kwargs) -> list:
    """The certificates the server sent (``-showcerts``), as cryptography certificates, leaf first."""
    result = s_client(port, args=["-showcerts", *args], brief=False, **kwargs)
    assert b"Verify return code: 0 (ok)" in result.received, result
    return x509.load_pem_x509_certificates(
        b"".join(re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", result.received, re.S)))


def self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


# -- the chain ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("port_name", ["inbound", "control"])
def test_the_root_is_not_sent(mesh, port_name):
    """The mesh CA is a root: the chain is the leaf alone (it was leaf + root)."""
    chain = chain_sent(ports(mesh)[port_name], **client_args(mesh, port_name))
    assert len(chain) == 1 and not self_signed(chain[0]), [cert.subject.rfc4514_string() for cert in chain]


def make_intermediate(directory: Path, root):
    """An intermediate CA signed by ``root`` = (key, cert): ``(key, cert)`` and the paths of its cert,
    key and chain (the root) files."""
    root_key, root_cert = root
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test intermediate CA")]))
            .issuer_name(root_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=20))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(root_key, hashes.SHA256()))
    paths = directory / "intermediate.pem", directory / "intermediate-key.pem", directory / "root.pem"
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].touch(mode=0o600)
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].write_bytes(root_cert.public_bytes(serialization.Encoding.PEM))
    return (key, cert), paths


def test_an_intermediate_is_sent_and_its_root_is_not(control_factory, backend_factory, proxy_factory, tmp_path):
    """With an intermediate CA (``--ca-chain``), both ports send leaf + intermediate."""
    intermediate, (cert, key, chain) = make_intermediate(tmp_path, make_ca("test root CA"))
    control = control_factory(extra_args=["--ca-cert", cert, "--ca-key", key, "--ca-chain", chain])
    app = backend_factory("intermediate-app")
    sidecar = proxy_factory(write_config(tmp_path / "config"), "user-service", namespace=NS, app_port=app.port,
                            extra_args=control.proxy_args(NS, "user-service"))
    client_cert, client_key = issue_cert(tmp_path, "frontend", intermediate, CLIENT_ID)
    client = {"cert": client_cert, "key": client_key, "args": ["-cert_chain", cert]}
    for port, kwargs in ((sidecar.inbound_port, client), (control.port, {})):
        sent = chain_sent(port, cafile=control.root_cert, **kwargs)
        names = [c.subject.rfc4514_string() for c in sent]
        assert len(sent) == 2 and names[1] == "CN=test intermediate CA", names
        assert not any(self_signed(c) for c in sent), names


# -- key exchange groups ------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", sorted(ACCEPTED_GROUPS))
@pytest.mark.parametrize("port_name", ["inbound", "control"])
def test_envoys_groups_are_accepted(mesh, port_name, group):
    result = s_client(ports(mesh)[port_name], args=["-groups", group], **client_args(mesh, port_name))
    assert result.established and result.alert() is None, result
    assert re.search(rf"Server Temp Key: (ECDH, )?{ACCEPTED_GROUPS[group]}\b", result.diagnostics), result


@pytest.mark.parametrize("group", REFUSED_GROUPS)
@pytest.mark.parametrize("port_name", ["inbound", "control"])
def test_other_groups_are_refused(mesh, port_name, group):
    """A client offering only a group Envoy does not offer gets a handshake failure (they were accepted)."""
    result = s_client(ports(mesh)[port_name], args=["-groups", group], **client_args(mesh, port_name))
    assert result.alert() == "handshake failure", result
    assert not result.established and not result.http_response, result


# -- resumption ---------------------------------------------------------------------------------------------

def resume(port: int, session: Path, *, cert, key, cafile, path="/"):
    """Two ``s_client`` runs: a full handshake that saves its session, then one offering that session."""
    common = {"cafile": cafile, "cert": cert, "key": key, "brief": False, "path": path}
    first = s_client(port, args=["-sess_out", session], **common)
    assert session.exists(), first
    return first, s_client(port, args=["-sess_in", session], **common)


def test_inbound_sessions_resume_bound_to_the_client_identity(mesh, tmp_path):
    control, sidecar, (cert, key) = mesh
    first, second = resume(sidecar.inbound_port, tmp_path / "session.pem", cert=cert, key=key,
                           cafile=control.root_cert, path="/hello")
    assert b"New, TLSv1.3" in first.received and b"HTTP/1.1 200 " in first.received, first
    assert b"Reused, TLSv1.3" in second.received and b"HTTP/1.1 200 " in second.received, second
    # the app sees the same caller on the resumed connection as on the full one
    for result in (first, second):
        body = result.received.decode()
        assert f"Hash={cert_sha256(cert)}" in body and f"URI={CLIENT_ID}" in body, result


def test_a_resumed_session_does_not_outlive_the_client_certificate(mesh, tmp_path):
    """A session resumed after its client certificate expired is refused; before the fix it was served."""
    control, sidecar, _ = mesh
    not_after = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) + datetime.timedelta(seconds=4)
    cert, key = issue_cert(tmp_path, "short-lived", mesh_ca(control.state_dir), CLIENT_ID, not_after=not_after)
    session = tmp_path / "session.pem"
    first = s_client(sidecar.inbound_port, cafile=control.root_cert, cert=cert, key=key, brief=False,
                     args=["-sess_out", session], path="/hello")
    assert first.http_response and b"HTTP/1.1 200 " in first.received, first
    wait_for(lambda: time.time() > not_after.timestamp() + 1, timeout=15, what="the client certificate to expire")
    second = s_client(sidecar.inbound_port, cafile=control.root_cert, cert=cert, key=key, brief=False,
                      args=["-sess_in", session], path="/must-not-arrive")
    assert b"Reused, TLSv1.3" in second.received, second  # resumption itself worked ...
    assert not second.http_response, second  # ... and the connection was closed before any request
    assert f"the certificate chain of {CLIENT_ID} is not valid now" in sidecar.log_path.read_text()


def test_the_control_plane_issues_no_resumable_session(mesh, tmp_path):
    control, _, (cert, key) = mesh
    first, second = resume(control.port, tmp_path / "session.pem", cert=cert, key=key, cafile=control.root_cert)
    assert b"New, TLSv1.3" in first.received, first
    assert b"New, TLSv1.3" in second.received and b"Reused" not in second.received, second


def test_sessions_do_not_survive_the_sidecars_rotation(control_factory, backend_factory, proxy_factory, tmp_path):
    """A session from before the sidecar's certificate rotated is not resumed: a full handshake shows
    the new certificate."""
    control = control_factory()
    app = backend_factory("rotating-app")
    sidecar = proxy_factory(write_config(tmp_path / "config"), "user-service", namespace=NS, app_port=app.port,
                            extra_args=control.proxy_args(NS, "user-service", cert_ttl="6s"))
    cert, key = issue_cert(tmp_path, "frontend", mesh_ca(control.state_dir), CLIENT_ID)
    before = sidecar.admin("/config_dump")["certificate"]["serial"]
    first, resumed = resume(sidecar.inbound_port, tmp_path / "session.pem", cert=cert, key=key,
                            cafile=control.root_cert)
    if b"Reused" not in resumed.received:  # the sidecar rotated between the two: try once more
        first, resumed = resume(sidecar.inbound_port, tmp_path / "session.pem", cert=cert, key=key,
                                cafile=control.root_cert)
    assert b"Reused, TLSv1.3" in resumed.received, resumed
    wait_for(lambda: sidecar.admin("/config_dump")["certificate"]["serial"] != before, timeout=20,
             what="the sidecar's certificate to rotate")
    after = s_client(sidecar.inbound_port, cafile=control.root_cert, cert=cert, key=key, brief=False,
                     args=["-sess_in", tmp_path / "session.pem"])
    assert b"New, TLSv1.3" in after.received and b"HTTP/1.1 200 " in after.received, after

