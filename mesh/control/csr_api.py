"""The CSR endpoint of the control plane: ``POST /v1/csr`` on :15012.

Request (JSON): ``{"credential": "<join token or service-account token>", "csr": "<PEM>", "ttl": seconds?}``.
A sidecar renewing a certificate it still holds may instead present that
certificate as its TLS client certificate and omit ``credential``: the verified
SPIFFE id of the client certificate is then the proven identity (join tokens
are short-lived; renewals must keep working after they expire).
Response 200: ``{"certificate", "chain", "trust_bundle", "not_after", "issuer"}``
(PEM strings, ISO time, and a one-line description of the CA that signed, for
``meshctl proxy-config cert``); 400/401/403/413 with ``{"error": "..."}``
otherwise, and 503 with ``{"error": "..."}`` and ``Retry-After`` (seconds) when
the credential could not be checked now (the Kubernetes API server is
unreachable) or the CA cannot sign now (:class:`mesh.api.CAUnavailable`: an
external CA sealed, down or throttling): retry later, with the same
credential.  Any other failure of the CA is a 500 whose body says only to read
the control plane's log (where the traceback is).

The port is server-authenticated TLS: a new sidecar has no certificate yet and
proves itself with its credential.  Every rejection is logged with the reason
and the caller's address -- never with the credential itself.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from time import perf_counter

from cryptography import x509
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from mesh.api import CAUnavailable
from mesh.identity.credentials import CredentialRejected, VerifierUnavailable
from mesh.identity.csr import MAX_CSR_BYTES, CSRRejected, check_csr
from mesh.identity.pem import pem_der
from mesh.identity.spiffe import InvalidSpiffeId, SpiffeId
from mesh.identity.tls import peer_identity

log = Logger()
MAX_BODY = MAX_CSR_BYTES + 8192
#: Retry-After (seconds) of a 503 for a credential that could not be checked now.
VERIFIER_RETRY_AFTER = 5


#: The longest Retry-After sent, whatever a CA plugin asks (an agent then retries at least this often).
MAX_RETRY_AFTER = 300


def retry_after_seconds(value) -> int:
    """``Retry-After`` for a delay of ``value`` seconds: whole seconds (RFC 9110), 1 to :data:`MAX_RETRY_AFTER`;
    a value that is not a number (a plugin's mistake) is 1."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return 1
    if math.isnan(seconds) or seconds <= 1:
        return 1
    return MAX_RETRY_AFTER if seconds >= MAX_RETRY_AFTER else math.ceil(seconds)


@lru_cache(maxsize=16)
def _json_string(value: bytes | str) -> str:
    """``value`` (PEM bytes, or text) as a JSON string, remembered: the chain, the trust bundle and the
    issuer are the same in every answer, and escaping the PEMs' newlines again for each CSR cost about
    60 K instructions."""
    return json.dumps(value.decode() if isinstance(value, bytes) else value)


def _answer_json(cert_pem: bytes, chain_pem: bytes, bundle_pem: bytes, not_after: str, issuer: str) -> str:
    """The JSON body of a 200 answer (the keys of the module docstring, in that order)."""
    return (f'{{"certificate": {json.dumps(cert_pem.decode())}, "chain": {_json_string(chain_pem)}, '
            f'"trust_bundle": {_json_string(bundle_pem)}, "not_after": "{not_after}", '
            f'"issuer": {_json_string(issuer)}}}')


def _not_after(cert_pem: bytes):
    """The notAfter of the first certificate in ``cert_pem`` (a CA's answer), read from its DER
    (:func:`mesh.identity.pem.pem_der`: a quarter of ``x509.load_pem_x509_certificate``'s cost).  A PEM
    that is not a certificate still fails (ValueError: a 500, as before)."""
    return x509.load_der_x509_certificate(pem_der(cert_pem, (b"CERTIFICATE", b"X509 CERTIFICATE"))).not_valid_after_utc


class _Reject(Exception):
    def __init__(self, status, message, retry_after=None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def _client_certificate_identity(request, trust_domain=None):
    """The SPIFFE id of a TLS client certificate OpenSSL verified against the bundle, or None.

    A verified certificate whose id is not ``spiffe://<trust_domain>/ns/<ns>/sa/<sa>`` proves
    nothing here (the bundle may hold roots shared with other meshes): it is rejected (401).
    """
    uri = peer_identity(request.channel.transport)
    if uri is None:
        return None
    try:
        identity = SpiffeId.parse(uri)
    except InvalidSpiffeId:
        raise _Reject(401, f"client certificate identity {uri} is not spiffe://<trust-domain>/ns/<namespace>/"
                           "sa/<service-account>") from None
    if trust_domain is not None and identity.trust_domain != trust_domain:
        raise _Reject(401, f"client certificate is for trust domain {identity.trust_domain!r}, "
                           f"not {trust_domain!r}")
    return identity


class CSRResource(resource.Resource):
    """Signs workload CSRs for callers whose credential proves the identity asked for.

    :param verifier: an :class:`mesh.identity.credentials.ICredentialVerifier`.
    :param sign: ``(csr, identity_uri, ttl) -> (cert_pem, chain_pem)`` or a
        Deferred of it (the ``mesh_sign_csr`` hook).
    :param bundle: ``() -> bytes``, the current trust bundle.
    :param default_ttl, max_ttl: certificate lifetimes in seconds.
    :param stats: a :class:`mesh.control.service.CSRStats` (``signed()``, ``rejected(reason, status)``,
        ``unavailable()``, ``error()``, ``signing_took(seconds)``), or None.
    :param trust_domain: the only trust domain a renewing client certificate may prove.
    :param ca_issuer: ``() -> str``, the selected CA's description (``issuer`` of the answer).
    :param check: ``(csr_pem, identity_uri) -> csr`` or a Deferred of it, raising
        :class:`mesh.identity.csr.CSRRejected`: :func:`mesh.identity.csr.check_csr`, or its run in a CA
        worker process (:meth:`mesh.identity.ca_workers.CAWorkers.check`, ``--ca-workers``), or only
        :func:`mesh.identity.csr.load_csr` when ``sign`` checks the CSR as it signs (the built-in CA's
        workers); ``sign`` may then fail with CSRRejected too.
    """

    isLeaf = True

    def __init__(self, verifier, sign, bundle, default_ttl, max_ttl, stats=None, trust_domain=None,
                 ca_issuer=lambda: "", check=check_csr):
        super().__init__()
        self._check = check
        self._ca_issuer = ca_issuer
        self._trust_domain = trust_domain
        self._verifier = verifier
        self._sign = sign
        self._bundle = bundle
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl
        self._stats = stats

    def render_POST(self, request):
        request.gone = False
        request.notifyFinish().addErrback(lambda _: setattr(request, "gone", True))
        d = defer.ensureDeferred(self._handle(request))
        d.addCallbacks(lambda answer: self._finish(request, 200, answer), lambda f: self._failed(request, f))
        return server.NOT_DONE_YET

    async def _handle(self, request) -> str:
        length = request.getHeader(b"content-length")
        if length is None or not length.isdigit() or int(length) > MAX_BODY:
            raise _Reject(413, f"send a JSON body with Content-Length of at most {MAX_BODY} bytes")
        try:
            body = json.loads(request.content.read(MAX_BODY + 1))
            credential, csr_pem = body.get("credential"), body["csr"].encode()
            requested = float(body.get("ttl") or self._default_ttl)
            if not requested > 0:
                raise ValueError("ttl")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise _Reject(400, "malformed request: expected JSON {credential, csr, ttl?}") from None
        identity = _client_certificate_identity(request, self._trust_domain)
        if identity is None:
            if credential is None:
                raise _Reject(401, "no credential: send a join token, or renew with a valid mesh certificate")
            try:
                identity = await defer.maybeDeferred(self._verifier.verify, credential)
            except VerifierUnavailable as error:
                raise _Reject(503, f"credential not verified: {error}", VERIFIER_RETRY_AFTER) from None
            except CredentialRejected as error:
                raise _Reject(401, f"credential rejected: {error}") from None
        ttl = min(requested, self._max_ttl)
        try:
            csr = await defer.maybeDeferred(self._check, csr_pem, identity.uri)
            cert_pem, chain_pem = await self._signed(csr, identity.uri, ttl)
        except CSRRejected as error:  # by the check, or by a CA worker that checks as it signs
            raise _Reject(403 if "credential proves" in str(error) else 400, f"CSR rejected: {error}") from None
        not_after = _not_after(cert_pem)
        log.info("signed a {ttl:.0f}s certificate for {identity} ({peer})", ttl=ttl,
                 identity=identity.uri, peer=request.getClientAddress().host)
        if self._stats is not None:
            self._stats.signed()
        return _answer_json(cert_pem, chain_pem, self._bundle(), not_after.isoformat(), self._ca_issuer())

    async def _signed(self, csr, identity: str, ttl: float) -> tuple:
        """``(cert_pem, chain_pem)`` from the selected CA (``mesh_sign_csr``), timed; CAUnavailable passes."""
        started = perf_counter()
        try:
            signed = await defer.maybeDeferred(self._sign, csr, identity, ttl)
        finally:
            if self._stats is not None:
                self._stats.signing_took(perf_counter() - started)
        if signed is None:
            raise RuntimeError("no CA signed the CSR: mesh_sign_csr returned None (is the plugin of the CA --ca "
                               "selected installed and enabled?)")
        return signed

    def _failed(self, request, failure):
        peer = request.getClientAddress().host
        if failure.check(_Reject):
            reason = failure.value.args[0]
            log.warn("CSR from {peer} rejected: {reason}", peer=peer, reason=reason)
            if self._stats is not None:
                self._stats.rejected(reason.split(":")[0], failure.value.status)
            self._finish(request, failure.value.status, {"error": reason}, failure.value.retry_after)
        elif failure.check(CAUnavailable):
            reason = f"CA unavailable: {failure.value.reason}"
            log.warn("CSR from {peer} not signed: {reason}", peer=peer, reason=reason)
            if self._stats is not None:
                self._stats.unavailable()
            self._finish(request, 503, {"error": reason}, failure.value.retry_after)
        else:
            log.failure("signing failed", failure)
            if self._stats is not None:
                self._stats.error()
            self._finish(request, 500, {"error": "signing failed; see the control plane log"})

    @staticmethod
    def _finish(request, status, body, retry_after=None):
        """Answer ``status`` with ``body``: a dict, or a JSON text made by :func:`_answer_json`."""
        if request.gone:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        if retry_after is not None:
            request.setHeader(b"retry-after", b"%d" % retry_after_seconds(retry_after))
        request.write((body if isinstance(body, str) else json.dumps(body)).encode())
        request.finish()
