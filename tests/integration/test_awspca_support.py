"""Shared helpers of the AWS Private CA tests (tests/integration/test_awspca_*.py) and of
bench/ca_backend_awspca.py; no tests here.

- :class:`MotoServer`: moto's emulator of AWS APIs in server mode (``moto_server``, from ``moto[server]``) on
  a free loopback port, recording every request it gets (moto's recorder) so a test can read what
  mesh-control sent;
- :func:`pca_client`: an operator's boto3 client of the emulator;
- :func:`create_root_ca`: what docs/identity.md tells an operator to create in AWS Private CA: a root CA,
  its certificate issued from its own CSR (the RootCACertificate template) and installed, so it is ACTIVE;
- :func:`aws_env`, :func:`awspca_args`: mesh-control's environment (moto's endpoint, dummy credentials for
  boto3's chain) and its ``--ca awspca`` arguments.

moto is an emulator: docs/identity.md lists what it does not check (the SAN from ApiPassthrough, the
signing algorithm, the validity, the CA's state when issuing, ...).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import boto3

from tests.harness.net import free_port, http_request
from tests.harness.processes import ManagedProcess, venv_bin

REGION = "us-east-1"
#: The template that issues a root CA's own certificate from its CSR.
ROOT_TEMPLATE = "arn:aws:acm-pca:::template/RootCACertificate/V1"
#: Dummy credentials: boto3 finds them in the environment (the first link of its chain); moto checks none.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY": "txmesh-test-not-a-secret"}


class MotoServer(ManagedProcess):
    """``moto_server -H 127.0.0.1 -p PORT``: AWS APIs, ACM PCA among them, emulated in memory.

    Every request it serves is appended to :attr:`recording` (JSON lines: moto's recorder,
    ``MOTO_ENABLE_RECORDING``); :meth:`requests` reads them back.  Stopping it loses its state: a test
    that stops it starts a new one (:meth:`restart` keeps the port, so clients find it again).
    """

    kind = "moto"
    ready_timeout = 30.0

    def __init__(self, log_dir: Path, port: int | None = None):
        self.port = port or free_port("127.0.0.1")
        log_dir = Path(log_dir)
        self.recording = log_dir / f"moto-{self.port}-requests.jsonl"
        super().__init__("moto_server", [venv_bin("moto_server"), "-H", "127.0.0.1", "-p", self.port],
                         log_dir / f"moto-{self.port}.log",
                         env={"MOTO_ENABLE_RECORDING": "1", "MOTO_RECORDER_FILEPATH": str(self.recording)})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def is_ready(self) -> bool:
        return http_request("127.0.0.1", self.port, "/moto-api/data.json")[0] == 200

    def client(self):
        """A boto3 ACM PCA client of this server (as the operator's ``aws acm-pca``)."""
        return pca_client(self.url)

    def requests(self, operation: str | None = None) -> list[dict]:
        """The JSON bodies of the ACM PCA requests recorded so far (``operation``: only those, e.g.
        ``IssueCertificate``); each has the ``Operation`` it was and the ``UserAgent`` that sent it."""
        found = []
        if not self.recording.exists():
            return found
        for line in self.recording.read_text().splitlines():
            entry = json.loads(line)
            target = entry["headers"].get("X-Amz-Target", "")
            if not target.startswith("ACMPrivateCA.") or (operation and target != f"ACMPrivateCA.{operation}"):
                continue
            body = base64.b64decode(entry["body"]) if entry["body_encoded"] else entry["body"]
            found.append({**json.loads(body), "Operation": target.partition(".")[2],
                          "UserAgent": entry["headers"].get("User-Agent", "")})
        return found


def pca_client(endpoint_url: str):
    """A boto3 ACM PCA client of the emulator at ``endpoint_url``, with the dummy credentials."""
    return boto3.client("acm-pca", region_name=REGION, endpoint_url=endpoint_url,
                        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


def create_root_ca(client, common_name: str = "txmesh test root") -> str:
    """An ACTIVE root CA in AWS Private CA, as docs/identity.md creates it; returns its ARN.

    CreateCertificateAuthority (ROOT, short-lived certificate mode), then its certificate: its own CSR
    (GetCertificateAuthorityCsr) signed with the RootCACertificate template (IssueCertificate, then
    GetCertificate) and installed (ImportCertificateAuthorityCertificate).  moto's CA key is RSA 2048
    whatever is asked, so the CA is declared RSA_2048 / SHA256WITHRSA to match it.
    """
    arn = client.create_certificate_authority(
        CertificateAuthorityType="ROOT", UsageMode="SHORT_LIVED_CERTIFICATE",
        CertificateAuthorityConfiguration={"KeyAlgorithm": "RSA_2048", "SigningAlgorithm": "SHA256WITHRSA",
                                           "Subject": {"CommonName": common_name, "Organization": "txmesh"}},
    )["CertificateAuthorityArn"]
    csr = client.get_certificate_authority_csr(CertificateAuthorityArn=arn)["Csr"]
    issued = client.issue_certificate(CertificateAuthorityArn=arn, Csr=csr, SigningAlgorithm="SHA256WITHRSA",
                                      TemplateArn=ROOT_TEMPLATE, Validity={"Type": "YEARS", "Value": 10})
    root = client.get_certificate(CertificateAuthorityArn=arn, CertificateArn=issued["CertificateArn"])
    client.import_certificate_authority_certificate(CertificateAuthorityArn=arn,
                                                    Certificate=root["Certificate"].encode())
    return arn


def aws_env(endpoint_url: str) -> dict:
    """mesh-control's environment: ``endpoint_url`` (moto's, or a :class:`~tests.harness.cable.Cable` in front
    of it) as every AWS endpoint (``AWS_ENDPOINT_URL``) and dummy credentials, which boto3's standard chain
    finds in the environment; nothing from the host's own AWS config or instance metadata."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint_url, "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true"}


def awspca_args(arn: str, *extra) -> list[str]:
    """``twistd mesh-control`` arguments that select the AWS Private CA ``arn``."""
    return ["--ca", "awspca", "--awspca-arn", arn, *extra]
