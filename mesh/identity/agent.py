"""The workload agent inside mesh-proxy: get a certificate, keep it fresh.

At start the agent generates an ECDSA P-256 key in memory (it is never
written anywhere), sends a CSR with its SPIFFE id and its bootstrap credential
(the join token) to the control plane's CSR endpoint, and installs the
certificate.  Renewals prove the identity with the current certificate (as the
TLS client certificate), so they keep working after the token expires.  It renews
at about half the certificate's lifetime (with jitter), each time with a new
key; while the CA is unreachable it retries with capped exponential backoff and
keeps serving with the certificate it has.  A 503 (the CA, or the check of the
credential, cannot answer now) is retried the same way, never sooner than its
``Retry-After``.  Neither may carry the next try past the certificate's expiry:
while it is valid, a try comes within half its remaining life.
"""

from __future__ import annotations

import json
import random
from io import BytesIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, _HTTP11ClientFactory, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from mesh.backoff import Backoff
from mesh.identity.tls import WorkloadCredentials, make_context, spiffe_id_of

log = Logger()

RETRY_MIN = 1.0
RETRY_MAX = 60.0
#: renew with the current certificate as proof while it has this long to live
RENEW_WITH_CERT_MARGIN = 2.0
#: while the certificate is valid, a failed renewal is tried again within half its remaining life,
#: but never sooner than this
RETRY_BEFORE_EXPIRY_MIN = 0.25


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False  # one CSR per rotation: no "Starting factory" log lines


class RenewError(Exception):
    """The control plane refused or could not be reached.

    ``retry_after``: the seconds the control plane asked to wait (a 503's ``Retry-After``), or None.
    """

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(response):
    """The ``Retry-After`` of a response, in seconds (the delay-seconds form), or None."""
    value = response.headers.getRawHeaders(b"retry-after", [b""])[0]
    return float(value) if value.isdigit() else None


def make_csr(key, spiffe_uri: str) -> bytes:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_uri)]), critical=True)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


@implementer(IOpenSSLClientConnectionCreator)
class VerifyControlPlane:
    """TLS to the control plane: chain against the bundle, exact SPIFFE id."""

    def __init__(self, bundle, expected_uri, hostname, client_credentials=None):
        self.expected_uri = expected_uri
        self.hostname = hostname
        own = (client_credentials.key, client_credentials.chain) if client_credentials is not None else (None, ())
        self.context = make_context(bundle, *own, server=False, verify_callback=self._verify)

    def _verify(self, connection, cert, errno, depth, ok):
        if not ok:
            return False
        if depth == 0:
            return spiffe_id_of(cert.to_cryptography()) == self.expected_uri
        return True

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self.context, None)
        connection.set_connect_state()
        if self.hostname and not self.hostname[0].isdigit():
            connection.set_tlsext_host_name(self.hostname.encode())
        return connection


@implementer(IPolicyForHTTPS)
class _ControlPolicy:
    def __init__(self, bundle, expected_uri, client_credentials=None):
        self.bundle = bundle
        self.expected_uri = expected_uri
        self.client_credentials = client_credentials

    def creatorForNetloc(self, hostname, port):
        return VerifyControlPlane(self.bundle, self.expected_uri, hostname.decode(), self.client_credentials)


class WorkloadAgent(service.Service):
    """Obtains and rotates the workload certificate into a CredentialStore.

    :param control: ``(host, port)`` of the control plane's CSR endpoint.
    :param bundle_pem: the trust bundle the sidecar was given (verifies the
        control plane; replaced by the bundle each answer carries).
    :param token_path: file holding the bootstrap credential (re-read on
        every request, so an operator can replace it).
    :param identity: this workload's :class:`mesh.identity.spiffe.SpiffeId`.
    :param control_identity: the SPIFFE id the control plane must present.
    """

    def __init__(self, reactor, control, bundle_pem, token_path, identity, control_identity, store,
                 ttl=None, rotate_at=0.5):
        self.reactor = reactor
        self.url = f"https://{control[0]}:{control[1]}/v1/csr".encode()
        self.bundle = x509.load_pem_x509_certificates(bundle_pem)
        self.token_path = token_path
        self.identity = identity
        self.control_identity = control_identity
        self.store = store
        self.ttl = ttl
        self.rotate_at = rotate_at
        self.renewals = 0
        self.failures = 0
        self.last_error = None
        #: the control plane's description of the CA that signed the certificate in use (``issuer``)
        self.ca_issuer = None
        self.first_certificate = defer.Deferred()
        self._timer = None
        self._backoff = Backoff(RETRY_MIN, RETRY_MAX, jitter=(0.8, 1.2))

    def startService(self):
        super().startService()
        self._schedule(0)

    def stopService(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return super().stopService()

    def _schedule(self, delay):
        self._timer = self.reactor.callLater(delay, self._renew_now)

    def _renew_now(self):
        self._timer = None
        defer.ensureDeferred(self.renew()).addCallbacks(self._renewed, self._failed)

    async def renew(self) -> tuple:
        """One CSR round trip; returns the new credentials (not yet installed) and the control plane's
        description of the CA that signed them (``issuer``, None from a control plane that sends none).

        While the current certificate is comfortably valid it is the proof of
        identity (TLS client certificate); otherwise the join token is.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        current = self.store.current
        proof = current if current is not None and current.expires_in() > RENEW_WITH_CERT_MARGIN else None
        body = {"csr": make_csr(key, self.identity.uri).decode()}
        if proof is None:
            body["credential"] = self._read_token()
        if self.ttl:
            body["ttl"] = self.ttl
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        pool._factory = _QuietClientFactory
        # Trust what the credentials in use trust: the config stream keeps that bundle current (root
        # rotation); before the first certificate, the bundle the sidecar was started with.
        bundle = list(current.bundle) if current is not None else self.bundle
        agent = Agent(self.reactor, contextFactory=_ControlPolicy(bundle, self.control_identity, proof),
                      connectTimeout=10, pool=pool)
        try:
            response = await agent.request(b"POST", self.url, Headers({b"content-type": [b"application/json"]}),
                                           FileBodyProducer(BytesIO(json.dumps(body).encode())))
            data = await readBody(response)
        except Exception as error:  # connection refused, TLS failure, timeout: all retried
            raise RenewError(f"control plane unreachable at {self.url.decode()}: {error}") from None
        try:
            answer = json.loads(data)
        except ValueError:
            raise RenewError(f"control plane answered {response.code} with a non-JSON body") from None
        if response.code != 200:
            raise RenewError(f"control plane refused the CSR ({response.code}): {answer.get('error')}",
                             _retry_after(response) if response.code == 503 else None)
        chain = x509.load_pem_x509_certificates((answer["certificate"] + answer["chain"]).encode())
        bundle = x509.load_pem_x509_certificates(answer["trust_bundle"].encode())
        return WorkloadCredentials.build(key, chain, bundle), answer.get("issuer") or None

    def _read_token(self) -> str:
        try:
            with open(self.token_path, encoding="utf-8") as handle:
                return handle.read().strip()
        except OSError as error:
            raise RenewError(f"cannot read the token file {self.token_path}: {error.strerror}") from None

    def _renewed(self, renewed):
        credentials, self.ca_issuer = renewed
        self.store.swap(credentials)
        self.renewals += 1
        self.last_error = None
        self._backoff.reset()
        remaining = credentials.expires_in()
        delay = max(1.0, remaining * self.rotate_at * random.uniform(0.9, 1.1))
        log.info("workload certificate for {identity} installed (valid {life:.0f}s); next rotation in {delay:.1f}s",
                 identity=self.identity.uri, life=remaining, delay=delay)
        if not self.first_certificate.called:
            self.first_certificate.callback(credentials)
        if self.running:
            self._schedule(delay)

    def _failed(self, failure):
        self.failures += 1
        self.last_error = failure.getErrorMessage()
        delay = self._backoff.next()
        if failure.check(RenewError) and failure.value.retry_after is not None:
            delay = max(delay, failure.value.retry_after)
        current = self.store.current
        remaining = current.expires_in() if current is not None else 0.0
        if remaining > 0:  # try again before the certificate expires, however far the backoff has grown
            delay = min(delay, max(remaining / 2, RETRY_BEFORE_EXPIRY_MIN))
        log.warn("certificate renewal failed ({error}); retrying in {delay:.1f}s, serving with the current "
                 "certificate meanwhile", error=self.last_error, delay=delay)
        if not failure.check(RenewError):
            log.failure("unexpected renewal error", failure)
        if self.running:
            self._schedule(delay)
