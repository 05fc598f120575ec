"""The retry stage: whether a failed try is tried again, and what the client gets when not.

The exchange asks here after every failed try (a connect failure, a reset,
a per-try timeout, a 4xx/5xx head):

- :func:`free_retry`: a pooled connection the upstream had already closed is
  tried again on a fresh one without spending a retry, as browsers and Envoy do;
  so is an HTTP/2 stream the upstream refused (REFUSED_STREAM, GOAWAY).
- :func:`retry_delay`: ``mesh_retry_decision`` (the route's retry policy,
  :mod:`mesh.builtin.retry` by default) says whether and after how long.
- :class:`RetryBudget`: a retry the policy allows is made only while the
  cluster's retries in flight stay within Envoy's retry budget
  (:func:`budget_limit`); a refused retry leaves the client its failure.
- :func:`failure_reply`: the local reply to a last try that failed.

Only a replayable request is retried: no upgrade, and a body that fitted in
the exchange's replay buffer (``--retry-buffer``).
"""

from __future__ import annotations


def free_retry(outcome, reused: bool, got_head: bool, refused=None) -> bool:
    """Whether a failed try is retried for free: a pooled connection the upstream had
    already closed, or an HTTP/2 stream it refused (``refused`` True: never processed).
    ``refused`` False (an HTTP/2 stream the upstream may have processed) never is."""
    if refused is not None:
        return refused and outcome.kind == "reset"
    return outcome.kind == "reset" and reused and not got_head


def retry_delay(listener, ctx, policy, outcome):
    """Seconds before the next try (``0`` or more), or None to give up.

    Raises :class:`mesh.plugins.PluginError` when the retry plugin failed.
    """
    delay = listener.retry_decision(ctx=ctx, attempt=ctx.attempts, outcome=outcome, policy=policy)
    if delay is None or delay is False:
        return None
    return delay


def budget_limit(active: int, percent: float, min_concurrency: int) -> int:
    """Retries that may be in flight at once in a cluster with ``active`` tries in flight.

    Envoy's ``retry_budget``: ``percent`` of the active requests (rounded down),
    but never fewer than ``min_concurrency``, so a lone request is still retried.
    """
    return max(min_concurrency, int(active * percent / 100))


class RetryBudget:
    """The retries in flight to one cluster from this sidecar (Envoy's retry budget).

    A retry holds its place from the moment it is granted (its backoff
    included) until its try fails (and the next retry, if any, asks again) or
    its exchange ends.  ``retries`` counts the places held; ``exhausted`` the
    retries refused (``mesh_upstream_rq_retry_budget_exhausted``).  Kept
    across config swaps by cluster name (:class:`mesh.proxy.clusters.ClusterManager`).
    """

    __slots__ = ("retries", "exhausted")

    def __init__(self):
        self.retries = 0
        self.exhausted = 0

    def acquire(self, endpoints, limits) -> bool:
        """Take a place for one more retry, or count the refusal: False when the budget
        (``limits.retry_budget_percent`` of the tries in flight to ``endpoints``, at least
        ``limits.retry_budget_min_concurrency``) is used up."""
        active = sum(endpoint.active_requests for endpoint in endpoints)
        if self.retries >= budget_limit(active, limits.retry_budget_percent, limits.retry_budget_min_concurrency):
            self.exhausted += 1
            return False
        self.retries += 1
        return True

    def release(self) -> None:
        """A retry that held a place has ended."""
        self.retries -= 1

    def describe(self) -> dict:
        """A JSON-ready view (admin ``/clusters``)."""
        return {"retries": self.retries, "upstream_rq_retry_budget_exhausted": self.exhausted}


#: How a connect failure's detail starts when the TLS handshake or the peer check failed
#: (:func:`mesh.proxy.mtls.setup_failure`, :mod:`mesh.proxy.tls_origination`).
TLS_FAILURE = "TLS handshake failed: "


def failure_reply(outcome, host_port):
    """``(status, flag, message, details)`` of the local reply to a failed last try.

    A TLS failure's reason joins the details as Envoy's transport failure reason does
    (``{connection_failure,TLS_error:...}``, spaces as underscores), so the access log says it.
    """
    if outcome.kind == "connect-failure":
        detail = outcome.detail
        if detail.startswith(TLS_FAILURE):
            reason = detail[len(TLS_FAILURE):].replace(" ", "_")
            return (503, "UF", f"upstream connect error ({host_port}): {detail}",
                    f"upstream_reset_before_response_started{{connection_failure,TLS_error:{reason}}}")
        return (503, "UF", f"upstream connect error ({host_port}): {detail}",
                "upstream_reset_before_response_started{connection_failure}")
    if outcome.kind == "timeout":
        return (504, "UT", f"upstream per-try timeout ({host_port}); raise perTryTimeout if this is expected",
                "upstream_per_try_timeout")
    return (503, "UC", f"upstream connection reset before response headers ({host_port}): {outcome.detail}",
            "upstream_reset_before_response_started{connection_termination}")
