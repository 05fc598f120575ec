"""A TLS serving certificate of the control plane, issued by its own CA and renewed at half its life.

The control plane serves two TLS ports with certificates from the mesh CA:
the CSR/config port (a SPIFFE id, so sidecars verify it like any peer) and
the injection webhook (DNS names the Kubernetes API server calls it by).
:class:`ServingCertificate` holds one of them in a
:class:`~mesh.identity.tls.CredentialStore`: the key is generated in memory
and never written, the first certificate is issued at construction (before
any port opens), and while the service runs a new key and certificate
replace it at half the lifetime.  New connections get the new certificate;
open ones keep theirs.  These ports issue no resumable TLS session: their
connections are few and long-lived, and every one is then a full handshake
that verifies the client's chain (see :func:`mesh.identity.tls.make_context`).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.application import service
from twisted.logger import Logger

from mesh.identity.tls import CredentialStore, WorkloadCredentials

log = Logger()


class ServingCertificate(service.Service):
    """A CA-issued serving certificate in ``credentials``, renewed every ``ttl / 2`` seconds while running.

    :param sign: ``sign(private_key) -> (cert_pem, chain_pem)``: the CA call that certifies the new key.
    :param bundle: the trust bundle (certificates) of the CA.
    :param what: what the certificate is, for the log line of each issue
        (e.g. ``injection webhook certificate for mesh-control.mesh-system.svc``).
    """

    def __init__(self, reactor, sign, bundle, ttl: float, what: str):
        self._reactor = reactor
        self._sign = sign
        self._bundle = bundle
        self._ttl = ttl
        self._what = what
        self._renewal = None
        self.credentials = CredentialStore()
        self._issue()

    def _issue(self):
        key = ec.generate_private_key(ec.SECP256R1())
        cert_pem, chain_pem = self._sign(key)
        chain = x509.load_pem_x509_certificates(cert_pem + chain_pem)
        self.credentials.swap(WorkloadCredentials.build(key, chain, self._bundle, require_client_cert=False,
                                                        resumption=False))
        log.info("{what} issued by the mesh CA, serial {serial:x}, valid until {not_after}",
                 what=self._what, serial=chain[0].serial_number,
                 not_after=chain[0].not_valid_after_utc.isoformat())

    def _renew(self):
        self._issue()
        self._schedule()

    def _schedule(self):
        self._renewal = self._reactor.callLater(self._ttl / 2, self._renew)

    def startService(self):
        super().startService()
        self._schedule()

    def stopService(self):
        if self._renewal is not None and self._renewal.active():
            self._renewal.cancel()
        self._renewal = None
        return super().stopService()
