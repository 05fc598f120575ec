"""Projected service-account tokens as bootstrap credentials: TokenReview.

In a pod, the sidecar's credential is its projected service-account token
(audience ``txmesh``, mounted by the injected spec).  :class:`TokenReviewVerifier`
asks the Kubernetes API server who it belongs to, with a TokenReview
(``authentication.k8s.io/v1``) whose ``spec.audiences`` is ``["txmesh"]``, and
accepts it only if the review says:

- ``status.authenticated`` is true,
- ``txmesh`` is among ``status.audiences`` (a token minted for another
  audience, e.g. the API server's own, proves nothing here), and
- ``status.user.username`` is ``system:serviceaccount:<namespace>:<name>``.

The identity is ``spiffe://<trust-domain>/ns/<namespace>/sa/<name>`` taken
from the review, never from the request.  The review is a blocking HTTP call,
so it runs on the reactor's thread pool, bounded by a timeout.  An API server
that cannot be reached (or answers with an error) is not the token's fault:
that is :class:`~mesh.identity.credentials.VerifierUnavailable`, which the CSR
endpoint answers with 503 so the sidecar retries.  mesh-control needs RBAC
``create`` on ``tokenreviews.authentication.k8s.io`` (deploy/base/control-plane).
"""

from __future__ import annotations

import re

from twisted.internet import threads
from zope.interface import implementer

from mesh.identity.credentials import CredentialRejected, ICredentialVerifier, VerifierUnavailable
from mesh.identity.spiffe import InvalidSpiffeId, SpiffeId
from mesh.sidecar_contract import TOKEN_AUDIENCE, TOKEN_VOLUME

REVIEW_TIMEOUT = 5.0
MAX_TOKEN_BYTES = 16384  # projected tokens are JWTs of about 1 KiB
_SERVICE_ACCOUNT = re.compile(r"^system:serviceaccount:(?P<ns>[^:]+):(?P<sa>[^:]+)$")
_MOUNT_HINT = (f"mount a projected service-account token with audience {TOKEN_AUDIENCE} (the injected "
               f"`{TOKEN_VOLUME}` volume) and pass it as --token-file")


class ReviewOutcome:
    """What a TokenReview said, reduced to the fields the decision needs."""

    def __init__(self, authenticated: bool, username: str, audiences, error: str):
        self.authenticated = authenticated
        self.username = username
        self.audiences = tuple(audiences)
        self.error = error

    @classmethod
    def of(cls, review) -> ReviewOutcome:
        """From a ``kubernetes.client.V1TokenReview`` answer."""
        status = review.status
        if status is None:
            return cls(False, "", (), "the TokenReview came back without a status")
        user = status.user
        return cls(bool(status.authenticated), (user.username if user else None) or "", status.audiences or (),
                   status.error or "")


def identity_of(outcome: ReviewOutcome, trust_domain: str) -> SpiffeId:
    """The identity a review proves, or :class:`CredentialRejected` saying what is wrong and what to do."""
    if not outcome.authenticated:
        raise CredentialRejected(_unauthenticated(outcome.error))
    if TOKEN_AUDIENCE not in outcome.audiences:
        raise CredentialRejected(f"the service-account token is not for audience {TOKEN_AUDIENCE} (the API "
                                 f"server accepted it for {list(outcome.audiences)}); {_MOUNT_HINT}")
    match = _SERVICE_ACCOUNT.match(outcome.username)
    if match is None:
        raise CredentialRejected(f"the token belongs to {outcome.username!r}, not to a service account; "
                                 f"{_MOUNT_HINT}")
    try:
        return SpiffeId.parse(SpiffeId(trust_domain, match["ns"], match["sa"]).uri)
    except InvalidSpiffeId as error:
        raise CredentialRejected(f"service account {match['ns']}/{match['sa']} has no valid SPIFFE id: {error}") \
            from None


def _unauthenticated(error: str) -> str:
    """Why the API server refused a token, in words that say what to do."""
    if "expired" in error:
        hint = ("the kubelet refreshes projected tokens in place: check that the sidecar reads the mounted "
                "file, not a copy")
    elif "audience" in error:
        hint = _MOUNT_HINT
    else:
        hint = f"the token is unknown to this cluster (revoked, or from another cluster); {_MOUNT_HINT}"
    return f"the Kubernetes API server did not authenticate the service-account token ({error}); {hint}"


@implementer(ICredentialVerifier)
class TokenReviewVerifier:
    """Verifies projected service-account tokens with TokenReview (see the module docstring).

    :param api_client: a ``kubernetes.client.ApiClient`` (:func:`mesh.control.kube.client.make_api_client`).
    :param timeout: seconds for one review, after which the credential counts as unverifiable.
    """

    def __init__(self, api_client, trust_domain: str, reactor=None, timeout: float = REVIEW_TIMEOUT):
        if reactor is None:
            from twisted.internet import reactor
        self._api_client = api_client
        self._trust_domain = trust_domain
        self._reactor = reactor
        self._timeout = timeout

    def verify(self, credential):
        """A Deferred of the reviewed :class:`SpiffeId`; fails with CredentialRejected or VerifierUnavailable."""
        if not isinstance(credential, str) or not credential.strip() or len(credential) > MAX_TOKEN_BYTES:
            raise CredentialRejected(f"malformed credential: expected a service-account token (JWT) or a join "
                                     f"token; {_MOUNT_HINT}")
        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._review,
                                      credential.strip())
        d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=self._timed_out)
        d.addCallback(lambda outcome: identity_of(outcome, self._trust_domain))
        return d

    @staticmethod
    def _timed_out(result, timeout):
        """``addTimeout``'s verdict when the review took too long (``result``: the cancellation)."""
        raise VerifierUnavailable(f"the Kubernetes API server did not answer the TokenReview within "
                                  f"{timeout:g}s; the sidecar retries")

    def _review(self, token: str) -> ReviewOutcome:
        """One TokenReview round trip (in a thread)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        body = client.V1TokenReview(api_version="authentication.k8s.io/v1", kind="TokenReview",
                                    spec=client.V1TokenReviewSpec(token=token, audiences=[TOKEN_AUDIENCE]))
        try:
            review = client.AuthenticationV1Api(self._api_client).create_token_review(
                body, _request_timeout=self._timeout)
        except ApiException as error:
            raise VerifierUnavailable(_api_error(error)) from None
        except (HTTPError, OSError) as error:
            raise VerifierUnavailable(f"the Kubernetes API server at {self._api_client.configuration.host} is "
                                      f"unreachable ({type(error).__name__}); the sidecar retries") from None
        return ReviewOutcome.of(review)


def _api_error(error) -> str:
    """The message for a TokenReview the API server refused to perform (not a verdict on the token)."""
    if error.status in (401, 403):
        return (f"mesh-control may not create TokenReviews ({error.status} {error.reason}); grant its service "
                "account `create` on tokenreviews.authentication.k8s.io (deploy/base/control-plane/rbac.yaml)")
    return f"the Kubernetes API server failed the TokenReview ({error.status} {error.reason}); the sidecar retries"
