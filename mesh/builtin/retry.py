"""Built-in retry policy: Istio's ``retries`` with Envoy's retry conditions.

A try is retried while ``attempt <= policy.attempts`` (Istio's ``attempts``
counts retries, not tries) and the failure is one the policy's ``retryOn``
names.  Backoff is Envoy's fully jittered exponential (:func:`backoff_delay`):
a random delay in ``[0, min(10 * base, base * 2**(attempt-1)))``, with Envoy's
base of 25 ms (``RetryPolicy.backoff_base``) and maximum of ten times the base.

The gRPC conditions (``cancelled``, ``deadline-exceeded``, ``internal``,
``resource-exhausted``, ``unavailable``) are met by the ``grpc-status`` of a
Trailers-Only response (``outcome.grpc_status``), as Envoy's: a status that
comes in trailers, after the response started, is never retried.
"""

import random

from mesh import hookimpl
from mesh.api import GIVE_UP

#: retryOn names that cover each kind of non-status failure, as Envoy's ``wouldRetryFromReset``: ``reset``,
#: ``5xx`` and ``gateway-error`` cover any reset (a connect failure, a reset or closed connection, a per-try
#: timeout, since each ends in a 5xx); ``connect-failure`` covers a connect failure only.
_COVERS = {
    "connect-failure": frozenset({"connect-failure", "reset", "5xx", "gateway-error"}),
    "reset": frozenset({"reset", "5xx", "gateway-error"}),
    "timeout": frozenset({"reset", "5xx", "gateway-error"}),
}


#: The retryOn name of each gRPC status it covers.
_GRPC_CONDITIONS = {1: "cancelled", 4: "deadline-exceeded", 8: "resource-exhausted", 13: "internal",
                    14: "unavailable"}


def should_retry(outcome, policy) -> bool:
    """Does ``policy.retry_on`` cover this failed try?"""
    retry_on = policy.retry_on
    if outcome.kind != "status":
        return not retry_on.isdisjoint(_COVERS[outcome.kind])
    if outcome.grpc_status is not None and _GRPC_CONDITIONS.get(outcome.grpc_status) in retry_on:
        return True
    status = outcome.status
    if status in policy.retry_status_codes:
        return True
    if status >= 500:
        return "5xx" in retry_on or (status in (502, 503, 504) and "gateway-error" in retry_on)
    return status == 409 and "retriable-4xx" in retry_on


def backoff_delay(attempt: int, base: float, rng=random.random) -> float:
    """Seconds to wait before the retry that follows try number ``attempt`` (1 for the first try).

    Envoy's ``JitteredExponentialBackOffStrategy``: full jitter, uniformly in
    ``[0, min(max, base * 2**(attempt-1)))`` with ``max`` ten times ``base``
    (25 ms and 250 ms by default).  ``rng`` returns a float in ``[0, 1)``.
    """
    return rng() * min(base * 10, base * 2 ** min(attempt - 1, 4))  # 2**4 > 10: past it, the cap


@hookimpl
def mesh_retry_decision(ctx, attempt, outcome, policy):
    """Retry with jittered backoff while the policy allows it."""
    if policy is None or attempt > policy.attempts or not should_retry(outcome, policy):
        return GIVE_UP
    return backoff_delay(attempt, policy.backoff_base)
