"""Bootstrap credentials: how a caller proves which workload it is.

The CSR endpoint asks an :class:`ICredentialVerifier` who the bearer of a
credential is.  Outside Kubernetes that is a join token
(:class:`JoinTokenVerifier`); in Kubernetes a projected service-account token
checked with a TokenReview plugs in behind the same interface.
"""

from __future__ import annotations

import time

from zope.interface import Interface, implementer

from mesh.identity.spiffe import SpiffeId
from mesh.identity.tokens import TokenError, is_join_token, verify_token

#: Join tokens whose identity :class:`JoinTokenVerifier` keeps (the whole set is dropped when full).
VERIFIED_TOKENS = 4096


class CredentialRejected(Exception):
    """The credential does not prove an identity; the message says why."""


class VerifierUnavailable(CredentialRejected):
    """The credential could not be checked now (its verifier, e.g. the Kubernetes API, is unreachable).

    Nothing is wrong with the credential as far as anyone knows: the caller
    should retry with the same one (the CSR endpoint answers 503).
    """


class ICredentialVerifier(Interface):
    """Turns a bootstrap credential into the identity it proves."""

    def verify(credential):
        """Return a :class:`mesh.identity.spiffe.SpiffeId` (or a Deferred of one).

        Raise (or fail with) :class:`CredentialRejected` when the credential
        proves nothing, :class:`VerifierUnavailable` when it cannot be checked now.
        """


@implementer(ICredentialVerifier)
class JoinTokenVerifier:
    """Verifies join tokens from ``meshctl token create``.

    A token may be presented many times (every sidecar started with it, every restart): the identity
    of a token whose signature was checked is kept, by the exact token string, until the token
    expires (at most :data:`VERIFIED_TOKENS` of them), so that it is not checked again per CSR.
    Expiry is checked at every use, with the same answer as :func:`mesh.identity.tokens.verify_token`.
    """

    def __init__(self, key: bytes, trust_domain: str, clock=time.time):
        self._key = key
        self._trust_domain = trust_domain
        self._clock = clock
        self._verified = {}  # token -> (expires, SpiffeId)

    def verify(self, credential):
        now = self._clock()
        known = self._verified.get(credential) if isinstance(credential, str) else None  # JSON may give any type
        if known is not None:
            if known[0] > now:
                return known[1]
            del self._verified[credential]
        try:
            claims = verify_token(self._key, credential, self._trust_domain, now)
        except TokenError as error:
            raise CredentialRejected(str(error)) from None
        identity = SpiffeId(self._trust_domain, claims.namespace, claims.service_account)
        if len(self._verified) >= VERIFIED_TOKENS:
            self._verified.clear()
        self._verified[credential] = (claims.expires, identity)
        return identity


@implementer(ICredentialVerifier)
class DispatchingVerifier:
    """Join tokens (``txm1.`` prefix) go to one verifier, every other credential to another.

    ``mesh-control --kubernetes`` accepts both: join tokens for workloads
    outside the cluster, projected service-account tokens (TokenReview) for pods.
    """

    def __init__(self, join_tokens, other):
        self._join_tokens = join_tokens
        self._other = other

    def verify(self, credential):
        verifier = self._join_tokens if is_join_token(credential) else self._other
        return verifier.verify(credential)
