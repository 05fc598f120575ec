"""TokenReview (authentication.k8s.io/v1) of the test Kubernetes API server.

Tests register projected service-account tokens with :meth:`Tokens.add`; :meth:`Tokens.review` answers a
TokenReview as the real API server does: ``status.authenticated`` true with the service account's user,
groups and the audiences that matched, or false with ``status.error``. A review that names no
``spec.audiences`` is checked against the API server's own audience, so a token minted for ``txmesh``
does not pass it (real servers behave the same way).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

#: The API server's own audience (``--api-audiences``' default on a kubeadm cluster).
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class Token:
    """A registered token: who it proves, for which audiences, until when (epoch seconds)."""

    namespace: str
    service_account: str
    audiences: tuple[str, ...]
    expires_at: float


class Tokens:
    """The tokens the server recognises, and TokenReview over them."""

    def __init__(self, clock=time.time):
        self._clock = clock
        self._tokens: dict[str, Token] = {}

    def add(self, token: str, namespace: str, service_account: str, audiences=("txmesh",),
            expires_in: float = 3600.0) -> Token:
        """Recognise *token* from now on (``expires_in`` may be negative: already expired)."""
        self._tokens[token] = Token(namespace, service_account, tuple(audiences), self._clock() + expires_in)
        return self._tokens[token]

    def review(self, review: dict) -> dict:
        """The TokenReview *review* (a request body) with its ``status`` filled in."""
        spec = review.get("spec") or {}
        wanted = list(spec.get("audiences") or [API_AUDIENCE])
        status = self._status(spec.get("token") or "", wanted)
        metadata = {**(review.get("metadata") or {}), "creationTimestamp": None}
        return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": metadata,
                "spec": spec, "status": status}

    def _status(self, token: str, wanted: list[str]) -> dict:
        known = self._tokens.get(token)
        if known is None:
            return {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
        if known.expires_at <= self._clock():
            return {"user": {}, "error": "[invalid bearer token, service account token has expired]"}
        matched = [audience for audience in wanted if audience in known.audiences]
        if not matched:
            return {"user": {}, "error": f"[invalid bearer token, token audiences {list(known.audiences)!r} is "
                                         f"invalid for the target audiences {wanted!r}]".replace("'", '"')}
        namespace, account = known.namespace, known.service_account
        return {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{namespace}:{account}",
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"serviceaccount/{namespace}/{account}")),
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            },
            "audiences": matched,
        }
