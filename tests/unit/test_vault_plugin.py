"""plugins/txmesh-vault: its options, and the pure functions over what Vault answers.

tests/integration/test_vault_*.py run it in mesh-control against a real OpenBao server.
"""

from __future__ import annotations

import ast
import datetime
from pathlib import Path

import hvac.exceptions
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.task import Clock
from txmesh_vault import VaultPlugin, pki
from txmesh_vault.settings import SettingsError, VaultSettings
from txmesh_vault.vault import PermissionDenied, unavailable

from mesh.api import CAStatus, CAUnavailable, Config
from mesh.control.tap import Options
from mesh.plugins import DEFAULT_PLUGINS, make_plugin_manager

PACKAGE = Path(pki.__file__).parent
URI = "spiffe://cluster.local/ns/shop/sa/frontend"
NOW = datetime.datetime.now(datetime.timezone.utc)


def certificate(subject: str, issuer=None, *, ca=True, sans=(), usages=None, days=1):
    """``(key, cert)``: self-signed when ``issuer`` (a ``(key, cert)``) is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)] if subject else [])
    issuer_key, issuer_name = (issuer[0], issuer[1].subject) if issuer else (key, name)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(NOW - datetime.timedelta(days=days))
               .not_valid_after(NOW + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=True)
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return key, builder.sign(issuer_key, hashes.SHA256())


def text(*certs) -> str:
    return pki.pem(certs).decode()


# -- the trust bundle: the roots of every issuer ------------------------------------------------------------

def test_every_issuer_s_root_is_in_the_bundle_oldest_first_and_once():
    """During a rotation the mount holds the old and the new root (and an intermediate under the old one):
    the bundle holds both roots, each once, in a stable order."""
    old, new = certificate("old root", days=30), certificate("new root", days=1)
    intermediate = certificate("intermediate", old)
    issuers = {"b-new": {"certificate": text(new[1]), "ca_chain": [text(new[1])]},
               "a-old": {"certificate": text(old[1]), "ca_chain": [text(old[1])]},
               "c-int": {"certificate": text(intermediate[1]), "ca_chain": [text(intermediate[1]), text(old[1])]}}
    roots, problems = pki.roots_of_issuers(issuers)
    assert (roots, problems) == ([old[1], new[1]], [])


def test_an_intermediate_without_its_root_is_named_as_a_problem():
    root = certificate("offline root")
    intermediate = certificate("intermediate", root)
    roots, problems = pki.roots_of_issuers({"id1": {"certificate": text(intermediate[1]), "issuer_name": "int",
                                                    "ca_chain": [text(intermediate[1])]}})
    assert roots == []
    assert problems == ["issuer int has no root certificate in its chain: import the chain up to the root with the "
                        "issuer (MOUNT/intermediate/set-signed or MOUNT/issuers/import/bundle)"]


def test_a_certificate_naming_itself_as_issuer_but_signed_by_another_key_is_no_root():
    root = certificate("root")
    impostor = certificate("root", root)  # subject == issuer name, signature by root's key
    assert pki.is_self_signed(root[1]) and not pki.is_self_signed(impostor[1])


def test_the_chain_given_to_the_workload_stops_below_the_root():
    root = certificate("root")
    intermediate = certificate("intermediate", root)
    assert pki.chain_without_roots((text(intermediate[1]), text(root[1]))) == pki.pem([intermediate[1]])
    assert pki.chain_without_roots((text(root[1]),), text(root[1])) == b""
    assert pki.chain_without_roots((), text(intermediate[1])) == pki.pem([intermediate[1]])


# -- what Vault issued --------------------------------------------------------------------------------------

def test_an_issued_certificate_must_name_only_the_spiffe_id_and_serve_both_tls_ends():
    root = certificate("root")
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    good = certificate("", root, ca=False, sans=[x509.UniformResourceIdentifier(URI)], usages=both)[1]
    assert pki.check_issued(text(good), URI) == good
    with_dns = certificate("", root, ca=False, sans=[x509.UniformResourceIdentifier(URI), x509.DNSName("frontend")],
                           usages=both)[1]
    with pytest.raises(pki.IssuedCertificateRejected, match=r"whose names are \[spiffe://cluster.local/ns/shop/"
                                                            r"sa/frontend, frontend\]: the role must add no other"):
        pki.check_issued(text(with_dns), URI)
    server_only = certificate("", root, ca=False, sans=[x509.UniformResourceIdentifier(URI)],
                              usages=[ExtendedKeyUsageOID.SERVER_AUTH])[1]
    with pytest.raises(pki.IssuedCertificateRejected, match="set the role's server_flag=true and client_flag=true"):
        pki.check_issued(text(server_only), URI)
    other = certificate("", root, ca=False, sans=[x509.UniformResourceIdentifier(URI + "x")])[1]
    with pytest.raises(pki.IssuedCertificateRejected, match="names are"):
        pki.check_issued(text(other), URI)


def test_role_settings_that_cannot_sign_mesh_workloads_are_named():
    good = {"require_cn": False, "allowed_uri_sans": ["spiffe://cluster.local/*"], "server_flag": True,
            "client_flag": True}
    assert pki.role_problems(good, "cluster.local", verbatim=False) == []
    assert pki.role_problems({**good, "require_cn": True, "allowed_uri_sans": ["spiffe://other.td/*"]},
                             "cluster.local", verbatim=False) == [
        "set require_cn=false (workload CSRs carry no common name, only the SPIFFE id)",
        "set allowed_uri_sans=spiffe://cluster.local/* (it allows spiffe://other.td/*)"]
    assert pki.role_problems({**good, "allowed_uri_sans": [], "allowed_uri_sans_template": True},
                             "cluster.local", verbatim=False) == []
    # sign-verbatim ignores the name settings, not the usages
    assert pki.role_problems({"require_cn": True, "client_flag": False}, "cluster.local", verbatim=True) == [
        "set server_flag=true and client_flag=true (sidecars are TLS servers and clients)"]


# -- errors: what the CSR caller and /ready are told ------------------------------------------------------

ADDR = "https://vault.example:8200"


@pytest.mark.parametrize(("error", "expected", "kind"), [
    (hvac.exceptions.VaultDown("Vault is sealed", errors=["Vault is sealed"]),
     "vault at https://vault.example:8200 is sealed: unseal it (vault operator unseal)", CAUnavailable),
    (hvac.exceptions.Forbidden("permission denied", errors=["permission denied"]),
     "vault at https://vault.example:8200 refused to sign: permission denied: HINT", PermissionDenied),
    (hvac.exceptions.InvalidRequest("x", errors=["unknown role: nope"]),
     "vault at https://vault.example:8200 refused to sign: unknown role: nope: HINT", CAUnavailable),
    (requests.exceptions.ConnectionError("HTTPSConnectionPool(host='vault.example', port=8200): Max retries exceeded "
                                         "(Caused by NewConnectionError(\"...: Failed to establish a new connection: "
                                         "[Errno 111] Connection refused\"))"),
     "vault at https://vault.example:8200 is unreachable ([Errno 111] Connection refused): start it, or check "
     "--vault-addr", CAUnavailable),
    (requests.exceptions.SSLError("... [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get "
                                  "local issuer certificate (_ssl.c:992)')))"),
     "TLS to vault at https://vault.example:8200 failed (certificate verify failed: unable to get local issuer "
     "certificate): give --vault-ca-cert the CA that issued Vault's certificate", CAUnavailable),
    (requests.exceptions.ReadTimeout("HTTPSConnectionPool(...): Read timed out. (read timeout=5.0)"),
     "vault at https://vault.example:8200 did not answer in time and cannot sign: check its load, or raise "
     "--vault-timeout", CAUnavailable),
])
def test_each_vault_failure_says_what_is_wrong_and_what_to_do(error, expected, kind):
    result = unavailable(error, ADDR, "sign", "HINT")
    assert type(result) is kind and result.reason == expected


# -- options --------------------------------------------------------------------------------------------

def parse(*args):
    options = Options()
    options.parseOptions(["--state-dir", "/tmp/x", *args])
    return options


def test_the_options_are_on_mesh_controls_command_line_with_safe_defaults():
    options = parse("--vault-addr", "https://vault:8200/", "--vault-token-file", "/run/token",
                    "--vault-timeout", "2.5", "--vault-sign-verbatim", "yes")
    settings = VaultSettings.from_options(options.get)
    assert (settings.addr, settings.auth, settings.sign_path, settings.timeout, settings.concurrency) == (
        "https://vault:8200", "token", "pki/sign-verbatim/txmesh", 2.5, 8)
    assert settings.issuer == "vault https://vault:8200 pki/sign-verbatim/txmesh"
    defaults = VaultSettings.from_options(parse("--vault-addr", "http://127.0.0.1:8200", "--vault-auth", "kubernetes",
                                                "--vault-kubernetes-role", "mesh").get)
    assert (defaults.sign_path, defaults.auth_mount, defaults.jwt_file, defaults.ca_cert) == (
        "pki/sign/txmesh", "kubernetes", "/var/run/secrets/kubernetes.io/serviceaccount/token", None)


@pytest.mark.parametrize(("args", "message"), [
    ((), "--ca vault needs --vault-addr URL, e.g. --vault-addr https://vault.example:8200"),
    (("--vault-addr", "vault:8200"), "--vault-addr 'vault:8200' is not an http:// or https:// URL"),
    (("--vault-addr", "http://v:8200"), "--vault-auth token needs --vault-token-file"),
    (("--vault-addr", "http://v:8200", "--vault-auth", "approle"),
     "--vault-auth approle needs --vault-approle-role-id and --vault-approle-secret-id-file"),
    (("--vault-addr", "http://v:8200", "--vault-token-file", "t", "--vault-ca-cert", "ca.pem"),
     "--vault-ca-cert verifies Vault's TLS certificate: give an https:// --vault-addr"),
    (("--vault-addr", "http://v:8200", "--vault-token-file", "t", "--vault-pki-role", ""),
     "--vault-pki-role is empty: name the PKI role that signs (pki/sign/ROLE), or sign with --vault-sign-verbatim yes"),
])
def test_missing_or_inconsistent_options_are_named(args, message):
    with pytest.raises(SettingsError) as error:
        VaultSettings.from_options(parse(*args).get)
    assert str(error.value) == message


@pytest.mark.parametrize(("args", "complaint"), [
    (("--vault-auth", "ldap"), "'ldap': give one of token, approle, kubernetes"),
    (("--vault-timeout", "0"), "'0': give a number of seconds between 0 and 3600"),
    (("--vault-sign-verbatim", "maybe"), "'maybe': give yes or no"),
    (("--vault-concurrency", "100"), "'100': give a number of calls from 1 to 64"),
])
def test_a_bad_value_is_a_usage_error(args, complaint):
    from twisted.python import usage

    with pytest.raises(usage.UsageError, match=complaint):
        parse(*args)


def test_with_another_ca_it_reports_itself_unselected_and_signs_nothing():
    plugin = VaultPlugin()
    pm = make_plugin_manager([name for name, _ in DEFAULT_PLUGINS], load_entry_points=False)
    pm.register(plugin, name="vault")
    pm.configure(Config("control", {"ca": "builtin", "vault-addr": "http://127.0.0.1:1"}, Clock(), None, pm))
    assert plugin.mesh_ca_status() == CAStatus("vault", False, False, "not selected: run mesh-control with --ca vault",
                                                b"", "")
    assert plugin.mesh_sign_csr(csr=None, identity=URI, ttl=60) is None


def test_a_sidecar_leaves_it_idle():
    plugin = VaultPlugin()
    pm = make_plugin_manager([name for name, _ in DEFAULT_PLUGINS], load_entry_points=False)
    pm.register(plugin, name="vault")
    pm.configure(Config("proxy", {}, Clock(), None, pm))
    assert pm.idle == {"vault": (plugin, "control plane only")}


def test_bad_options_with_ca_vault_exit_with_one_line(capsys):
    plugin = VaultPlugin()
    pm = make_plugin_manager([name for name, _ in DEFAULT_PLUGINS], load_entry_points=False)
    pm.register(plugin, name="vault")
    with pytest.raises(SystemExit):
        pm.configure(Config("control", {"ca": "vault", "vault-auth": "token"}, Clock(), None, pm))
    assert capsys.readouterr().err == ("mesh-control: --ca vault needs --vault-addr URL, e.g. --vault-addr "
                                       "https://vault.example:8200\n")


def test_it_imports_only_the_plugin_api_of_txmesh():
    for source in PACKAGE.glob("*.py"):
        tree = ast.parse(source.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert {name for name in imported if name == "mesh" or name.startswith("mesh.")} <= {"mesh.api"}, source
