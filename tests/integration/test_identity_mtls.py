"""mTLS between real sidecars that got their certificates from a real mesh-control.

One control plane and five workloads in namespace ``shop`` serve the whole module, each an app behind
its sidecar, each sidecar with a join token for its own service account:

- ``frontend``, ``user-service``, ``payment-service``: the happy path (frontend calls the other two);
  payment-service also has AuthorizationPolicies (only frontend may call it, and not /admin);
- ``ledger``: PeerAuthentication STRICT (plaintext refused);
- ``archive``: PeerAuthentication DISABLE (TLS refused).

Handshakes are also attacked from outside with the real ``openssl s_client``: client certificates from
another CA, expired or not yet valid, none at all, and TLS 1.0/1.1.
"""

from __future__ import annotations

import datetime
import stat

import pytest
from cryptography.x509.oid import NameOID

from tests.harness import curl, free_port
from tests.integration.test_identity_support import (
    assert_no_secrets_in_logs,
    authorization_policy,
    cert_sha256,
    issue_cert,
    make_ca,
    mesh_ca,
    mesh_endpoint,
    peer_authentication,
    s_client,
    spiffe,
    xfcc,
)
from tests.integration.test_proxy_support import destination_rule, service_entry, write_config

NS = "shop"
WORKLOADS = ("frontend", "user-service", "payment-service", "ledger", "archive")
FRONTEND_ID = spiffe(NS, "frontend")
REFUSED_PATH = "/must-not-arrive"  # what refused handshakes would have asked for


@pytest.fixture(scope="module")
def mesh(control_factory, backend_factory, proxy_factory, tmp_path_factory):
    control = control_factory()
    apps = {name: backend_factory(name) for name in WORKLOADS}
    inbound = {name: free_port() for name in WORKLOADS}
    plain = lambda port: {"address": "127.0.0.1", "ports": {"http": port}}  # noqa: E731
    config = write_config(
        tmp_path_factory.mktemp("mtls-config"),
        *(service_entry(name, [mesh_endpoint(inbound[name], name)], namespace=NS) for name in WORKLOADS),
        # the same sidecars without the tlsMode label: plaintext to their inbound ports
        service_entry("user-plain", [plain(inbound["user-service"])], namespace=NS),
        service_entry("ledger-plain", [plain(inbound["ledger"])], namespace=NS),
        service_entry("archive-plain", [plain(inbound["archive"])], namespace=NS),
        # expects sa/user-service, but the endpoint is payment-service's sidecar
        service_entry("impostor", [mesh_endpoint(inbound["payment-service"], "user-service")], namespace=NS),
        # expects mTLS, but the endpoint is an app that speaks plaintext HTTP
        service_entry("bare-app", [mesh_endpoint(apps["user-service"].port, "user-service")], namespace=NS),
        # user-service's sidecar, tlsMode label and all, as MESH_EXTERNAL services: no auto mTLS (as Istio),
        # unless a DestinationRule says ISTIO_MUTUAL
        *(mesh_external(service_entry(name, [mesh_endpoint(inbound["user-service"], "user-service")], namespace=NS))
          for name in ("user-external", "user-external-mtls")),
        destination_rule("user-external-mtls", "user-external-mtls", namespace=NS,
                         traffic_policy={"tls": {"mode": "ISTIO_MUTUAL"}}),
        peer_authentication("ledger-strict", NS, "STRICT", selector={"app": "ledger"}),
        peer_authentication("archive-off", NS, "DISABLE", selector={"app": "archive"}),
        authorization_policy("payment-callers", NS, selector={"app": "payment-service"}, rules=[
            {"from": [{"source": {"principals": [f"cluster.local/ns/{NS}/sa/frontend"]}}],
             "to": [{"operation": {"paths": ["/pay", "/pay/*", "/admin/*"]}}]},
        ]),
        authorization_policy("payment-no-admin", NS, selector={"app": "payment-service"}, action="DENY", rules=[
            {"to": [{"operation": {"paths": ["/admin/*"]}}]},
        ]),
    )
    proxies = {name: proxy_factory(config, name, namespace=NS, app_port=apps[name].port, inbound_port=inbound[name],
                                   labels={"app": name}, extra_args=control.proxy_args(NS, name))
               for name in WORKLOADS}
    return control, apps, proxies


def mesh_external(entry: dict) -> dict:
    """``entry`` without its ``location``: MESH_EXTERNAL, the default."""
    return {**entry, "spec": {key: value for key, value in entry["spec"].items() if key != "location"}}


def call(mesh, source: str, host: str, path: str = "/", **kwargs):
    """A request from ``source``'s app through its sidecar's outbound listener."""
    _, _, proxies = mesh
    return proxies[source].curl(host, path, **kwargs)


def echoed_xfcc(result) -> dict | None:
    """The x-forwarded-client-cert the app received (it echoes its request headers), parsed."""
    assert result.status == 200, result
    value = result.json()["headers"].get("x-forwarded-client-cert")
    return xfcc(value) if value is not None else None


# -- the happy path ------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["user-service", "payment-service"])
def test_frontend_reaches_services_over_mtls(mesh, target):
    result = call(mesh, "frontend", target, "/pay")
    assert result.status == 200, result
    assert result.headers["x-demo-service"] == target
    cert = echoed_xfcc(result)
    assert cert is not None, "the app got no x-forwarded-client-cert: the hop was not mTLS"
    assert cert["URI"] == FRONTEND_ID
    assert cert["By"] == spiffe(NS, target)
    assert cert["Subject"] == '""'
    assert len(cert["Hash"]) == 64 and int(cert["Hash"], 16) >= 0
    # the frontend's sidecar added http (its app's connection); the callee's, over mTLS, kept it (Istio's too)
    assert result.json()["headers"]["x-forwarded-proto"] == "http"


def test_sidecars_append_nothing_to_x_forwarded_for(mesh):
    """Istio's sidecars (Envoy without ``use_remote_address``): what the calling app sent, or nothing, reaches the
    callee's app over two sidecars."""
    assert "x-forwarded-for" not in call(mesh, "frontend", "user-service").json()["headers"]
    sent = call(mesh, "frontend", "user-service", headers={"X-Forwarded-For": "10.1.2.3"}).json()["headers"]
    assert sent["x-forwarded-for"] == "10.1.2.3", sent


def test_every_sidecar_got_its_own_certificate(mesh):
    control, _, proxies = mesh
    ready = control.admin()
    assert ready["csr_signed"] >= len(WORKLOADS) and ready["csr_rejected"] == {}
    for name, proxy in proxies.items():
        assert proxy.admin("/ready")["ready"] is True
        assert f"workload certificate for {spiffe(NS, name)} installed" in proxy.log_path.read_text()


def test_client_cert_hash_is_stable_per_certificate(mesh):
    hashes = {echoed_xfcc(call(mesh, "frontend", "user-service"))["Hash"] for _ in range(3)}
    assert len(hashes) == 1


def test_caller_identity_is_per_workload(mesh):
    """user-service calling payment-service is seen as user-service (and denied by payment's policy), and
    ledger calling user-service is seen as ledger."""
    cert = echoed_xfcc(call(mesh, "ledger", "user-service"))
    assert (cert["URI"], cert["By"]) == (spiffe(NS, "ledger"), spiffe(NS, "user-service"))


def test_forged_xfcc_from_the_app_is_replaced(mesh):
    forged = f"By={spiffe(NS, 'user-service')};Hash=00;URI={spiffe(NS, 'admin')}"
    result = call(mesh, "frontend", "user-service", headers={"x-forwarded-client-cert": forged})
    assert echoed_xfcc(result)["URI"] == FRONTEND_ID
    assert forged not in result.body.decode()


# -- PeerAuthentication ----------------------------------------------------------------------------------

def test_plaintext_to_a_permissive_port_is_served(mesh):
    _, _, proxies = mesh
    inbound = proxies["user-service"].inbound_port
    forged = f"URI={spiffe(NS, 'admin')}"
    direct = curl(f"http://127.0.0.1:{inbound}/plain", headers={"x-forwarded-client-cert": forged})
    assert direct.status == 200 and direct.headers["x-demo-service"] == "user-service", direct
    assert echoed_xfcc(direct) is None, "a plaintext caller has no certificate: no XFCC, and a forged one is dropped"
    via_sidecar = call(mesh, "frontend", "user-plain")
    assert via_sidecar.status == 200 and echoed_xfcc(via_sidecar) is None, via_sidecar


def test_plaintext_to_a_strict_port_is_refused(mesh):
    _, apps, proxies = mesh
    direct = curl(f"http://127.0.0.1:{proxies['ledger'].inbound_port}/plain")
    assert direct.status == 0 and direct.exit_code in (52, 56), direct  # empty reply / connection reset
    via_sidecar = call(mesh, "frontend", "ledger-plain")
    assert via_sidecar.status == 503, via_sidecar
    # mTLS to the same port works
    assert echoed_xfcc(call(mesh, "frontend", "ledger"))["URI"] == FRONTEND_ID


def test_tls_to_a_disabled_port_is_refused(mesh):
    refused = call(mesh, "frontend", "archive")
    assert refused.status == 503 and "UF" in refused.headers.get("x-mesh-flags", ""), refused
    plain = call(mesh, "frontend", "archive-plain")
    assert plain.status == 200 and echoed_xfcc(plain) is None, plain


def test_no_auto_mtls_to_a_mesh_external_service(mesh):
    """Istio's buildUpstreamTLSSettings: a MESH_EXTERNAL service gets no auto mTLS, even to an endpoint
    labelled security.istio.io/tlsMode: istio; tls.mode ISTIO_MUTUAL in a DestinationRule still gives it."""
    plain = call(mesh, "frontend", "user-external")
    assert plain.status == 200 and plain.headers["x-demo-service"] == "user-service", plain
    assert echoed_xfcc(plain) is None, "the hop to a MESH_EXTERNAL service without tls must be plaintext"
    mutual = echoed_xfcc(call(mesh, "frontend", "user-external-mtls"))
    assert mutual is not None and (mutual["URI"], mutual["By"]) == (FRONTEND_ID, spiffe(NS, "user-service"))


# -- AuthorizationPolicy on the caller's SPIFFE id ----------------------------------------------------------

@pytest.mark.parametrize("source, path, status", [
    ("frontend", "/pay", 200),            # ALLOW matches
    ("frontend", "/pay/42", 200),
    ("frontend", "/admin/refund", 403),   # DENY wins over ALLOW
    ("frontend", "/other", 403),          # ALLOW policies exist and none matches
    ("user-service", "/pay", 403),        # another principal
    ("ledger", "/pay", 403),
    (None, "/pay", 403),                  # plaintext: no principal at all
])
def test_authorization_by_principal(mesh, source, path, status):
    _, _, proxies = mesh
    if source is None:
        result = curl(f"http://127.0.0.1:{proxies['payment-service'].inbound_port}{path}")
    else:
        result = call(mesh, source, "payment-service", path)
    assert result.status == status, result
    if status == 403:
        assert "x-demo-service" not in result.headers, "a denied request must not reach the app"


# -- the client side checks the server's identity -----------------------------------------------------------

def test_server_with_another_identity_is_refused(mesh):
    result = call(mesh, "frontend", "impostor")
    assert result.status == 503, result
    assert "UF" in result.headers.get("x-mesh-flags", ""), result
    body = result.body.decode()
    assert "identity mismatch" in body, body
    assert spiffe(NS, "user-service") in body and spiffe(NS, "payment-service") in body, body


def test_server_without_tls_is_refused(mesh):
    result = call(mesh, "frontend", "bare-app")
    assert result.status == 503 and "UF" in result.headers.get("x-mesh-flags", ""), result
    assert "x-demo-service" not in result.headers


# -- handshakes from outside, with openssl s_client -----------------------------------------------------------

@pytest.fixture(scope="module")
def certs(mesh, tmp_path_factory):
    """Client certificates for ``spiffe://cluster.local/ns/shop/sa/frontend``, good and bad."""
    control, _, _ = mesh
    directory = tmp_path_factory.mktemp("client-certs")
    now = datetime.datetime.now(datetime.timezone.utc)
    hour = datetime.timedelta(hours=1)
    ca = mesh_ca(control.state_dir)
    _, root = ca
    other_name = make_ca("some other CA")
    # same subject as the mesh root, another key: found "by name", then fails the signature check
    same_name = make_ca(root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    return {
        "good": issue_cert(directory, "good", ca, FRONTEND_ID),
        "other-ca": issue_cert(directory, "other-ca", other_name, FRONTEND_ID),
        "same-name-ca": issue_cert(directory, "same-name-ca", (same_name[0], root), FRONTEND_ID),
        "expired": issue_cert(directory, "expired", ca, FRONTEND_ID, not_before=now - 2 * hour, not_after=now - hour),
        "not-yet-valid": issue_cert(directory, "not-yet-valid", ca, FRONTEND_ID, not_before=now + hour,
                                    not_after=now + 2 * hour),
        "bundle": control.root_cert,
    }


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_valid_client_certificate_is_served(mesh, certs, version):
    """The positive control of the rejections below: a mesh-CA certificate gets an answer."""
    _, _, proxies = mesh
    cert, key = certs["good"]
    result = s_client(proxies["user-service"].inbound_port, cafile=certs["bundle"], cert=cert, key=key,
                      args=[version], path="/hello")
    assert result.exit_code == 0 and result.http_response, result
    assert result.protocol == {"-tls1_2": "TLSv1.2", "-tls1_3": "TLSv1.3"}[version], result
    assert b"HTTP/1.1 200 " in result.received, result
    body = result.received.decode()
    assert f"Hash={cert_sha256(cert)}" in body and f"URI={FRONTEND_ID}" in body, result


@pytest.mark.parametrize("offered, chosen", [("http/1.1", "http/1.1"), ("h2,http/1.1", "h2")])
def test_tls13_preferred_and_alpn(mesh, certs, offered, chosen):
    """The inbound port prefers HTTP/2 (mesh.proxy.codec.h2_server) and still speaks HTTP/1.1."""
    _, _, proxies = mesh
    cert, key = certs["good"]
    result = s_client(proxies["user-service"].inbound_port, cafile=certs["bundle"], cert=cert, key=key,
                      args=["-alpn", offered, "-verify_return_error"], brief=False)
    session = result.received.decode("utf-8", "replace")
    assert "New, TLSv1.3, Cipher is TLS_" in session, result
    assert f"ALPN protocol: {chosen}" in session, result
    assert "Verify return code: 0 (ok)" in session, result
    if chosen == "http/1.1":  # s_client sends an HTTP/1.1 request
        assert result.http_response, result


@pytest.mark.parametrize("case, alerts", [
    ("none", {"-tls1_2": {"handshake failure"}, "-tls1_3": {"certificate required"}}),
    ("other-ca", {"unknown ca"}),
    ("same-name-ca", {"decrypt error", "bad certificate", "bad signature"}),
    ("expired", {"certificate expired"}),
    ("not-yet-valid", {"bad certificate"}),
])
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_bad_client_certificate_is_refused(mesh, certs, case, alerts, version):
    _, _, proxies = mesh
    cert, key = certs[case] if case != "none" else (None, None)
    result = s_client(proxies["user-service"].inbound_port, cafile=certs["bundle"], cert=cert, key=key,
                      args=[version], path=REFUSED_PATH)
    expected = alerts.get(version) if isinstance(alerts, dict) else alerts
    assert result.alert() in expected, result
    assert not result.http_response and b"x-demo-service" not in result.received.lower(), result
    assert result.exit_code != 0, result
    if version == "-tls1_2":  # in TLS 1.3 the client finishes first and hears the refusal after
        assert not result.established, result


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_old_tls_versions_are_refused(mesh, certs, version):
    """The server refuses TLS 1.0/1.1 with a protocol_version alert.

    The local OpenSSL may refuse to even offer TLS < 1.2 at its default security level ("no protocols
    available"); then the client is retried with ``-cipher DEFAULT:@SECLEVEL=0``, which lets it send a
    TLS 1.0/1.1 ClientHello, so that it is the *server* that says no (the alert proves it).
    """
    _, _, proxies = mesh
    cert, key = certs["good"]
    port = proxies["user-service"].inbound_port
    result = s_client(port, cafile=certs["bundle"], cert=cert, key=key, args=[version], path=REFUSED_PATH)
    if result.alert() is None and ("no protocols available" in result.diagnostics
                                   or "unsupported protocol" in result.diagnostics):
        result = s_client(port, cafile=certs["bundle"], cert=cert, key=key,
                          args=[version, "-cipher", "DEFAULT:@SECLEVEL=0"], path=REFUSED_PATH)
        if result.alert() is None and not result.established and "no protocols available" in result.diagnostics:
            pytest.skip(f"the local openssl cannot send a {version} ClientHello at all (compiled out): {result}")
    assert result.alert() == "protocol version", result
    assert not result.established and not result.http_response and result.exit_code != 0, result


def test_refused_handshakes_reached_no_app(mesh):
    """No refused handshake let a request through to the app; no process logged a traceback."""
    control, apps, proxies = mesh
    app_log = apps["user-service"].log_path.read_text()
    assert "/hello" in app_log, "the accepted s_client requests are in the app log"
    assert REFUSED_PATH not in app_log


# -- key hygiene (last: it reads every log written by the tests above) ----------------------------------------

def test_keys_are_private_and_no_secret_is_logged(mesh):
    control, apps, proxies = mesh
    for name in ("ca-key.pem", "token-key"):
        mode = stat.S_IMODE((control.state_dir / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {mode:o}"
    assert control.tokens, "the sidecars were given tokens"
    checked = assert_no_secrets_in_logs([control, *proxies.values(), *apps.values()], tokens=control.tokens,
                                        key_files=[control.state_dir / "ca-key.pem"])
    assert checked > 1000
    # nor in what the admin ports show (the certificate in /config_dump, never its key)
    pages = [control.admin_request(path)[1] for path in ("/ready", "/ca/root-cert.pem")]
    for proxy in proxies.values():
        pages += [proxy.admin_request(path)[1] for path in ("/ready", "/config_dump", "/clusters")]
    for page in pages:
        text = page.decode("utf-8", "replace")
        assert "PRIVATE KEY" not in text
        assert not any(token in text or token.rpartition(".")[2] in text for token in control.tokens)
    dump = proxies["frontend"].admin("/config_dump")["certificate"]
    assert dump["identity"] == FRONTEND_ID and dump["source"] == "control plane", dump
