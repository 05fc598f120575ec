"""mesh.backoff: bounds, jitter, reset, and the schedules of its three users (unchanged by the move to one class)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock

from mesh.backoff import Backoff
from mesh.control.kube.reconcile import _Pace
from mesh.control.kube.watch import Reflector
from mesh.identity.agent import WorkloadAgent
from mesh.identity.ca import generate_root, to_pem
from mesh.proxy.control_client import ControlClient

LOW, HIGH = 0.0, 1.0 - 2 ** -53  # the ends of random.random()'s range


def schedule(backoff: Backoff, rng_value: float, tries: int = 9) -> list[float]:
    """The first ``tries`` delays of ``backoff`` (from its first step) with its random source fixed at ``rng_value``."""
    backoff.reset()
    backoff._rng = lambda: rng_value
    return [round(backoff.next(), 6) for _ in range(tries)]


def test_the_step_doubles_up_to_the_cap_and_each_delay_is_scaled_by_the_jitter():
    backoff = Backoff(initial=0.5, maximum=4.0, jitter=(0.5, 1.5), rng=lambda: 0.5)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert schedule(Backoff(0.5, 4.0, jitter=(0.5, 1.5)), LOW, 5) == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert schedule(Backoff(0.5, 4.0, jitter=(0.5, 1.5)), HIGH, 5) == [0.75, 1.5, 3.0, 6.0, 6.0]
    tripling = Backoff(1.0, 100.0, factor=3.0, jitter=(1.0, 1.0))
    assert [tripling.next() for _ in range(6)] == [1.0, 3.0, 9.0, 27.0, 81.0, 100.0]


def test_delays_stay_within_bounds_with_a_real_random_source():
    backoff = Backoff(0.2, 10.0, jitter=(0.5, 1.0), rng=random.Random(7).random)
    delays = [backoff.next() for _ in range(200)]
    assert all(0.1 <= delay <= 10.0 for delay in delays)
    assert len({round(delay, 9) for delay in delays[10:]}) > 150, "capped delays are still jittered"


def test_reset_goes_back_to_the_first_step():
    backoff = Backoff(0.5, 30.0, jitter=(1.0, 1.0))
    for _ in range(10):
        backoff.next()
    backoff.reset()
    assert [backoff.next(), backoff.next()] == [0.5, 1.0]


def test_the_same_random_source_gives_the_same_delays():
    first, second = (Backoff(1.0, 60.0, jitter=(0.8, 1.2), rng=random.Random(11).random) for _ in range(2))
    assert [first.next() for _ in range(8)] == [second.next() for _ in range(8)]


@pytest.mark.parametrize("kwargs", [dict(initial=0, maximum=1), dict(initial=2, maximum=1),
                                    dict(initial=1, maximum=2, factor=0.5), dict(initial=1, maximum=2, jitter=(1, 0.5)),
                                    dict(initial=1, maximum=2, jitter=(-0.1, 1))])
def test_nonsense_parameters_are_refused_with_what_was_given(kwargs):
    with pytest.raises(ValueError, match="want 0 < initial <= maximum"):
        Backoff(**kwargs)


# -- the users keep the schedules they had before mesh.backoff (figures from the code they replaced) ------------


def test_config_stream_reconnects_after_half_a_second_doubling_to_30s_jittered_50_percent():
    settings = SimpleNamespace(workload=SimpleNamespace(gateway=False, credentials_dir=None))
    client = ControlClient(Clock(), SimpleNamespace(settings=settings), ("127.0.0.1", 15012), "x", node="n")
    assert schedule(client._backoff, LOW) == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    assert schedule(client._backoff, HIGH)[-1] == 45.0


def test_certificate_renewal_retries_after_1s_doubling_to_60s_jittered_20_percent():
    _, root_cert = generate_root("cluster.local")
    agent = WorkloadAgent(Clock(), ("127.0.0.1", 15012), to_pem([root_cert]), None, None, "x", None)
    assert schedule(agent._backoff, LOW) == [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 48.0, 48.0, 48.0]
    assert schedule(agent._backoff, HIGH)[-1] == 72.0


def test_kube_watches_retry_after_a_fifth_of_a_second_doubling_to_10s_and_writers_to_30s():
    reflector = Reflector(Clock(), "pods", None, None)
    assert schedule(reflector.backoff, LOW) == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert schedule(reflector.backoff, HIGH)[:7] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0]
    assert schedule(_Pace().backoff, HIGH, 10)[-1] == 30.0
