"""The peak-EWMA plugin's cost (plugins/txmesh-peak-ewma): peaks at once, decays with time, also on read."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

peak_ewma = pytest.importorskip("txmesh_peak_ewma",
                                reason="the example plugin (pip install -e plugins/txmesh-peak-ewma)")


def endpoint(active=0):
    return SimpleNamespace(state={}, active_requests=active)


def test_a_slow_observation_counts_at_once_and_load_multiplies_the_cost():
    fast, slow = endpoint(), endpoint()
    peak_ewma.observe(fast, 0.001, now=100.0)
    peak_ewma.observe(slow, 0.200, now=100.0)
    assert peak_ewma._score(fast, 0.001, 100.0) == pytest.approx(0.001)
    assert peak_ewma._score(slow, 0.001, 100.0) == pytest.approx(0.200)
    fast.active_requests = 3
    assert peak_ewma._score(fast, 0.001, 100.0) == pytest.approx(0.004)


def test_an_idle_slow_endpoint_becomes_cheap_again_and_is_retried():
    """Read later, a cost has decayed by the time since its last observation (Finagle/Linkerd): a busy fast
    endpoint, observed all along, is eventually dearer than one that was slow once, long ago."""
    fast, slow = endpoint(), endpoint()
    peak_ewma.observe(slow, 0.200, now=0.0)
    decay = peak_ewma.DECAY
    for tick in range(int(10 * decay)):
        peak_ewma.observe(fast, 0.005, now=float(tick))
    now = 10 * decay
    assert peak_ewma._score(slow, 0.001, now) < peak_ewma._score(fast, 0.001, now)
    assert peak_ewma._score(slow, 0.001, 1.0) > peak_ewma._score(fast, 0.001, 1.0)
