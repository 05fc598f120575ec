"""The Vault CA as a Twisted service of mesh-control: signs CSRs, keeps its status, never blocks the reactor.

Every Vault call runs in the service's own thread pool (``--vault-concurrency`` threads), so a slow
Vault cannot starve the reactor's pool (name resolution) either; a CSR that waits longer than
``--vault-timeout`` (plus a grace second) is answered with :class:`mesh.api.CAUnavailable` while its
call finishes in the background.  A CSR that comes before the first status refresh ended (the
control plane's own, at start) waits for it, as long.

The status (:attr:`VaultCA.status`, what ``mesh_ca_status`` returns at once) is refreshed every
``--vault-refresh-interval`` seconds, and sooner when the token is due for renewal or Vault refused it:
the token is checked (login, renewal), the token's right to sign, every issuer of the mount (the
trust bundle: all their roots, so old and new during a rotation), and the role's settings when the
token may read them.  While Vault is down or sealed the last roots stay in the status: the trust
bundle never empties because Vault is away.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.logger import Logger

from mesh.api import CAStatus, CAUnavailable, ExternalCAService, SignedCertificate

from . import NAME, pki
from .vault import RETRY_LATER, PermissionDenied, TokenKeeper, VaultClient

log = Logger(namespace="txmesh_vault")

#: Seconds a CSR may wait beyond ``--vault-timeout`` (for its turn in the pool) before it is answered 503.
GRACE = 1.0
#: The soonest the next refresh runs, in seconds (a token due for renewal asks for "now").
MIN_REFRESH = 0.5


@dataclass
class Check:
    """What one status refresh found: log lines, the roots (PEM) and what keeps the CA from being ready."""

    notes: list = field(default_factory=list)
    roots_pem: bytes = b""
    problems: list = field(default_factory=list)


class VaultCA(ExternalCAService):
    """Signs workload CSRs with Vault's PKI secrets engine (:meth:`sign`) and reports its :attr:`status`.

    :param settings: a :class:`txmesh_vault.settings.VaultSettings`.
    :param reactor: the reactor (the status refresh is timed with it; results come back to it).
    """

    def __init__(self, settings, reactor):
        super().__init__(reactor, "txmesh-vault", settings.concurrency)
        self.settings = settings
        self.client = VaultClient(settings)
        self.tokens = TokenKeeper(self.client)
        #: The current status (``mesh_ca_status``); read by the control plane every few seconds.
        self.status = CAStatus(NAME, True, False, f"connecting to vault at {settings.addr}", b"", settings.issuer)
        self._waiting: list | None = []  # CSRs that came before the first status refresh ended (then None)

    # -- signing ------------------------------------------------------------------------------------------
    def sign(self, csr, identity: str, ttl: float):
        """A Deferred firing with the :class:`SignedCertificate` for ``csr`` (already checked by the control
        plane: one URI SAN, ``identity``), or failing with :class:`CAUnavailable`."""
        csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        d = self._after_first_check()
        d.addCallback(lambda _: self._in_thread(self._sign_blocking, csr_pem, identity, ttl))
        d.addErrback(self._sign_failed)
        return d

    def _after_first_check(self):
        """A Deferred that fires once the first status refresh ended (logged in or not): at once afterwards.

        The control plane asks for its own certificate as it starts, before any login could be done."""
        if self._waiting is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append(d)
        return self._bounded(d)

    def _sign_blocking(self, csr_pem: str, identity: str, ttl: float) -> SignedCertificate:
        if self.client.token is None:
            raise CAUnavailable(self.status.reason or f"not logged in to vault at {self.settings.addr} yet")
        data = self.client.sign(csr_pem, identity, ttl)
        try:
            cert = pki.check_issued(data["certificate"], identity)
        except pki.IssuedCertificateRejected as error:
            raise CAUnavailable(f"{error} ({self.settings.sign_path})", RETRY_LATER) from None
        return SignedCertificate(pki.pem([cert]), pki.chain_without_roots(tuple(data.get("ca_chain") or ()),
                                                                           data.get("issuing_ca") or ""))

    def _sign_failed(self, failure):
        if failure.check(PermissionDenied):  # revoked or expired token: log in again (or re-read the file) now
            self.tokens.invalidate()
            self.check_soon()
        return failure

    def _in_thread(self, function, *args):
        return self._bounded(self.in_thread(function, *args))

    def _bounded(self, d):
        """``d``, failed with :class:`CAUnavailable` unless it fires within ``--vault-timeout`` plus grace."""
        wait = self.settings.timeout + GRACE
        return d.addTimeout(wait, self.reactor, onTimeoutCancel=lambda result, timeout: self._too_slow(wait))

    def _too_slow(self, wait: float):
        raise CAUnavailable(f"vault at {self.settings.addr} did not answer within {wait:.0f}s: check its load, or "
                            "raise --vault-timeout (or --vault-concurrency, if CSRs queue)")

    # -- status -------------------------------------------------------------------------------------------
    def check_ended(self):
        """The first check ended: the CSRs that waited for it go on."""
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.callback(None)

    def next_check(self) -> float:
        delay = self.settings.refresh_interval
        due = self.tokens.seconds_until_due()
        if due is not None:
            delay = min(delay, due)
        return max(MIN_REFRESH, delay)

    def check(self) -> Check:
        """Token, right to sign, issuers, role: what keeps Vault from signing mesh workloads now (in a
        worker thread)."""
        settings = self.settings
        check = Check()
        try:
            check.notes += self.tokens.ensure()
            if not self.client.can_sign():
                check.problems.append(f"mesh-control's Vault token may not sign: give it a policy with update on "
                                      f"{settings.sign_path}")
        except PermissionDenied:
            self.tokens.invalidate()
            raise
        roots, problems = pki.roots_of_issuers(self.client.issuers())
        check.problems += problems
        if not roots:
            check.problems.append(f"the PKI mount {settings.mount} has no issuer: generate or import a CA in it "
                                  "(docs/identity.md)")
        check.roots_pem = pki.pem(roots)
        role = self.client.role()
        if role is not None:
            check.problems += [f"PKI role {settings.mount}/roles/{settings.role}: {problem}"
                               for problem in pki.role_problems(role, settings.trust_domain, settings.verbatim)]
        return check

    def checked(self, check: Check):
        for note in check.notes:
            log.info("vault: {note}", note=note)
        self._set_status(not check.problems, "; ".join(check.problems), check.roots_pem)

    def check_failed(self, failure):
        if failure.check(CAUnavailable):
            reason = failure.value.reason
        else:
            log.failure("vault: the status check failed", failure)
            reason = "the Vault status check failed: see mesh-control's log"
        self._set_status(False, reason, b"")

    def _set_status(self, ready: bool, reason: str, roots_pem: bytes):
        old = self.status
        self.status = old._replace(ready=ready, reason=reason, roots_pem=roots_pem or old.roots_pem)
        if (ready, reason) != (old.ready, old.reason):
            if ready:
                log.info("vault CA ready: {issuer}", issuer=self.settings.issuer)
            else:
                log.warn("vault CA not ready: {reason}", reason=reason)
        if self.status.roots_pem != old.roots_pem:
            log.info("vault: the trust bundle has {count} root(s) now",
                     count=self.status.roots_pem.count(b"-----BEGIN CERTIFICATE-----"))
