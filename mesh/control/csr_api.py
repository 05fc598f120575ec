"""The CSR endpoint of the control plane: ``POST /v1/csr`` on :15012.

Request (JSON): ``{"credential": "<join token or service-account token>", "csr": "<PEM>", "ttl": seconds?}``.
A sidecar renewing a certificate it still holds may instead present that
certificate as its TLS client certificate and omit ``credential``: the verified
SPIFFE id of the client certificate is then the proven identity (join tokens
are short-lived; renewals must keep working after they expire).
Response 200: ``{"certificate", "chain", "trust_bundle", "not_after"}`` (PEM
strings, ISO time); 400/401/403/413 with ``{"error": "..."}`` otherwise, and 503
when the credential could not be checked now (the Kubernetes API server is
unreachable: retry with the same credential).

The port is server-authenticated TLS: a new sidecar has no certificate yet and
proves itself with its credential.  Every rejection is logged with the reason
and the caller's address -- never with the credential itself.
"""

from __future__ import annotations

import json

from cryptography import x509
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from mesh.identity.credentials import CredentialRejected, VerifierUnavailable
from mesh.identity.csr import MAX_CSR_BYTES, CSRRejected, check_csr
from mesh.identity.spiffe import InvalidSpiffeId, SpiffeId
from mesh.identity.tls import peer_identity

log = Logger()
MAX_BODY = MAX_CSR_BYTES + 8192


class _Reject(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


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
    :param stats: an object with ``signed()`` and ``rejected(reason)`` counters.
    :param trust_domain: the only trust domain a renewing client certificate may prove.
    """

    isLeaf = True

    def __init__(self, verifier, sign, bundle, default_ttl, max_ttl, stats=None, trust_domain=None):
        super().__init__()
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
        d.addCallbacks(lambda body: self._finish(request, 200, body), lambda f: self._failed(request, f))
        return server.NOT_DONE_YET

    async def _handle(self, request) -> dict:
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
                raise _Reject(503, f"credential not verified: {error}") from None
            except CredentialRejected as error:
                raise _Reject(401, f"credential rejected: {error}") from None
        try:
            csr = check_csr(csr_pem, identity.uri)
        except CSRRejected as error:
            raise _Reject(403 if "credential proves" in str(error) else 400, f"CSR rejected: {error}") from None
        ttl = min(requested, self._max_ttl)
        cert_pem, chain_pem = await defer.maybeDeferred(self._sign, csr, identity.uri, ttl)
        not_after = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
        log.info("signed a {ttl:.0f}s certificate for {identity} ({peer})", ttl=ttl,
                 identity=identity.uri, peer=request.getClientAddress().host)
        if self._stats is not None:
            self._stats.signed()
        return {"certificate": cert_pem.decode(), "chain": chain_pem.decode(),
                "trust_bundle": self._bundle().decode(), "not_after": not_after.isoformat()}

    def _failed(self, request, failure):
        if failure.check(_Reject):
            reason = failure.value.args[0]
            log.warn("CSR from {peer} rejected: {reason}", peer=request.getClientAddress().host, reason=reason)
            if self._stats is not None:
                self._stats.rejected(reason.split(":")[0])
            self._finish(request, failure.value.status, {"error": reason})
        else:
            log.failure("signing failed", failure)
            self._finish(request, 500, {"error": "signing failed; see the control plane log"})

    @staticmethod
    def _finish(request, status, body):
        if request.gone:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps(body).encode())
        request.finish()
