"""A TLS serving certificate of the control plane, issued by a mesh CA and renewed at half its life.

The control plane serves two TLS ports with certificates from a mesh CA:
the CSR/config port (a SPIFFE id, so sidecars verify it like any peer,
issued by the CA ``--ca`` selected) and the injection webhook (DNS names the
Kubernetes API server calls it by, issued by the built-in CA).
:class:`ServingCertificate` holds one of them in a
:class:`~mesh.identity.tls.CredentialStore`: the key is generated in memory
and never written, and while the service runs a new key and certificate
replace it at half the lifetime.  New connections get the new certificate;
open ones keep theirs.  These ports issue no resumable TLS session: their
connections are few and long-lived, and every one is then a full handshake
that verifies the client's chain (see :func:`mesh.identity.tls.make_context`).

The first certificate is issued at construction (``issue_now``, a signer
that answers at once: it is there before any port opens) or when the
service starts (a signer reached through ``mesh_sign_csr``, which may
answer later, with a Deferred); ``issued`` fires once it is installed.  A
signature that fails (the CA unavailable) is tried again with capped
backoff while the current certificate keeps serving.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from mesh.api import CAUnavailable
from mesh.backoff import Backoff
from mesh.identity.tls import CredentialStore, WorkloadCredentials

log = Logger()

RETRY_MIN = 1.0
RETRY_MAX = 30.0


class ServingCertificate(service.Service):
    """A CA-issued serving certificate in ``credentials``, renewed every ``ttl / 2`` seconds while running.

    :param sign: ``sign(private_key) -> (cert_pem, chain_pem)`` or a Deferred of it: the CA call that
        certifies the new key.
    :param bundle: the trust bundle (certificates) client certificates are verified against;
        :meth:`set_bundle` replaces it.
    :param what: what the certificate is, for the log line of each issue
        (e.g. ``injection webhook certificate for mesh-control.mesh-system.svc``).
    :param issue_now: issue the first certificate in the constructor (``sign`` must then answer at
        once), else when the service starts.
    """

    def __init__(self, reactor, sign, bundle, ttl: float, what: str, issue_now: bool = True):
        self._reactor = reactor
        self._sign = sign
        self._bundle = tuple(bundle)
        self._ttl = ttl
        self._what = what
        self._timer = None
        self._backoff = Backoff(RETRY_MIN, RETRY_MAX, jitter=(0.8, 1.2))
        self.credentials = CredentialStore()
        self.issued = defer.Deferred()
        if issue_now:
            key = ec.generate_private_key(ec.SECP256R1())
            self._install(key, sign(key))

    def set_bundle(self, bundle) -> None:
        """Verify client certificates against ``bundle`` from now on (same key and certificate)."""
        self._bundle = tuple(bundle)
        current = self.credentials.current
        if current is not None and set(current.bundle) != set(self._bundle):
            self.credentials.swap(WorkloadCredentials.build(current.key, current.chain, self._bundle,
                                                            require_client_cert=False, resumption=False))

    def _issue(self):
        self._timer = None
        key = ec.generate_private_key(ec.SECP256R1())
        d = defer.maybeDeferred(self._sign, key)
        d.addCallback(lambda signed: self._install(key, signed))
        d.addCallbacks(lambda _: self._schedule(self._ttl / 2), self._failed)

    def _install(self, key, signed) -> None:
        if signed is None:
            raise RuntimeError("no CA signed it (mesh_sign_csr returned None)")
        cert_pem, chain_pem = signed
        chain = x509.load_pem_x509_certificates(cert_pem + chain_pem)
        self.credentials.swap(WorkloadCredentials.build(key, chain, self._bundle, require_client_cert=False,
                                                        resumption=False))
        self._backoff.reset()
        log.info("{what} issued by the mesh CA, serial {serial:x}, valid until {not_after}",
                 what=self._what, serial=chain[0].serial_number,
                 not_after=chain[0].not_valid_after_utc.isoformat())
        if not self.issued.called:
            self.issued.callback(self.credentials.current)

    def _failed(self, failure):
        delay = self._backoff.next()
        current = self.credentials.current
        if current is not None:
            delay = min(delay, max(1.0, current.expires_in() / 2))
        if failure.check(CAUnavailable):
            reason = failure.value.reason
        else:
            reason = f"{failure.type.__name__}: {failure.getErrorMessage()}"
            log.failure("signing the {what} failed", failure, what=self._what)
        log.warn("{what} not issued ({reason}); trying again in {delay:.1f}s{meanwhile}", what=self._what,
                 reason=reason, delay=delay,
                 meanwhile=", serving the current one meanwhile" if current is not None else "")
        self._schedule(delay)

    def _schedule(self, delay):
        if self.running:
            self._timer = self._reactor.callLater(delay, self._issue)

    def startService(self):
        super().startService()
        if self.credentials.current is None:
            self._issue()
        else:
            self._schedule(self._ttl / 2)

    def stopService(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return super().stopService()
