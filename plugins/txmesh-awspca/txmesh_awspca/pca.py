"""The AWS Private CA calls, blocking: they run in the plugin's worker threads, never on the reactor.

:class:`PcaClient` wraps one boto3 ``acm-pca`` client.  Credentials come from boto3's standard chain
(environment, web identity token file / IRSA, shared config, container and instance metadata), the
endpoint from botocore's usual settings (``AWS_ENDPOINT_URL``, e.g. a VPC endpoint or an emulator).
Throttling and transient errors are retried by botocore itself, as AWS documents: ``--awspca-retry-mode``
``standard`` (exponential backoff with full jitter, a retry quota) or ``adaptive`` (plus client-side rate
limiting), ``--awspca-max-attempts`` attempts per call.

Issuing is asynchronous at AWS: IssueCertificate answers with the new certificate's ARN, and
GetCertificate fails with ``RequestInProgressException`` until it is signed; :meth:`PcaClient.issue`
polls it with jittered backoff until ``--awspca-timeout`` runs out.

:func:`unavailable` turns what boto3 raises into :class:`mesh.api.CAUnavailable` with a reason an
operator can act on (never a credential: AWS's messages name ARNs and principals, not keys).
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

import boto3
from botocore import exceptions as aws
from botocore import xform_name
from botocore.config import Config as BotoConfig

from mesh.api import CAUnavailable

from . import __version__
from .certs import roots_of
from .settings import PcaSettings, SettingsError, choose_signing_algorithm

ACTIVE = "ACTIVE"
#: What to do about a CA in each state other than ACTIVE (DescribeCertificateAuthority's Status).
STATE_ADVICE = {
    "CREATING": "is still being created: wait, then install its CA certificate",
    "PENDING_CERTIFICATE": "has no CA certificate yet: install one (docs/identity.md, 'AWS Private CA')",
    "DISABLED": "is DISABLED: enable it (aws acm-pca update-certificate-authority --status ACTIVE)",
    "EXPIRED": "has an EXPIRED CA certificate: import a renewed one (ImportCertificateAuthorityCertificate)",
    "FAILED": "FAILED to be created: create another CA and point --awspca-arn at it",
    "DELETED": "is DELETED: restore it (aws acm-pca restore-certificate-authority) or use another CA",
}
#: Error codes AWS uses for throttling (botocore's retry modes retry them first).
THROTTLING = frozenset({"Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
                        "TooManyRequestsException", "RequestLimitExceeded", "RequestThrottled", "SlowDown",
                        "LimitExceededException"})
#: Error codes that mean the caller's credentials or permissions.
DENIED = frozenset({"AccessDeniedException", "AccessDenied", "UnrecognizedClientException", "InvalidClientTokenId",
                    "InvalidSignatureException", "SignatureDoesNotMatch", "ExpiredTokenException",
                    "ExpiredToken", "InvalidIdentityToken"})
#: Retry-After (seconds) of a 503, by cause: throttling is spread with jitter (below), as AWS advises.
RETRY_AFTER_DOWN = 5.0
RETRY_AFTER_STATE = 30.0
RETRY_AFTER_THROTTLED = (2.0, 8.0)
#: GetCertificate polling while RequestInProgressException: first at once, then this, doubling, capped.
POLL_FIRST = 0.1
POLL_MAX = 1.0


class NotActive(CAUnavailable):
    """AWS refused a call because the CA is not ACTIVE (InvalidStateException): the status is out of date."""


@dataclass
class Check:
    """What one status check found: the CA's state, the algorithm to sign with, its root, what is wrong."""

    state: str = ""
    signing_algorithm: str | None = None
    roots_pem: bytes = b""
    problems: list = field(default_factory=list)


def issue_request(settings: PcaSettings, csr_pem: bytes, identity: str, ttl: float, signing_algorithm: str,
                  now: float, token: str) -> dict:
    """The parameters of IssueCertificate for one workload CSR (a pure function).

    The certificate ends ``ttl`` seconds after ``now`` (``Validity`` ``ABSOLUTE``: AWS backdates its start
    by an hour for clock skew).  With an API-passthrough template the SPIFFE id is the only SAN, named in
    the call (``ApiPassthrough``); with another end-entity template AWS copies it from the CSR, which the
    control plane has checked.  ``token`` makes botocore's retries of this call issue one certificate.
    """
    params = {
        "CertificateAuthorityArn": settings.arn,
        "Csr": csr_pem,
        "SigningAlgorithm": signing_algorithm,
        "TemplateArn": settings.template_arn,
        "Validity": {"Type": "ABSOLUTE", "Value": math.ceil(now + ttl)},
        "IdempotencyToken": token,
    }
    if settings.api_passthrough:
        san = {"UniformResourceIdentifier": identity}
        params["ApiPassthrough"] = {"Extensions": {"SubjectAlternativeNames": [san]}}
    return params


def poll_delays(rng=random.random):
    """Delays between two GetCertificate calls: ``POLL_FIRST`` doubling up to ``POLL_MAX``, each drawn
    from its upper half (jitter, so CSRs issued together do not poll together)."""
    delay = POLL_FIRST
    while True:
        yield delay * (0.5 + rng() / 2)
        delay = min(POLL_MAX, delay * 2)


def error_code(error: Exception) -> str:
    """The AWS error code of a botocore ClientError (``ThrottlingException``), else ``""``."""
    return error.response.get("Error", {}).get("Code", "") if isinstance(error, aws.ClientError) else ""


def unavailable(error: Exception, operation: str, settings: PcaSettings, endpoint: str) -> CAUnavailable:
    """What a failed AWS call means for the CSR waiting on it: a :class:`CAUnavailable` saying what to do."""
    where = f"AWS Private CA {settings.arn}"
    if isinstance(error, (aws.NoCredentialsError, aws.PartialCredentialsError, aws.CredentialRetrievalError)):
        return CAUnavailable(f"no usable AWS credentials for {operation} ({type(error).__name__}): give mesh-control "
                             "credentials through boto3's chain (AWS_* environment, a web identity token / IRSA, "
                             "an instance profile)", RETRY_AFTER_STATE)
    if isinstance(error, (aws.ConnectionError, aws.HTTPClientError)):
        return CAUnavailable(f"cannot reach {where} at {endpoint} for {operation} ({type(error).__name__}, after "
                             f"{settings.max_attempts} attempts): check the network path to AWS (or the VPC "
                             "endpoint)", RETRY_AFTER_DOWN)
    code = error_code(error)
    message = error.response.get("Error", {}).get("Message", "") if code else str(error)
    if code in THROTTLING:
        return CAUnavailable(f"{where} throttled {operation} ({code}: {message}) after {settings.max_attempts} "
                             f"attempts with backoff ({settings.retry_mode} retry mode): lower the CSR rate or ask "
                             "AWS for a higher quota", random.uniform(*RETRY_AFTER_THROTTLED))
    if code in DENIED:
        return CAUnavailable(f"AWS denied acm-pca:{operation} on {settings.arn} to mesh-control's credentials "
                             f"({code}: {message}): grant it (docs/identity.md lists the IAM permissions)",
                             RETRY_AFTER_STATE)
    if code == "ResourceNotFoundException":
        return CAUnavailable(f"there is no {where} in {settings.region} ({operation}: {message}): check "
                             "--awspca-arn", RETRY_AFTER_STATE)
    if code == "InvalidStateException":
        return NotActive(f"{where} is not ACTIVE ({operation}: {message})", RETRY_AFTER_STATE)
    if code:
        return CAUnavailable(f"{where} refused {operation} ({code}: {message})", RETRY_AFTER_DOWN)
    return CAUnavailable(f"{operation} on {where} failed ({type(error).__name__}: {error})", RETRY_AFTER_DOWN)


class PcaClient:
    """Blocking calls to one AWS Private CA, from any worker thread.

    The boto3 client is made on first use, in a worker thread too (finding credentials may ask the
    instance metadata service), once (a lock guards it); one client is then shared by every thread,
    as boto3 allows.
    """

    def __init__(self, settings: PcaSettings):
        self.settings = settings
        #: Where the calls go (``https://acm-pca.REGION.amazonaws.com``, or ``AWS_ENDPOINT_URL``'s), once known.
        self.endpoint = f"the acm-pca endpoint of {settings.region}"
        self._client = None
        self._lock = threading.Lock()

    def _aws(self):
        with self._lock:
            if self._client is None:
                settings = self.settings
                config = BotoConfig(retries={"mode": settings.retry_mode, "total_max_attempts": settings.max_attempts},
                                    connect_timeout=min(settings.timeout, 5.0), read_timeout=settings.timeout,
                                    max_pool_connections=settings.concurrency,
                                    user_agent_extra=f"txmesh-awspca/{__version__}")
                self._client = boto3.session.Session().client("acm-pca", region_name=settings.region, config=config)
                self.endpoint = self._client.meta.endpoint_url
            return self._client

    def call(self, operation: str, needs: str, pending: tuple = (), **params) -> dict | None:
        """One API call (botocore retries it): its answer, which holds ``needs``; None for an error code in
        ``pending``.

        botocore parses whatever arrived when a connection drops after the headers of a 200 (it does not hold
        the body to its Content-Length): an answer cut short by a partition, or by AWS or a proxy going away,
        is an answer without ``needs``.

        :raises CAUnavailable: for any other failure (see :func:`unavailable`), and for an answer without
            ``needs``.
        """
        try:
            answer = getattr(self._aws(), xform_name(operation))(**params)
        except aws.ClientError as error:
            if error_code(error) in pending:
                return None
            raise unavailable(error, operation, self.settings, self.endpoint) from error
        except aws.BotoCoreError as error:
            raise unavailable(error, operation, self.settings, self.endpoint) from error
        if needs not in answer:
            raise CAUnavailable(f"AWS Private CA {self.settings.arn} at {self.endpoint} answered {operation} without "
                                f"its {needs} (an answer cut short on the way, or not from AWS): check the network "
                                "path to AWS (or the VPC endpoint)", RETRY_AFTER_DOWN)
        return answer

    def check(self) -> Check:
        """The CA's state, the algorithm IssueCertificate uses, and (while ACTIVE) its root.

        :raises CAUnavailable: when AWS cannot be asked (unreachable, no credentials, denied, throttled, an
            answer cut short).
        """
        arn = self.settings.arn
        ca = self.call("DescribeCertificateAuthority", "CertificateAuthority",
                       CertificateAuthorityArn=arn)["CertificateAuthority"]
        config = ca.get("CertificateAuthorityConfiguration", {})
        check = Check(state=ca.get("Status", ""))
        if check.state != ACTIVE:
            check.problems.append(f"AWS Private CA {arn} "
                                  f"{STATE_ADVICE.get(check.state, f'is {check.state}, not ACTIVE')}")
        try:
            check.signing_algorithm = choose_signing_algorithm(self.settings.signing_algorithm,
                                                               config.get("KeyAlgorithm", ""),
                                                               config.get("SigningAlgorithm"))
        except SettingsError as error:
            check.problems.append(str(error))
        if check.state == ACTIVE:
            certificate = self.call("GetCertificateAuthorityCertificate", "Certificate", CertificateAuthorityArn=arn)
            try:
                check.roots_pem = roots_of(certificate["Certificate"], certificate.get("CertificateChain"))
            except ValueError as error:
                check.problems.append(f"AWS Private CA {arn}: {error}")
        return check

    def issue(self, csr_pem: bytes, identity: str, ttl: float, signing_algorithm: str, deadline: float) -> tuple:
        """``(certificate, chain)`` PEM texts of a new certificate for ``csr_pem``: IssueCertificate, then
        GetCertificate until AWS has signed it or ``deadline`` (``time.monotonic()``) passes.

        :raises CAUnavailable: when AWS refuses, cannot be reached, throttles beyond the retries, answers
            short, or has not signed by the deadline.
        """
        params = issue_request(self.settings, csr_pem, identity, ttl, signing_algorithm, time.time(),
                               str(uuid.uuid4()))
        certificate_arn = self.call("IssueCertificate", "CertificateArn", **params)["CertificateArn"]
        delays = poll_delays()
        while True:
            issued = self.call("GetCertificate", "Certificate", pending=("RequestInProgressException",),
                               CertificateAuthorityArn=self.settings.arn, CertificateArn=certificate_arn)
            if issued is not None:
                return issued["Certificate"], issued.get("CertificateChain")
            delay = next(delays)
            if time.monotonic() + delay > deadline:
                raise CAUnavailable(f"AWS Private CA {self.settings.arn} had not issued {certificate_arn} after "
                                    f"{self.settings.timeout:g}s (RequestInProgressException): raise --awspca-timeout "
                                    "if it is slow", RETRY_AFTER_DOWN)
            time.sleep(delay)
