"""Envoy's retry budget per cluster (mesh.proxy.retry.budget_limit, RetryBudget)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.python import usage

from mesh.proxy.listener import Limits
from mesh.proxy.retry import RetryBudget, budget_limit
from mesh.proxy.tap import Options, makeService


@pytest.mark.parametrize(("active", "percent", "minimum", "limit"), [
    (0, 20.0, 3, 3),      # a lone request: the minimum concurrency
    (10, 20.0, 3, 3),     # 20 % of 10 is 2: still the minimum
    (20, 20.0, 3, 4),
    (24, 20.0, 3, 4),     # rounded down, as Envoy's
    (100, 20.0, 3, 20),
    (100, 25.0, 0, 25),
    (5, 0.0, 0, 0),       # no budget at all: no retry
    (7, 100.0, 3, 7),
])
def test_budget_is_a_percentage_of_active_requests_with_a_floor(active, percent, minimum, limit):
    assert budget_limit(active, percent, minimum) == limit


def _endpoints(*active):
    return [SimpleNamespace(active_requests=count) for count in active]


def test_retries_in_flight_stop_at_the_budget_and_refusals_are_counted():
    budget, limits = RetryBudget(), Limits()  # Envoy's defaults: 20 %, at least 3
    endpoints = _endpoints(10, 15)            # 25 tries in flight: 5 retries
    assert [budget.acquire(endpoints, limits) for _ in range(7)] == [True] * 5 + [False] * 2
    assert (budget.retries, budget.exhausted) == (5, 2)
    budget.release()
    assert budget.acquire(endpoints, limits)
    assert budget.acquire(_endpoints(100), limits)  # more load, more room
    assert (budget.retries, budget.exhausted) == (6, 2)


def test_a_lone_request_keeps_its_retries():
    budget, limits = RetryBudget(), Limits()
    assert all(budget.acquire(_endpoints(1), limits) for _ in range(3))
    assert not budget.acquire(_endpoints(1), limits)


def test_the_budget_options_reach_the_limits_and_refuse_negative_values(tmp_path):
    base = ["--config-dir", str(tmp_path), "--workload", "w"]
    options = Options()
    options.parseOptions(base)
    limits = makeService(options).settings.limits
    assert (limits.retry_budget_percent, limits.retry_budget_min_concurrency) == (20.0, 3)
    options = Options()
    options.parseOptions([*base, "--retry-budget-percent", "50", "--retry-budget-min-concurrency", "0"])
    limits = makeService(options).settings.limits
    assert (limits.retry_budget_percent, limits.retry_budget_min_concurrency) == (50.0, 0)
    with pytest.raises(usage.UsageError, match="0 or more; got -1.0 and 3"):
        Options().parseOptions([*base, "--retry-budget-percent", "-1"])
