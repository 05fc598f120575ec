"""plugins/txmesh-awspca: its options, the pure functions over what AWS answers, and boto3's handling of
throttling, slow issuance and refusals against a scripted AWS endpoint on loopback.

The scripted endpoint (:class:`ScriptedAws`) answers the real wire protocol (JSON 1.1, AWS error
shapes), so the real boto3 client, with its retry modes, runs against it; moto cannot throttle or keep
a certificate "in progress".  tests/integration/test_awspca_mesh.py runs the plugin in mesh-control
against moto.
"""

from __future__ import annotations

import ast
import datetime
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import botocore.session
import pytest
from botocore.validate import validate_parameters
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.task import Clock
from twisted.python import usage
from txmesh_awspca import AwsPcaPlugin, certs, pca
from txmesh_awspca.settings import PcaSettings, SettingsError, choose_signing_algorithm

from mesh.api import CAStatus, CAUnavailable, Config
from mesh.control.tap import Options
from mesh.plugins import DEFAULT_PLUGINS, make_plugin_manager
from tests.unit.test_identity_csr import build_csr

PACKAGE = Path(certs.__file__).parent
ARN = "arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/11111111-2222-3333-4444-555555555555"
URI = "spiffe://cluster.local/ns/shop/sa/frontend"
NOW = datetime.datetime.now(datetime.timezone.utc)


def parse(*args) -> Options:
    options = Options()
    options.parseOptions(["--state-dir", "/tmp/x", *args])
    return options


def settings(*args) -> PcaSettings:
    return PcaSettings.from_options(parse("--awspca-arn", ARN, *args).get)


def certificate(subject: str, issuer=None, *, key=None, sans=()):
    """``(key, cert)``: self-signed when ``issuer`` (a ``(key, cert)``) is None."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_key, issuer_name = (issuer[0], issuer[1].subject) if issuer else (key, name)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(NOW - datetime.timedelta(hours=1))
               .not_valid_after(NOW + datetime.timedelta(days=1)))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=True)
    return key, builder.sign(issuer_key, hashes.SHA256())


def text(*certificates) -> str:
    return certs.pem(certificates).decode()


# -- options ---------------------------------------------------------------------------------------------

def test_the_options_are_on_mesh_controls_command_line_with_defaults_from_the_arn():
    checked = settings("--awspca-timeout", "2.5", "--awspca-retry-mode", "adaptive")
    assert (checked.region, checked.timeout, checked.retry_mode, checked.max_attempts, checked.concurrency) == (
        "eu-west-1", 2.5, "adaptive", 4, 8)
    assert checked.template_arn == "arn:aws:acm-pca:::template/EndEntityCertificate_APIPassthrough/V1"
    assert checked.signing_algorithm is None and checked.api_passthrough
    assert checked.issuer == f"awspca {ARN}"
    gov = PcaSettings.from_options(parse("--awspca-arn", ARN.replace(":aws:", ":aws-us-gov:")).get)
    assert gov.template_arn == "arn:aws-us-gov:acm-pca:::template/EndEntityCertificate_APIPassthrough/V1"
    csr_passthrough = settings("--awspca-template-arn",
                               "arn:aws:acm-pca:::template/EndEntityCertificate_CSRPassthrough/V1")
    assert not csr_passthrough.api_passthrough


@pytest.mark.parametrize(("args", "message"), [
    ((), "--ca awspca needs --awspca-arn, the ARN of the AWS Private CA, e.g. --awspca-arn arn:aws:acm-pca:us-east-1:"
         "111122223333:certificate-authority/11111111-2222-3333-4444-555555555555"),
    (("--awspca-arn", "arn:aws:acm:us-east-1:111122223333:certificate/x"),
     "--awspca-arn 'arn:aws:acm:us-east-1:111122223333:certificate/x' is not the ARN of an AWS Private CA "
     "(arn:aws:acm-pca:REGION:ACCOUNT:certificate-authority/ID)"),
    (("--awspca-arn", ARN, "--awspca-region", "us-east-1"),
     "--awspca-region us-east-1 is not the region of --awspca-arn (eu-west-1): a CA is called in its own region; "
     "leave --awspca-region out"),
    (("--awspca-arn", ARN, "--awspca-template-arn", "arn:aws:acm-pca:::template/RootCACertificate/V1"),
     "--awspca-template-arn 'arn:aws:acm-pca:::template/RootCACertificate/V1' is not an end-entity certificate "
     "template, e.g. arn:aws:acm-pca:::template/EndEntityCertificate_APIPassthrough/V1"),
])
def test_missing_or_inconsistent_options_are_named(args, message):
    with pytest.raises(SettingsError) as error:
        PcaSettings.from_options(parse(*args).get)
    assert str(error.value) == message


@pytest.mark.parametrize(("args", "complaint"), [
    (("--awspca-signing-algorithm", "MD5WITHRSA"), "'MD5WITHRSA': give one of SHA256WITHRSA, "),
    (("--awspca-timeout", "0"), "'0': give a number of seconds between 0 and 3600"),
    (("--awspca-retry-mode", "legacy"), "'legacy': give one of standard, adaptive"),
    (("--awspca-max-attempts", "0"), "'0': give a whole number from 1 to 10"),
    (("--awspca-concurrency", "100"), "'100': give a whole number from 1 to 64"),
])
def test_a_bad_value_is_a_usage_error(args, complaint):
    with pytest.raises(usage.UsageError, match=complaint):
        parse(*args)


@pytest.mark.parametrize(("configured", "key", "ca_algorithm", "chosen"), [
    (None, "EC_prime256v1", "SHA256WITHECDSA", "SHA256WITHECDSA"),
    (None, "EC_secp384r1", "SHA384WITHECDSA", "SHA384WITHECDSA"),
    (None, "RSA_2048", "SHA512WITHRSA", "SHA512WITHRSA"),
    (None, "RSA_4096", None, "SHA256WITHRSA"),
    ("SHA384WITHECDSA", "EC_prime256v1", "SHA256WITHECDSA", "SHA384WITHECDSA"),
])
def test_the_signing_algorithm_matches_the_ca_key(configured, key, ca_algorithm, chosen):
    assert choose_signing_algorithm(configured, key, ca_algorithm) == chosen


def test_a_signing_algorithm_the_ca_key_cannot_use_is_named():
    with pytest.raises(SettingsError, match=r"^--awspca-signing-algorithm SHA256WITHRSA cannot sign with the CA's "
                                            r"EC_prime256v1 key: give one of SHA256WITHECDSA, "):
        choose_signing_algorithm("SHA256WITHRSA", "EC_prime256v1", "SHA256WITHECDSA")
    with pytest.raises(SettingsError, match="the CA's key is ML_DSA_44, which txmesh cannot sign workloads with"):
        choose_signing_algorithm(None, "ML_DSA_44", "ML_DSA_44")


# -- what is asked of AWS --------------------------------------------------------------------------------------

def test_issue_certificate_asks_for_the_spiffe_id_and_the_ttl_in_a_request_aws_accepts():
    csr = build_csr(sans=(URI,))
    request = pca.issue_request(settings(), csr, URI, 3600, "SHA256WITHECDSA", now=1_000.25, token="t-1")
    assert request["ApiPassthrough"] == {"Extensions": {"SubjectAlternativeNames": [
        {"UniformResourceIdentifier": URI}]}}
    assert request["Validity"] == {"Type": "ABSOLUTE", "Value": 4601}
    assert (request["SigningAlgorithm"], request["IdempotencyToken"], request["Csr"]) == ("SHA256WITHECDSA", "t-1", csr)
    model = botocore.session.get_session().get_service_model("acm-pca")
    validate_parameters(request, model.operation_model("IssueCertificate").input_shape)  # raises if AWS would refuse
    copied = pca.issue_request(settings("--awspca-template-arn", "arn:aws:acm-pca:::template/EndEntityCertificate/V1"),
                               csr, URI, 60, "SHA256WITHECDSA", now=0, token="t-2")
    assert "ApiPassthrough" not in copied  # a template without API passthrough copies the SAN from the CSR


def test_get_certificate_is_polled_with_growing_jittered_delays():
    delays = pca.poll_delays(rng=lambda: 1.0)
    assert [round(next(delays), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert round(next(pca.poll_delays(rng=lambda: 0.0)), 3) == 0.05


# -- what AWS answers ---------------------------------------------------------------------------------------------

def test_a_root_ca_is_its_own_root_and_a_subordinate_s_chain_ends_with_one():
    root = certificate("root")
    subordinate = certificate("subordinate", root)
    assert certs.roots_of(text(root[1]), None) == certs.pem([root[1]])
    assert certs.roots_of(text(subordinate[1]), text(root[1])) == certs.pem([root[1]])
    with pytest.raises(ValueError, match="its certificate chain holds no root"):
        certs.roots_of(text(subordinate[1]), None)
    assert certs.chain_without_roots(text(subordinate[1], root[1])) == certs.pem([subordinate[1]])
    assert certs.chain_without_roots(None) == b""


def test_a_certificate_naming_itself_as_issuer_but_signed_by_another_key_is_no_root():
    impostor_key, _ = certificate("root")
    _, forged = certificate("root", (impostor_key, certificate("root")[1]))
    assert not certs.is_root(forged)


def test_an_issued_certificate_must_name_only_the_spiffe_id_for_the_csr_s_key():
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_pem_x509_csr(build_csr(key, sans=(URI,)))
    root = certificate("root")
    good = certificate("leaf", root, key=key, sans=[x509.UniformResourceIdentifier(URI)])[1]
    assert certs.check_issued(text(good), URI, csr) == certs.pem([good])
    for sans, complaint in (((), r"names \[none\], not only"),
                            ((x509.UniformResourceIdentifier(URI), x509.DNSName("frontend")),
                             rf"names \[{URI}, frontend\], not only")):
        wrong = certificate("leaf", root, key=key, sans=sans)[1]
        with pytest.raises(certs.IssuedCertificateRejected, match=complaint):
            certs.check_issued(text(wrong), URI, csr)
    other_key = certificate("leaf", root, sans=[x509.UniformResourceIdentifier(URI)])[1]
    with pytest.raises(certs.IssuedCertificateRejected, match="not for the CSR's key"):
        certs.check_issued(text(other_key), URI, csr)


# -- boto3 against a scripted AWS endpoint on loopback ----------------------------------------------------------------

class Cut(NamedTuple):
    """A 200 answer of ``body`` whose connection drops after its headers and ``keep`` bytes of the body."""

    body: dict
    keep: int


class ScriptedAws:
    """An HTTP server on loopback that speaks ACM PCA's wire protocol (JSON 1.1) from a script.

    ``script[operation]`` is a list of answers used in turn (the last one repeats): a dict is a 200 JSON
    body, a string the code of an AWS error (HTTP 400, ``{"__type": code}``), a :class:`Cut` a 200 whose
    connection drops partway.  ``calls`` lists the operations received, in order.
    """

    def __init__(self, script: dict):
        self.script = {operation: list(answers) for operation, answers in script.items()}
        self.calls: list[str] = []
        aws = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                operation = self.headers["X-Amz-Target"].partition(".")[2]
                aws.calls.append(operation)
                answers = aws.script[operation]
                answer = answers.pop(0) if len(answers) > 1 else answers[0]
                cut = answer if isinstance(answer, Cut) else None
                if cut is not None:
                    answer = cut.body
                status, body = (200, answer) if isinstance(answer, dict) else (400, {"__type": answer, "message": "no"})
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if cut is not None:
                    data = data[:cut.keep]
                    self.close_connection = True
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


ACTIVE_CA = {"CertificateAuthority": {"Arn": ARN, "Status": "ACTIVE", "CertificateAuthorityConfiguration": {
    "KeyAlgorithm": "EC_prime256v1", "SigningAlgorithm": "SHA256WITHECDSA", "Subject": {"CommonName": "root"}}}}


@pytest.fixture
def aws_env(monkeypatch):
    """boto3 finds dummy credentials in the environment, and nothing of the host's AWS configuration."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_SESSION_TOKEN", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


@pytest.fixture
def scripted(aws_env):
    """``scripted(script, *options)`` -> ``(ScriptedAws, PcaClient)``, the client's endpoint the server."""
    servers = []

    def start(script, *args):
        aws = ScriptedAws(script)
        servers.append(aws)
        aws_env.setenv("AWS_ENDPOINT_URL", aws.url)
        return aws, pca.PcaClient(settings(*args))

    yield start
    for aws in servers:
        aws.close()


def test_throttling_is_retried_with_jittered_backoff_until_it_passes(scripted):
    root = certificate("root")[1]
    aws, client = scripted({"DescribeCertificateAuthority": ["ThrottlingException", "ThrottlingException", ACTIVE_CA],
                            "GetCertificateAuthorityCertificate": [{"Certificate": text(root)}]})
    check = client.check()
    assert (check.state, check.signing_algorithm, check.roots_pem, check.problems) == (
        "ACTIVE", "SHA256WITHECDSA", certs.pem([root]), [])
    assert aws.calls == ["DescribeCertificateAuthority"] * 3 + ["GetCertificateAuthorityCertificate"]


@pytest.mark.parametrize("mode", ["standard", "adaptive"])
def test_throttling_beyond_the_attempts_is_ca_unavailable_with_a_jittered_retry_after(scripted, mode):
    aws, client = scripted({"DescribeCertificateAuthority": ["ThrottlingException"]},
                           "--awspca-max-attempts", "2", "--awspca-retry-mode", mode)
    with pytest.raises(CAUnavailable) as error:
        client.check()
    assert error.value.reason == (f"AWS Private CA {ARN} throttled DescribeCertificateAuthority "
                                  "(ThrottlingException: no) "
                                  f"after 2 attempts with backoff ({mode} retry mode): lower the CSR rate or ask AWS "
                                  "for a higher quota")
    assert 2.0 <= error.value.retry_after <= 8.0
    assert aws.calls == ["DescribeCertificateAuthority"] * 2


def test_a_certificate_in_progress_is_polled_until_issued(scripted):
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = certificate("leaf", certificate("root"), key=key, sans=[x509.UniformResourceIdentifier(URI)])[1]
    in_progress = ["RequestInProgressException"] * 3
    aws, client = scripted({"IssueCertificate": [{"CertificateArn": f"{ARN}/certificate/1"}],
                            "GetCertificate": [*in_progress, {"Certificate": text(leaf), "CertificateChain": ""}]})
    started = time.monotonic()
    issued = client.issue(build_csr(key, sans=(URI,)), URI, 600, "SHA256WITHECDSA", time.monotonic() + 5)
    assert issued == (text(leaf), "")
    assert aws.calls == ["IssueCertificate"] + ["GetCertificate"] * 4
    assert time.monotonic() - started >= 0.05 + 0.1 + 0.2  # the least the three jittered delays add up to


def test_a_certificate_still_in_progress_at_the_deadline_is_ca_unavailable(scripted):
    aws, client = scripted({"IssueCertificate": [{"CertificateArn": f"{ARN}/certificate/1"}],
                            "GetCertificate": ["RequestInProgressException"]}, "--awspca-timeout", "1")
    with pytest.raises(CAUnavailable, match=rf"^AWS Private CA {ARN} had not issued {ARN}/certificate/1 after 1s "):
        client.issue(build_csr(sans=(URI,)), URI, 600, "SHA256WITHECDSA", time.monotonic() + 0.5)
    # polled with backoff until the deadline: never a busy loop; how many polls fit in 0.5 s depends on
    # how loaded the machine is (a loaded CI worker may get only one in), so only the bound is exact
    assert 1 <= aws.calls.count("GetCertificate") <= 6


@pytest.mark.parametrize(("code", "reason", "retry_after"), [
    ("AccessDeniedException", f"AWS denied acm-pca:DescribeCertificateAuthority on {ARN} to mesh-control's credentials "
                              "(AccessDeniedException: no): grant it (docs/identity.md lists the IAM permissions)", 30),
    ("ResourceNotFoundException", f"there is no AWS Private CA {ARN} in eu-west-1 (DescribeCertificateAuthority: no): "
                                  "check --awspca-arn", 30),
    ("InvalidArnException", f"AWS Private CA {ARN} refused DescribeCertificateAuthority (InvalidArnException: no)", 5),
])
def test_each_refusal_says_what_is_wrong_and_what_to_do(scripted, code, reason, retry_after):
    _, client = scripted({"DescribeCertificateAuthority": [code]})
    with pytest.raises(CAUnavailable) as error:
        client.check()
    assert (error.value.reason, error.value.retry_after) == (reason, retry_after)


def test_a_ca_that_is_not_active_is_a_problem_and_its_certificate_is_not_asked_for(scripted):
    disabled = json.loads(json.dumps(ACTIVE_CA))
    disabled["CertificateAuthority"]["Status"] = "DISABLED"
    aws, client = scripted({"DescribeCertificateAuthority": [disabled]}, "--awspca-signing-algorithm", "SHA256WITHRSA")
    check = client.check()
    assert check.problems == [
        f"AWS Private CA {ARN} is DISABLED: enable it (aws acm-pca update-certificate-authority --status ACTIVE)",
        "--awspca-signing-algorithm SHA256WITHRSA cannot sign with the CA's EC_prime256v1 key: give one of "
        "SHA256WITHECDSA, SHA384WITHECDSA, SHA512WITHECDSA, or leave it out (the CA's own algorithm)"]
    assert aws.calls == ["DescribeCertificateAuthority"]


@pytest.mark.parametrize("keep", [0, 20])  # no body at all; its first bytes
@pytest.mark.parametrize(("operation", "field"), [
    ("DescribeCertificateAuthority", "CertificateAuthority"), ("GetCertificateAuthorityCertificate", "Certificate"),
    ("IssueCertificate", "CertificateArn"), ("GetCertificate", "Certificate")])
def test_an_answer_cut_short_is_ca_unavailable(scripted, operation, field, keep):
    """The connection drops after AWS's headers (a partition, a proxy or AWS going away mid-answer): botocore
    parses what came, since it does not hold a body to its Content-Length, and the answer lacks its fields."""
    key = ec.generate_private_key(ec.SECP256R1())
    root = certificate("root")
    leaf = certificate("leaf", root, key=key, sans=[x509.UniformResourceIdentifier(URI)])[1]
    answers = {"DescribeCertificateAuthority": ACTIVE_CA,
               "GetCertificateAuthorityCertificate": {"Certificate": text(root[1])},
               "IssueCertificate": {"CertificateArn": f"{ARN}/certificate/1"},
               "GetCertificate": {"Certificate": text(leaf), "CertificateChain": ""}}
    answers[operation] = Cut(answers[operation], keep)
    aws, client = scripted({name: [answer] for name, answer in answers.items()})
    with pytest.raises(CAUnavailable) as error:
        if operation in ("IssueCertificate", "GetCertificate"):
            client.issue(build_csr(key, sans=(URI,)), URI, 600, "SHA256WITHECDSA", time.monotonic() + 5)
        else:
            client.check()
    assert (error.value.reason, error.value.retry_after) == (
        f"AWS Private CA {ARN} at {aws.url} answered {operation} without its {field} (an answer cut short on the "
        "way, or not from AWS): check the network path to AWS (or the VPC endpoint)", 5.0)
    assert aws.calls[-1] == operation


def test_an_unreachable_endpoint_and_missing_credentials_are_named(aws_env):
    aws = ScriptedAws({})
    aws.close()  # nothing listens there any more
    aws_env.setenv("AWS_ENDPOINT_URL", aws.url)
    unreachable = (rf"^cannot reach AWS Private CA {ARN} at {aws.url} for DescribeCertificateAuthority "
                   r"\(EndpointConnectionError, after 4 attempts\)")
    with pytest.raises(CAUnavailable, match=unreachable):
        pca.PcaClient(settings()).check()
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    aws_env.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(CAUnavailable, match=r"^no usable AWS credentials for DescribeCertificateAuthority "
                                            r"\(NoCredentialsError\): give mesh-control credentials"):
        pca.PcaClient(settings()).check()


# -- the plugin in mesh-control and in sidecars ------------------------------------------------------------------------

def manager(plugin):
    pm = make_plugin_manager([name for name, _ in DEFAULT_PLUGINS], load_entry_points=False)
    pm.register(plugin, name="awspca")
    return pm


def test_with_another_ca_it_reports_itself_unselected_and_signs_nothing():
    plugin = AwsPcaPlugin()
    pm = manager(plugin)
    pm.configure(Config("control", {"ca": "builtin", "awspca-arn": ARN}, Clock(), None, pm))
    assert plugin.mesh_ca_status() == CAStatus("awspca", False, False,
                                                "not selected: run mesh-control with --ca awspca", b"", "")
    assert plugin.mesh_sign_csr(csr=None, identity=URI, ttl=60) is None


def test_a_sidecar_leaves_it_idle():
    plugin = AwsPcaPlugin()
    pm = manager(plugin)
    pm.configure(Config("proxy", {}, Clock(), None, pm))
    assert pm.idle == {"awspca": (plugin, "control plane only")}


def test_bad_options_with_ca_awspca_exit_with_one_line(capsys):
    plugin = AwsPcaPlugin()
    pm = manager(plugin)
    with pytest.raises(SystemExit):
        pm.configure(Config("control", {"ca": "awspca", "awspca-arn": "my-ca"}, Clock(), None, pm))
    assert capsys.readouterr().err == ("mesh-control: --awspca-arn 'my-ca' is not the ARN of an AWS Private CA "
                                       "(arn:aws:acm-pca:REGION:ACCOUNT:certificate-authority/ID)\n")


def test_it_imports_only_the_plugin_api_of_txmesh_and_no_boto3_until_selected():
    for source in PACKAGE.glob("*.py"):
        tree = ast.parse(source.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert {name for name in imported if name == "mesh" or name.startswith("mesh.")} <= {"mesh.api"}, source
    loaded = subprocess.run([sys.executable, "-c", "import sys, txmesh_awspca; print(sorted(sys.modules))"],
                            capture_output=True, text=True, check=True).stdout
    assert "boto3" not in loaded and "botocore" not in loaded
