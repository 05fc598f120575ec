"""The backoff between tries (mesh.builtin.retry.backoff_delay): Envoy's fully jittered exponential."""

from __future__ import annotations

import pytest

from mesh.builtin.retry import backoff_delay

BASE = 0.025  # Envoy's default base interval; its maximum is ten times that


@pytest.mark.parametrize(("attempt", "bound"), [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25),
                                                (6, 0.25), (40, 0.25)])
def test_the_window_doubles_from_the_base_up_to_ten_times_the_base(attempt, bound):
    assert backoff_delay(attempt, BASE, rng=lambda: 0.0) == 0.0
    assert backoff_delay(attempt, BASE, rng=lambda: 0.5) == pytest.approx(bound / 2)
    top = backoff_delay(attempt, BASE, rng=lambda: 1.0 - 2 ** -53)  # random.random's largest value
    assert top < bound and top == pytest.approx(bound)


def test_full_jitter_spreads_over_the_whole_window():
    import random
    rng = random.Random(7).random
    delays = [backoff_delay(3, BASE, rng=rng) for _ in range(2000)]
    assert all(0.0 <= delay < 0.1 for delay in delays)
    assert min(delays) < 0.005 and max(delays) > 0.095  # not a narrow band around the step
