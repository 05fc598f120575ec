"""TLS origination (DestinationRule tls SIMPLE/MUTUAL): validation, compilation, the name check, the contexts."""

import datetime
import ipaddress
import textwrap

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.config.compile import Workload, compile_proxy_config
from mesh.config.resources import ClientTLS
from mesh.proxy.tls_origination import OriginationContexts, _carries
from tests.harness.config_yaml import validate_yaml

_ENTRY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: shop}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {number: 80, name: http, protocol: HTTP, targetPort: 443}
  - {number: 8080, name: http-alt, protocol: HTTP}
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
---
"""


def _validate(tmp_path, text):
    objects, errors, _ = validate_yaml(tmp_path, text)
    return objects, [str(error).split(": ", 2)[2] for error in errors]


def _destination_rule(spec: str, entry: str = _ENTRY) -> str:
    """``entry`` and the DestinationRule ext for api.example.com whose spec, after ``host``, is ``spec``."""
    head = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ext, namespace: shop}\n"
    return entry + head + "spec:\n  host: api.example.com\n" + textwrap.indent(textwrap.dedent(spec).strip(), "  ")


def _rule(tls: str) -> str:
    return _destination_rule(f"trafficPolicy:\n  tls: {tls}")


@pytest.mark.parametrize("tls, errors", [
    ("{mode: SIMPLE, credentialName: api-secret}",
     ["spec.trafficPolicy.tls.credentialName: 'credentialName' is not supported by txmesh; txmesh reads "
      "origination certificates from files on the sidecar's host, not from a Kubernetes Secret; set "
      "clientCertificate, privateKey and caCertificates (paths to PEM files) instead"]),
    ("{mode: MUTUAL}",
     ["spec.trafficPolicy.tls.clientCertificate: 'clientCertificate' is required with mode MUTUAL: the path of "
      "the PEM file of the client certificate that the sidecar presents to the server",
      "spec.trafficPolicy.tls.privateKey: 'privateKey' is required with mode MUTUAL: the path of the PEM file of "
      "the client certificate's key that the sidecar presents to the server"]),
    ("{mode: SIMPLE, privateKey: /k.pem}",
     ["spec.trafficPolicy.tls.privateKey: 'privateKey' is presented only with mode MUTUAL; set mode: MUTUAL, "
      "or remove it"]),
    ("{mode: ISTIO_MUTUAL, sni: api.example.com}",
     ["spec.trafficPolicy.tls.sni: 'sni' is used only to originate TLS (mode SIMPLE or MUTUAL), not with mode "
      "ISTIO_MUTUAL; remove it, or set mode: SIMPLE"]),
    ("{mode: SIMPLE, insecureSkipVerify: true, caCertificates: /ca.pem}",
     ["spec.trafficPolicy.tls.caCertificates: 'caCertificates' cannot be set with insecureSkipVerify: true "
      "(nothing is verified); remove one of the two"]),
    ("{mode: SIMPLE, sni: 10.0.0.1}",
     ["spec.trafficPolicy.tls.sni: '10.0.0.1' is not a host name (lower-case, no IP address: RFC 6066); set the "
      "server name to send, or remove it to send the service's host"]),
    ("{mode: SIMPLE, caCrl: /crl.pem}",
     ["spec.trafficPolicy.tls.caCrl: 'caCrl' is not supported by txmesh; certificate revocation lists are not "
      "checked; remove it"]),
])
def test_tls_settings_that_cannot_work_are_errors(tmp_path, tls, errors):
    assert _validate(tmp_path, _rule(tls))[1] == errors


def test_tls_settings_are_kept(tmp_path):
    objects, errors = _validate(tmp_path, _rule(
        "{mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, caCertificates: /ca.pem, sni: s.example, "
        "subjectAltNames: [a.example, b.example]}"))
    assert errors == []
    assert objects[1].traffic_policy.tls == ClientTLS(
        "MUTUAL", client_certificate="/c.pem", private_key="/k.pem", ca_certificates="/ca.pem", sni="s.example",
        subject_alt_names=("a.example", "b.example"))
    assert objects[1].traffic_policy.tls_mode == "MUTUAL"


def _endpoint(config, name):
    [endpoint] = config.clusters[name].endpoints
    return endpoint


def test_the_sni_defaults_to_the_host_and_port_level_settings_apply_to_their_port(tmp_path):
    objects, errors = _validate(tmp_path, _destination_rule("""
        trafficPolicy:
          portLevelSettings:
          - port: {number: 80}
            tls: {mode: SIMPLE, caCertificates: /ca.pem}
        subsets:
        - name: v1
          labels: {version: v1}
          trafficPolicy:
            tls: {mode: SIMPLE, sni: other.example, insecureSkipVerify: true}
        """))
    assert errors == []
    config = compile_proxy_config(objects, Workload("app", "shop"))
    origin = _endpoint(config, "outbound|80||api.example.com")
    assert (origin.port, origin.identity) == (443, None)
    assert origin.origination == ClientTLS("SIMPLE", ca_certificates="/ca.pem", sni="api.example.com")
    assert origin.origination.names() == ("api.example.com",)
    assert _endpoint(config, "outbound|8080||api.example.com").origination is None
    subset = _endpoint(config, "outbound|8080|v1|api.example.com").origination
    assert (subset.sni, subset.names()) == ("other.example", ())
    assert origin.key != _endpoint(config, "outbound|8080||api.example.com").key


def _certificate(common_name="x", dns=(), ips=(), uris=()):
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(name) for name in dns] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    names += [x509.UniformResourceIdentifier(uri) for uri in uris]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
               .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1)))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()), key


@pytest.mark.parametrize("name, carried", [
    ("api.example.com", True),
    ("API.example.com", True),
    ("www.example.org", True),  # *.example.org covers one label
    ("a.b.example.org", False),
    ("example.org", False),
    ("10.1.2.3", True),
    ("10.1.2.4", False),
    ("spiffe://td/ns/a/sa/b", True),
    ("spiffe://td/ns/a/sa/c", False),
    ("other.example.com", False),
])
def test_a_certificate_carries_dns_names_ip_addresses_and_uris(name, carried):
    certificate, _ = _certificate(dns=("api.example.com", "*.example.org"), ips=("10.1.2.3",),
                                  uris=("spiffe://td/ns/a/sa/b",))
    assert _carries(certificate, name) is carried


def test_contexts_are_built_once_per_setting_and_bad_files_become_the_refusal(tmp_path):
    contexts = OriginationContexts()
    missing = ClientTLS("SIMPLE", ca_certificates=str(tmp_path / "nope.pem"), sni="a.example")
    refusal = contexts.get(missing).refusal()
    assert refusal.startswith(f"cannot read tls.caCertificates {tmp_path / 'nope.pem'}: No such file or directory")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    assert "are not a usable PEM CA bundle" in contexts.get(ClientTLS("SIMPLE", ca_certificates=str(garbage))).refusal()
    certificate, key = _certificate("client")
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    mutual = ClientTLS("MUTUAL", client_certificate=str(cert_path), private_key=str(key_path), sni="a.example")
    origination = contexts.get(mutual)
    assert origination.refusal() is None and origination.context is not None
    assert contexts.get(ClientTLS("MUTUAL", client_certificate=str(cert_path), private_key=str(key_path),
                                  sni="a.example")) is origination


def test_origination_on_a_tls_port_is_a_warning_once(tmp_path):
    entry = _ENTRY.replace("{number: 8080, name: http-alt, protocol: HTTP}", "{number: 8443, name: tls, protocol: TLS}")
    objects, errors = _validate(tmp_path, _destination_rule("""
        trafficPolicy:
          tls: {mode: SIMPLE}
        subsets:
        - {name: v1, labels: {version: v1}}
        """, entry))
    assert errors == []
    warnings = compile_proxy_config(objects, Workload("app", "shop")).warnings
    assert [str(warning).split(": ", 3)[3] for warning in warnings] == [  # for the service and its subset: once
        "tls.mode SIMPLE applies to port 8443 of 'api.example.com', whose protocol TLS means the app speaks TLS "
        "itself: the sidecar would wrap it in a second TLS; originate TLS on an HTTP port with targetPort (Istio's "
        "Egress TLS Origination), or use portLevelSettings so that this port has no tls"]
