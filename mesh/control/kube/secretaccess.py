"""May a gateway read its namespace's Secrets?  A SubjectAccessReview, as istiod asks before SDS.

A gateway proxy gets the ``credentialName`` Secrets of its namespace (see
:mod:`mesh.control.kube.secrets`) only if the API server says its service account may
``get`` ``secrets`` there: :class:`SecretAccess` sends a SubjectAccessReview
(``authorization.k8s.io/v1``) for user ``system:serviceaccount:NS:SA``, verb ``get``,
resource ``secrets``, namespace ``NS``.  The review is a blocking HTTP call, so it runs on
the reactor's thread pool (as :mod:`mesh.control.kube.tokenreview`'s), bounded by a timeout.

Verdicts are cached per ``(namespace, service account)`` for ``ttl`` seconds.  While none is
known the answer is None (no credentials); a verdict that arrives and differs from the one
before, and the expiry of a verdict, call ``on_change`` (the Distributor's ``changed``): the
push round that follows asks again for the gateways still connected, keeping the expired
verdict until the new one comes, so an unchanged permission does not make a gateway drop
its keys.  A failed review (API server unreachable, mesh-control lacking RBAC ``create`` on
``subjectaccessreviews.authorization.k8s.io``) is logged and retried after ``ttl``.
"""

from __future__ import annotations

from twisted.internet import threads
from twisted.logger import Logger

log = Logger()

REVIEW_TIMEOUT = 5.0
DEFAULT_TTL = 60.0


def denied_reason(namespace: str, service_account: str, verdict) -> str:
    """Why a gateway of ``namespace``/``service_account`` gets no Secrets (``verdict``: False or None)."""
    grant = (f"grant service account {namespace}/{service_account} `get` on `secrets` in namespace {namespace} "
             "(a Role and a RoleBinding, docs/kubernetes.md \"Gateway service accounts\")")
    if verdict is None:
        return (f"mesh-control has no SubjectAccessReview verdict yet for service account "
                f"{namespace}/{service_account}: the gateway gets its credentialName Secrets once the API "
                f"server allows it; if this stays, {grant}")
    return (f"the service account {namespace}/{service_account} may not get Secrets in namespace {namespace} "
            f"(SubjectAccessReview), so mesh-control sends this gateway no credentialName Secret: {grant}")


class SecretAccess:
    """``(namespace, service account) -> True / False / None``: the cached SubjectAccessReview verdict.

    :param api_client: a ``kubernetes.client.ApiClient``.
    :param on_change: called on the reactor thread when a verdict changes or expires.
    :param ttl: seconds a verdict is used before it is asked again.
    """

    def __init__(self, reactor, api_client, on_change, ttl: float = DEFAULT_TTL, timeout: float = REVIEW_TIMEOUT):
        self._reactor = reactor
        self._api_client = api_client
        self._on_change = on_change
        self.ttl = ttl
        self._timeout = timeout
        self._verdicts = {}  # (namespace, service account) -> (allowed, expires at)
        self._asking = set()  # the keys with a review in flight
        self._timers = {}  # key -> the DelayedCall of its expiry

    def __call__(self, namespace: str, service_account: str):
        """The verdict for the pair (None while unknown); asks the API server when unknown or expired."""
        key = (namespace, service_account)
        verdict = self._verdicts.get(key)
        if (verdict is None or verdict[1] <= self._reactor.seconds()) and key not in self._asking:
            self._ask(key)
        return None if verdict is None else verdict[0]

    def stop(self) -> None:
        """Cancel the expiry timers (mesh-control stops)."""
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def _ask(self, key) -> None:
        self._asking.add(key)
        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._review, *key)
        d.addTimeout(self._timeout, self._reactor)
        d.addCallbacks(lambda allowed: self._verdict(key, allowed), lambda failure: self._failed(key, failure))

    def _verdict(self, key, allowed: bool) -> None:
        self._asking.discard(key)
        before = self._verdicts.get(key)
        self._verdicts[key] = (allowed, self._reactor.seconds() + self.ttl)
        self._expire_later(key)
        if before is not None and before[0] == allowed:
            return
        if not allowed:
            log.warn("gateway Secrets withheld: {reason}", reason=denied_reason(*key, False))
        elif before is not None:
            log.info("service account {namespace}/{sa} may now get Secrets: its gateways get their "
                     "credentialName Secrets", namespace=key[0], sa=key[1])
        self._on_change()

    def _failed(self, key, failure) -> None:
        self._asking.discard(key)
        log.warn("SubjectAccessReview for service account {namespace}/{sa} failed ({error}); asked again in "
                 "{ttl:g}s", namespace=key[0], sa=key[1], error=failure.getErrorMessage() or failure.type.__name__,
                 ttl=self.ttl)
        self._expire_later(key)

    def _expire_later(self, key) -> None:
        """Call ``on_change`` when ``key``'s verdict expires: the push round asks again."""
        timer = self._timers.get(key)
        if timer is not None and timer.active():
            timer.cancel()
        self._timers[key] = self._reactor.callLater(self.ttl, self._expired, key)

    def _expired(self, key) -> None:
        self._timers.pop(key, None)
        self._on_change()

    def _review(self, namespace: str, service_account: str) -> bool:
        """One SubjectAccessReview round trip (in a thread): may the service account get Secrets?"""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        body = client.V1SubjectAccessReview(
            api_version="authorization.k8s.io/v1", kind="SubjectAccessReview",
            spec=client.V1SubjectAccessReviewSpec(
                user=f"system:serviceaccount:{namespace}:{service_account}",
                groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
                resource_attributes=client.V1ResourceAttributes(namespace=namespace, verb="get", group="",
                                                                resource="secrets")))
        try:
            review = client.AuthorizationV1Api(self._api_client).create_subject_access_review(
                body, _request_timeout=self._timeout)
        except ApiException as error:
            if error.status in (401, 403):
                raise RuntimeError(f"mesh-control may not create SubjectAccessReviews ({error.status} "
                                   f"{error.reason}); grant its service account `create` on "
                                   "subjectaccessreviews.authorization.k8s.io (deploy/base/control-plane/"
                                   "rbac.yaml)") from None
            raise RuntimeError(f"the API server answered {error.status} {error.reason}") from None
        return bool(review.status is not None and review.status.allowed)
