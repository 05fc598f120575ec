"""Shared helpers of the identity integration tests (tests/integration/test_identity_*.py); no tests here.

- :func:`mesh_endpoint`: a ServiceEntry endpoint that sidecars reach over mTLS (Istio's tlsMode label)
- :func:`issue_cert`: a client certificate made by hand (any validity, any issuer), e.g. an expired one
  signed with the mesh CA key read from the control plane's state directory
- :func:`s_client`: the real ``openssl s_client`` against a port, sending one HTTP request
- :func:`xfcc`: parse ``x-forwarded-client-cert``
- :func:`assert_no_secrets_in_logs`: no private key, no join token in any process log
- :func:`h2load`: run h2load and parse its summary
"""

from __future__ import annotations

import datetime
import hashlib
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TLS_MODE_ISTIO = {"security.istio.io/tlsMode": "istio"}
SECURITY = "security.istio.io/v1"


def spiffe(namespace: str, service_account: str, trust_domain: str = "cluster.local") -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def mesh_endpoint(port: int, service_account: str, address: str = "127.0.0.1", **labels) -> dict:
    """A ServiceEntry endpoint in the mesh: its sidecar's inbound port, mTLS, the expected service account."""
    return {"address": address, "ports": {"http": port}, "labels": {**TLS_MODE_ISTIO, **labels},
            "serviceAccount": service_account}


def peer_authentication(name: str, namespace: str, mode: str, *, selector: dict | None = None,
                        port_level: dict | None = None) -> dict:
    spec: dict = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if port_level:
        spec["portLevelMtls"] = {port: {"mode": port_mode} for port, port_mode in port_level.items()}
    return {"apiVersion": SECURITY, "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def authorization_policy(name: str, namespace: str, *, selector: dict | None = None, action: str = "ALLOW",
                         rules=None) -> dict:
    spec: dict = {"action": action}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    if rules is not None:
        spec["rules"] = list(rules)
    return {"apiVersion": SECURITY, "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


# -- certificates made by hand ------------------------------------------------------------------

def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def mesh_ca(state_dir: Path):
    """``(key, cert)`` of the control plane's CA, read from its state directory (as only a test may)."""
    key = serialization.load_pem_private_key((Path(state_dir) / "ca-key.pem").read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate((Path(state_dir) / "ca-cert.pem").read_bytes())
    return key, cert


def make_ca(common_name: str):
    """A throwaway self-signed CA ``(key, cert)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _utcnow()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue_cert(directory: Path, name: str, issuer, uri: str, *, not_before=None, not_after=None) -> tuple[Path, Path]:
    """A workload-style certificate for ``uri`` signed by ``issuer`` = ``(key, cert)``.

    Writes ``<name>.pem`` and ``<name>-key.pem`` in ``directory``; returns their paths. Validity defaults
    to one hour either side of now.
    """
    issuer_key, issuer_cert = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    now = _utcnow()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")]))
            .issuer_name(issuer_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(hours=1))
            .not_valid_after(not_after or now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .sign(issuer_key, hashes.SHA256()))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def static_identity_args(cert: Path, key: Path, bundle: Path, account: str, outbound: str = "127.0.0.1",
                         tcp_ports=()) -> list:
    """The ``mesh-proxy`` options of a sidecar with a static workload certificate of service account ``account``
    (``--cert``/``--key``/``--ca-bundle``), its outbound address and explicit TCP listeners (``tcp_ports``)."""
    args = ["--cert", cert, "--key", key, "--ca-bundle", bundle, "--service-account", account,
            "--outbound-address", outbound]
    for port in tcp_ports:
        args += ["--outbound-tcp-port", port]
    return args


def cert_sha256(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# -- openssl s_client ------------------------------------------------------------------------------

@dataclass
class SClient:
    """One ``openssl s_client -brief`` run: its exit code, the bytes the server sent, and its diagnostics."""

    argv: list
    exit_code: int
    received: bytes
    diagnostics: str

    @property
    def established(self) -> bool:
        """s_client finished its side of the handshake (in TLS 1.3 the server may still refuse after this)."""
        return "CONNECTION ESTABLISHED" in self.diagnostics

    @property
    def http_response(self) -> bool:
        return re.search(rb"HTTP/1\.[01] \d{3} ", self.received) is not None

    @property
    def protocol(self) -> str | None:
        match = re.search(r"Protocol version: (\S+)", self.diagnostics)
        return match.group(1) if match else None

    def alert(self) -> str | None:
        """The TLS alert received from the server ("certificate required", ...), or None."""
        match = re.search(r"alert ([a-z ]+?):[^\n]*SSL alert number \d+", self.diagnostics)
        return match.group(1) if match else None

    def __str__(self) -> str:
        return (f"$ {' '.join(self.argv)}\nexit {self.exit_code}\n--- diagnostics ---\n{self.diagnostics}\n"
                f"--- received ---\n{self.received[:800]!r}")


def s_client(port: int, *, cafile: Path | None = None, cert: Path | None = None, key: Path | None = None,
             host: str = "127.0.0.1", args=(), path: str = "/", brief: bool = True, timeout: float = 15.0) -> SClient:
    """``openssl s_client`` to ``host:port`` that sends one ``GET path`` (Connection: close) after the
    handshake and reads until the server closes (``-ign_eof``).

    ``brief=False`` drops ``-brief``: s_client then also prints the session (ALPN, ...) to stdout, before
    what the server sent."""
    argv = ["openssl", "s_client", "-connect", f"{host}:{port}", "-ign_eof", *(["-brief"] if brief else [])]
    if cafile:
        argv += ["-CAfile", str(cafile)]
    if cert:
        argv += ["-cert", str(cert), "-key", str(key)]
    argv += [str(arg) for arg in args]
    request = f"GET {path} HTTP/1.1\r\nHost: inbound\r\nConnection: close\r\n\r\n".encode()
    proc = subprocess.run(argv, input=request, capture_output=True, timeout=timeout)
    return SClient(argv, proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))


# -- x-forwarded-client-cert --------------------------------------------------------------------------

def xfcc(value: str) -> dict:
    """``By=a;Hash=b;Subject="";URI=c`` -> ``{"By": "a", "Hash": "b", "Subject": '""', "URI": "c"}``."""
    return dict(part.split("=", 1) for part in value.split(";"))


# -- secrets in logs -------------------------------------------------------------------------------

def assert_no_secrets_in_logs(processes, tokens=(), key_files=()) -> int:
    """No process log holds a PEM private key, a join token (or its signature alone), or any base64 line
    of the given key files. Returns the number of log bytes checked."""
    needles = {"PRIVATE KEY": "a PEM private key"}
    for token in tokens:
        needles[token] = "a join token"
        needles[token.rpartition(".")[2]] = "a join token's signature"
    for path in key_files:
        for line in Path(path).read_text().splitlines():
            if line and not line.startswith("-----") and len(line) >= 32:
                needles[line] = f"a line of {path}"
    checked = 0
    for process in processes:
        text = process.log_path.read_text(errors="replace")
        checked += len(text)
        for needle, what in needles.items():
            assert needle not in text, f"{what} appears in the log of {process}: {process.log_path}"
    return checked


# -- h2load ---------------------------------------------------------------------------------------------

@dataclass
class H2LoadResult:
    total: int
    started: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status: dict  # {"2xx": n, "3xx": n, "4xx": n, "5xx": n}
    output: str


def parse_h2load(output: str) -> H2LoadResult:
    """The ``requests:`` and ``status codes:`` lines of h2load's summary."""
    requests = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                         r"(\d+) errored, (\d+) timeout", output)
    statuses = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    assert requests and statuses, f"h2load output not understood:\n{output}"
    return H2LoadResult(*map(int, requests.groups()),
                        status=dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, statuses.groups()))),
                        output=output)


def h2load(url: str, *, args=(), timeout: float = 120.0) -> H2LoadResult:
    """Run ``h2load args url`` to the end and parse its summary."""
    proc = subprocess.run(["h2load", *map(str, args), url], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return parse_h2load(proc.stdout + proc.stderr)


def mtls_pair(control, backend_factory, proxy_factory, config_root: Path, namespace: str, *, token_ttl="1h",
              cert_ttl=None):
    """An app behind a server sidecar (user-service) and a client sidecar (frontend), both getting their
    certificates (of ``cert_ttl``, else the control plane's default) from ``control``; upstream connections
    carry at most 10 requests, so new mTLS handshakes keep happening.  Returns ``(app, server, client)``."""
    from tests.harness import free_port
    from tests.integration.test_proxy_support import destination_rule, service_entry, write_config

    app = backend_factory("user-service")
    inbound = free_port()
    config = write_config(
        config_root,
        service_entry("user-service", [mesh_endpoint(inbound, "user-service")], namespace=namespace),
        destination_rule("user-service", "user-service", namespace=namespace,
                         traffic_policy={"connectionPool": {"http": {"maxRequestsPerConnection": 10}}}),
    )
    server = proxy_factory(config, "user-service", namespace=namespace, app_port=app.port, inbound_port=inbound,
                           extra_args=control.proxy_args(namespace, "user-service", token_ttl=token_ttl,
                                                         cert_ttl=cert_ttl))
    client = proxy_factory(config, "frontend", namespace=namespace,
                           extra_args=control.proxy_args(namespace, "frontend", token_ttl=token_ttl,
                                                         cert_ttl=cert_ttl))
    return app, server, client

