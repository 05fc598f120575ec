"""The AWS Private CA as a Twisted service of mesh-control: signs CSRs, keeps its status, never blocks
the reactor.

Every AWS call runs in the service's own thread pool (``--awspca-concurrency`` threads), so a slow
or throttling AWS cannot starve the reactor's pool (name resolution) either.  A CSR that waits longer
than ``--awspca-timeout`` (plus a grace second for its turn in the pool) is answered with
:class:`mesh.api.CAUnavailable` while its call ends in the background.

The status (:attr:`PcaCA.status`, what ``mesh_ca_status`` returns at once) is refreshed every
``--awspca-refresh-interval`` seconds, every :data:`NOT_READY_REFRESH` seconds at most while the CA is
not ready, and at once when a CSR finds the CA in another state: DescribeCertificateAuthority (the
state, and the key that fixes the signing algorithm) and, while the CA is ACTIVE,
GetCertificateAuthorityCertificate (its root: the trust bundle).  While AWS cannot be reached the last
root stays in the status: the trust bundle never empties because AWS is away.
"""

from __future__ import annotations

import time

from cryptography.hazmat.primitives import serialization
from twisted.logger import Logger

from mesh.api import CAStatus, CAUnavailable, ExternalCAService, SignedCertificate

from .certs import IssuedCertificateRejected, chain_without_roots, check_issued
from .pca import RETRY_AFTER_DOWN, RETRY_AFTER_STATE, NotActive, PcaClient

log = Logger(namespace="txmesh_awspca")

NAME = "awspca"
#: Seconds a CSR may wait beyond ``--awspca-timeout`` (for its turn in the pool) before it is answered 503.
GRACE = 1.0
#: The longest wait between two status checks while the CA is not ready.
NOT_READY_REFRESH = 2.0


class PcaCA(ExternalCAService):
    """Signs workload CSRs with AWS Private CA (:meth:`sign`) and reports its :attr:`status`.

    :param settings: a :class:`txmesh_awspca.settings.PcaSettings`.
    :param reactor: the reactor (the refresh is timed with it; results come back to it).
    """

    def __init__(self, settings, reactor):
        super().__init__(reactor, "txmesh-awspca", settings.concurrency)
        self.settings = settings
        self.client = PcaClient(settings)
        #: The current status (``mesh_ca_status``); read by the control plane every few seconds.
        self.status = CAStatus(NAME, True, False, f"asking AWS Private CA {settings.arn} for its state", b"",
                               settings.issuer)
        #: IssueCertificate's SigningAlgorithm, once the CA's key is known.
        self.signing_algorithm = None
        #: Why the CA cannot sign, as its last check found it (not ACTIVE, a key txmesh cannot use), or None:
        #: CSRs are then answered 503 without asking AWS.
        self.refusal = None

    # -- signing ------------------------------------------------------------------------------------------
    def sign(self, csr, identity: str, ttl: float):
        """A Deferred firing with the :class:`SignedCertificate` for ``csr`` (checked by the control plane:
        one URI SAN, ``identity``), or failing with :class:`CAUnavailable`."""
        if self.refusal is not None:
            raise CAUnavailable(self.refusal, RETRY_AFTER_STATE)
        csr_pem = csr.public_bytes(serialization.Encoding.PEM)
        d = self.in_thread(self._sign_blocking, csr, csr_pem, identity, ttl, self.signing_algorithm)
        wait = self.settings.timeout + GRACE
        d.addTimeout(wait, self.reactor, onTimeoutCancel=lambda result, timeout: self._too_slow(wait))
        d.addErrback(self._sign_failed)
        return d

    def _sign_blocking(self, csr, csr_pem: bytes, identity: str, ttl: float, algorithm: str | None):
        deadline = time.monotonic() + self.settings.timeout
        if algorithm is None:  # the first CSRs, before the first check answered
            check = self.client.check()
            if check.problems:
                raise CAUnavailable("; ".join(check.problems), RETRY_AFTER_STATE)
            algorithm = check.signing_algorithm
        certificate, chain = self.client.issue(csr_pem, identity, ttl, algorithm, deadline)
        try:
            cert_pem = check_issued(certificate, identity, csr)
        except IssuedCertificateRejected as error:
            raise CAUnavailable(f"AWS Private CA {self.settings.arn} with template {self.settings.template_arn}: "
                                f"{error}", RETRY_AFTER_STATE) from None
        return SignedCertificate(cert_pem, chain_without_roots(chain))

    def _too_slow(self, wait: float):
        raise CAUnavailable(f"AWS Private CA {self.settings.arn} did not issue within {wait:g}s: check AWS's "
                            "health, or raise --awspca-timeout (or --awspca-concurrency, if CSRs queue)",
                            RETRY_AFTER_DOWN)

    def _sign_failed(self, failure):
        if failure.check(NotActive):
            self.check_soon()  # the CA changed state since the last check: say so in the status now
        return failure

    # -- status -------------------------------------------------------------------------------------------
    def check(self):
        """DescribeCertificateAuthority and the root (in a worker thread)."""
        return self.client.check()

    def next_check(self) -> float:
        delay = self.settings.refresh_interval
        return delay if self.status.ready else min(delay, NOT_READY_REFRESH)

    def checked(self, check):
        self.signing_algorithm = check.signing_algorithm
        self.refusal = "; ".join(check.problems) or None
        self._set_status(not check.problems, self.refusal or "", check.roots_pem or self.status.roots_pem)

    def check_failed(self, failure):
        if failure.check(CAUnavailable):
            reason = failure.value.reason
        else:
            log.failure("checking AWS Private CA {arn} failed", failure, arn=self.settings.arn)
            reason = f"checking AWS Private CA {self.settings.arn} failed: {failure.getErrorMessage()}"
        self._set_status(False, reason, self.status.roots_pem)  # AWS away: keep the CA's last root

    def _set_status(self, ready: bool, reason: str, roots_pem: bytes):
        if (ready, reason) != (self.status.ready, self.status.reason):
            if ready:
                log.info("AWS Private CA {arn} is ACTIVE: signing with {algorithm}, template {template}",
                         arn=self.settings.arn, algorithm=self.signing_algorithm, template=self.settings.template_arn)
            else:
                log.warn("AWS Private CA cannot sign: {reason}", reason=reason)
        self.status = self.status._replace(ready=ready, reason=reason, roots_pem=roots_pem)
