"""The outlier stage: passive health checking, eject endpoints that keep failing.

Follows Envoy/Istio outlier detection (Envoy's ``outlier_detection_impl``, local-origin errors not split
from 5xx, as Istio configures it):

- a 5xx response, a connect failure, a per-try or route timeout (a 504) and an upstream reset (the
  endpoint accepted the connection, then reset or closed it before a response: a 503) each add to the
  ``consecutive5xxErrors`` streak;
- 502/503/504, connect failures, timeouts and resets add to the ``consecutiveGatewayErrors`` streak,
  and any other 5xx (a 500) ends it;
- anything else (a response below 500, a routed TCP connection made) ends every streak;
- txmesh's own rule: a connect failure ejects at once (``consecutive_connect_failures``, 1), unless
  ``consecutive5xxErrors`` is 0, which switches both off (Envoy counts a connect failure as a 5xx).

A streak that reaches its threshold ejects the endpoint, never more than ``max_ejection_percent`` of
a cluster (but always at least one endpoint), for ``base_ejection_time x multiplier``, at most
:attr:`~mesh.config.tables.OutlierPolicy.max_ejection_time` (Envoy's ``max_ejection_time`` default:
300 s, or the base ejection time if longer).  The multiplier (Envoy's ejection time backoff) grows by
one with each ejection, until the ejection time would pass the maximum by a base time, and goes down
by one for each ``interval`` the endpoint then spends un-ejected without a new ejection.  Envoy
counts that down at its interval timer; here it is worked out at the next ejection, from the time the
last ejection ended (``ejected_until``): nothing on the request path, no timer per endpoint.  Failures
reported while an endpoint is ejected (tries already in flight, or every endpoint ejected) do not add
to its streaks: Envoy resets them when it un-ejects the endpoint.

The exchange reports each try here: :func:`response` when the response head
arrives, :func:`try_failed` when a try fails without one (or its deadline
passes first).  A routed TCP connection (:mod:`mesh.proxy.tcp_proxy`) reports
:func:`connected` or a connect failure (:func:`record_failure`).  A circuit
breaker's overflow (``UO``) is a local reply, never a try: it is not the
endpoint's fault and is not reported.
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

    Each counts as Envoy's router reports it: a connect failure, a timeout (the per-try or the route's,
    as a 504) and a reset (the connection or stream broke, as a 503: a 5xx and a gateway error).
    """
    if kind == "connect-failure":
        record_failure(endpoint, cluster, now, connect_failure=True)
    elif kind == "timeout":
        record_failure(endpoint, cluster, now, status=504)
    elif kind == "reset":
        record_failure(endpoint, cluster, now, status=503)


def record_failure(endpoint, cluster, now: float, status: int = 0, connect_failure: bool = False) -> bool:
    """Count a failed try; eject the endpoint if a threshold is hit.

    ``status`` is the upstream's 5xx status, or the one Envoy counts for a
    local-origin failure (0 for a connect failure).  Returns True if the
    endpoint was ejected.
    """
    endpoint.total_failures += 1
    if endpoint.ejected_until > now:
        return False  # already ejected: Envoy clears the streaks when the ejection ends
    policy = cluster.spec.outlier
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
    elif status >= 500:
        endpoint.consecutive_gateway = 0  # a 5xx that is no gateway error ends that streak (Envoy)
    if not tripped:
        return False
    ejected = _may_eject(cluster, now)
    if ejected:
        _eject(endpoint, policy, now)
    # The streaks start again whether or not maxEjectionPercent let the ejection happen: Envoy's
    # onConsecutiveErrorWorker resets the counter after ejectHost either way.
    endpoint.consecutive_5xx = endpoint.consecutive_gateway = 0
    endpoint.consecutive_connect_failures = 0
    return ejected


def _eject(endpoint, policy, now: float) -> None:
    """Eject for ``base x multiplier`` (at most the maximum), as Envoy's ``ejectHost``/``checkHostForUneject``.

    The multiplier first loses one for each whole ``interval`` since the last ejection ended (Envoy's
    decrement of a healthy host's backoff at each interval tick), then gains one unless the ejection
    time is already past the maximum by a base time.
    """
    base = policy.base_ejection_time
    longest = policy.max_ejection_time
    multiplier = endpoint.ejection_multiplier
    if multiplier:
        healthy_for = now - endpoint.ejected_until
        multiplier = max(0, multiplier - int(healthy_for // policy.interval))
    if multiplier * base < longest + base:
        multiplier += 1
    endpoint.ejection_multiplier = multiplier
    endpoint.eject(now + min(base * multiplier, longest))


def _may_eject(cluster, now: float) -> bool:
    endpoints = cluster.endpoints
    ejected = sum(1 for endpoint in endpoints if endpoint.ejected_until > now)
    allowed = max(1, len(endpoints) * cluster.spec.outlier.max_ejection_percent // 100)
    return ejected < allowed
