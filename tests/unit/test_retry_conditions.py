"""Which retryOn conditions retry a try that failed without a response (mesh.builtin.retry.should_retry),
as Envoy's ``RetryStateImpl::wouldRetryFromReset`` decides it."""

from __future__ import annotations

import pytest

from mesh.api import TryOutcome
from mesh.builtin.retry import should_retry
from mesh.config.tables import RetryPolicy

#: failure kind -> the retryOn conditions that retry it (Envoy: reset, 5xx and gateway-error cover every
#: reset; connect-failure only a connect failure)
RETRIED_BY = {
    "connect-failure": {"connect-failure", "reset", "5xx", "gateway-error"},
    "reset": {"reset", "5xx", "gateway-error"},
    "timeout": {"reset", "5xx", "gateway-error"},
}
CONDITIONS = ("connect-failure", "reset", "5xx", "gateway-error", "refused-stream", "retriable-4xx",
              "retriable-status-codes", "unavailable", "cancelled")


@pytest.mark.parametrize("kind", sorted(RETRIED_BY))
@pytest.mark.parametrize("condition", CONDITIONS)
def test_a_try_without_a_response_is_retried_by_envoys_conditions(kind, condition):
    policy = RetryPolicy(attempts=2, retry_on=frozenset({condition}))
    assert should_retry(TryOutcome(kind, None, "test"), policy) == (condition in RETRIED_BY[kind])
