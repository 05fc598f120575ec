"""The overload policy of a listener (:mod:`mesh.proxy.overload`), on stand-in connections."""

from __future__ import annotations

from mesh.proxy.overload import ConnectionOverload


class Conn:
    """What the policy sees of a connection: its last activity, whether it is idle, and drain()."""

    def __init__(self, last_activity: float, busy: bool = False):
        self.last_activity = last_activity
        self.busy = busy
        self.drained = False

    def is_idle(self) -> bool:
        return not (self.busy or self.drained)

    def drain(self) -> None:
        self.drained = True


def _admit(overload, connections) -> bool:
    """What Listener.admit does."""
    return len(connections) < overload.high_water or overload.make_room(connections)


def test_below_high_water_nothing_happens():
    overload = ConnectionOverload("outbound", 10)
    connections = {Conn(t) for t in range(8)}
    assert _admit(overload, connections)
    assert not overload.active and overload.closed_idle == 0


def test_the_longest_idle_make_room_down_to_low_water_and_busy_ones_stay():
    overload = ConnectionOverload("outbound", 10)  # high water 9, low water 8
    busy = {Conn(t, busy=True) for t in range(3)}  # the oldest of all, but busy
    idle = [Conn(t) for t in range(10, 16)]
    connections = busy | set(idle)
    assert _admit(overload, connections)
    assert overload.active
    assert [conn.drained for conn in idle] == [True, True, False, False, False, False]
    assert not any(conn.drained for conn in busy)
    assert len(connections) == 7 and overload.closed_idle == 2  # 7 + the new one = low water


def test_at_the_limit_with_nothing_idle_a_new_connection_is_refused_and_scans_wait_for_the_sweep():
    overload = ConnectionOverload("outbound", 10)
    connections = {Conn(t, busy=True) for t in range(10)}
    assert not _admit(overload, connections)
    assert overload.refused == 1
    idle = Conn(99)
    connections.discard(next(iter(connections)))
    connections.add(idle)  # something became idle: found only after the sweep allows a scan again
    assert not _admit(overload, connections) and not idle.drained
    overload.tick(len(connections))
    assert _admit(overload, connections) and idle.drained


def test_the_state_is_left_below_low_water_only():
    overload = ConnectionOverload("inbound", 10)
    connections = {Conn(t) for t in range(9)}
    _admit(overload, connections)
    overload.tick(8)
    assert overload.active
    overload.tick(7)
    assert not overload.active
    assert overload.describe(7) == {"open": 7, "limit": 10, "overloaded": False, "closed_idle": 2, "refused": 0}
