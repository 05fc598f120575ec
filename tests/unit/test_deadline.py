"""The deadline stage (mesh.proxy.deadline): one timer per connection serves all its exchanges."""

from twisted.internet.task import Clock

from mesh.proxy.deadline import Deadlines


class Exchange:
    """Records when its deadline passed."""

    def __init__(self, clock):
        self.clock = clock
        self.passed_at = None

    def deadline_passed(self):
        self.passed_at = self.clock.seconds()


def test_a_deadline_passes_once_at_its_time_unless_cleared():
    clock = Clock()
    deadlines = Deadlines(clock)
    first = Exchange(clock)
    deadlines.set(first, 5.0)
    clock.advance(4.9)
    assert first.passed_at is None
    clock.advance(0.1)
    assert first.passed_at == 5.0 and not clock.getDelayedCalls()
    cleared = Exchange(clock)
    deadlines.set(cleared, 1.0)
    deadlines.clear(cleared)
    clock.advance(2.0)
    assert cleared.passed_at is None and not clock.getDelayedCalls()


def test_one_pending_call_is_reused_and_rearms_for_the_current_exchange():
    clock = Clock()
    deadlines = Deadlines(clock)
    first, second = Exchange(clock), Exchange(clock)
    deadlines.set(first, 2.0)
    clock.advance(1.0)
    deadlines.clear(first)
    deadlines.set(second, 3.0)  # due at 4.0: the call due at 2.0 is kept, not replaced
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1.0)  # 2.0: the old call fires and re-arms itself for what is left
    assert second.passed_at is None and len(clock.getDelayedCalls()) == 1
    clock.advance(2.0)
    assert (first.passed_at, second.passed_at) == (None, 4.0)


def test_an_earlier_deadline_replaces_the_pending_call_and_stop_cancels_it():
    clock = Clock()
    deadlines = Deadlines(clock)
    late, soon = Exchange(clock), Exchange(clock)
    deadlines.set(late, 10.0)
    deadlines.clear(late)
    deadlines.set(soon, 1.0)
    assert [call.getTime() for call in clock.getDelayedCalls()] == [1.0]
    clock.advance(1.0)
    assert soon.passed_at == 1.0
    deadlines.set(late, 5.0)
    deadlines.stop()
    assert not clock.getDelayedCalls()


def test_ends_before_tells_a_retry_whether_its_backoff_outlives_the_deadline():
    clock = Clock()
    deadlines = Deadlines(clock)
    exchange, other = Exchange(clock), Exchange(clock)
    assert not deadlines.ends_before(exchange, 100.0)  # no deadline: a retry may always start
    deadlines.set(exchange, 1.0)
    clock.advance(0.5)
    assert not deadlines.ends_before(exchange, 0.5 + 0.25)  # the backoff ends first: retry
    assert deadlines.ends_before(exchange, 0.5 + 0.5)       # the deadline comes first: no retry
    assert not deadlines.ends_before(other, 10.0)           # another exchange's deadline is not ours
    deadlines.clear(exchange)
    assert not deadlines.ends_before(exchange, 10.0)


def test_the_exchanges_of_many_streams_share_one_pending_call():
    """HTTP/2: each exchange's deadline passes at its own time, with one pending call at a time."""
    clock = Clock()
    deadlines = Deadlines(clock)
    first, second, third, fourth = (Exchange(clock) for _ in range(4))
    deadlines.set(first, 2.0)
    deadlines.set(second, 5.0)
    deadlines.set(third, 3.0)
    deadlines.set(fourth, 3.0)
    assert len(clock.getDelayedCalls()) == 1
    deadlines.clear(first)
    clock.advance(2.0)  # the call for first finds nothing due, and re-arms for the earliest left
    assert [call.getTime() for call in clock.getDelayedCalls()] == [3.0]
    clock.advance(1.0)
    assert (third.passed_at, fourth.passed_at, second.passed_at) == (3.0, 3.0, None)
    clock.advance(2.0)
    assert (first.passed_at, second.passed_at) == (None, 5.0) and not clock.getDelayedCalls()


def test_an_exchange_may_set_a_deadline_when_its_own_passes():
    clock = Clock()
    deadlines = Deadlines(clock)
    later = Exchange(clock)

    class Chaining(Exchange):
        def deadline_passed(self):
            super().deadline_passed()
            deadlines.set(later, 1.0)

    chaining = Chaining(clock)
    deadlines.set(chaining, 1.0)
    clock.advance(1.0)
    assert chaining.passed_at == 1.0 and len(clock.getDelayedCalls()) == 1
    clock.advance(1.0)
    assert later.passed_at == 2.0
