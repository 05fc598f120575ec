"""The outlier stage: passive health checking, eject endpoints that keep failing.

Follows Envoy/Istio outlier detection: consecutive 5xx, consecutive gateway
errors (502/503/504 and connect failures) and consecutive connect failures each
eject an endpoint for ``base_ejection_time x times ejected``, never more than
``max_ejection_percent`` of a cluster (but always at least one endpoint).

The exchange reports each try here: :func:`response` when the response head
arrives, :func:`try_failed` when a try fails without one (or its deadline
passes first).  A routed TCP connection (:mod:`mesh.proxy.tcp_proxy`) reports
:func:`connected` or a connect failure (:func:`record_failure`).
"""

from __future__ import annotations


def response(endpoint, cluster, now: float, status: int) -> None:
    """A try got a response head with ``status``: a 5xx counts as a failure, anything else resets."""
    if status >= 500:
        record_failure(endpoint, cluster, now, status=status)
    else:
        connected(endpoint)


def connected(endpoint) -> None:
    """A success: a response that is no 5xx, or a routed TCP connection made (Envoy's local-origin
    success).  The endpoint's failure streaks end."""
    endpoint.consecutive_5xx = 0
    endpoint.consecutive_gateway = 0
    endpoint.consecutive_connect_failures = 0


def try_failed(endpoint, cluster, now: float, kind: str) -> None:
    """A try failed before a response head: ``kind`` is a :class:`mesh.proxy.outcome.TryOutcome` kind.

    A connect failure and a timeout (the per-try or the route's, as a 504) count; a reset does not.
    """
    if kind == "connect-failure":
        record_failure(endpoint, cluster, now, connect_failure=True)
    elif kind == "timeout":
        record_failure(endpoint, cluster, now, status=504)


def record_failure(endpoint, cluster, now: float, status: int = 0, connect_failure: bool = False) -> bool:
    """Count a failed try; eject the endpoint if a threshold is hit.

    ``status`` is the upstream's 5xx status (0 when there was none).  Returns
    True if the endpoint was ejected.
    """
    policy = cluster.spec.outlier
    endpoint.total_failures += 1
    tripped = False
    if connect_failure:
        endpoint.consecutive_connect_failures += 1
        limit = policy.consecutive_connect_failures
        tripped = limit > 0 and endpoint.consecutive_connect_failures >= limit
    if status >= 500 or connect_failure:
        endpoint.consecutive_5xx += 1
        limit = policy.consecutive_5xx
        tripped = tripped or (limit > 0 and endpoint.consecutive_5xx >= limit)
    if connect_failure or status in (502, 503, 504):
        endpoint.consecutive_gateway += 1
        limit = policy.consecutive_gateway_errors
        tripped = tripped or (limit > 0 and endpoint.consecutive_gateway >= limit)
    if tripped and endpoint.ejected_until <= now and _may_eject(cluster, now):
        endpoint.eject(now + policy.base_ejection_time * (endpoint.ejections + 1))
        endpoint.consecutive_5xx = endpoint.consecutive_gateway = 0
        endpoint.consecutive_connect_failures = 0
        return True
    return False


def _may_eject(cluster, now: float) -> bool:
    endpoints = cluster.endpoints
    ejected = sum(1 for endpoint in endpoints if endpoint.ejected_until > now)
    allowed = max(1, len(endpoints) * cluster.spec.outlier.max_ejection_percent // 100)
    return ejected < allowed
