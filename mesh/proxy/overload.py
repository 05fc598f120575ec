"""Connection overload of a listener, in the spirit of Envoy's overload manager.

A listener holds at most ``--max-connections`` client connections.  Idle
ones must not lock fresh work out until the idle timeout (300 s) frees them,
so near the limit the connections idle the longest make room:

- **Overloaded** from the moment the listener holds :data:`HIGH_WATER` of its
  limit (90 %) until it holds less than :data:`LOW_WATER` (80 %) again; a
  log line says when the state is entered and when it is left, with what was
  done meanwhile.
- At the high-water mark a new connection first makes room: the idle
  connections (nothing in flight: no request queued, no tunnel, no request
  head arriving) idle the longest are closed, enough to bring the listener
  back to the low-water mark.  Busy connections are never closed for this.
  Envoy's ``envoy.overload_actions.reduce_timeouts`` action has the same
  effect (it shortens the idle timeout as the connection count nears its
  maximum, so the longest idle go first).
- Only at the limit itself, with nothing idle left to close, is a new
  connection refused (Envoy's ``downstream_cx_overflow``).  A listener full
  of busy connections is scanned for idle ones at most once per timer sweep
  (a second), so a flood of new connections costs a length check each.

:func:`connection_limit` fits ``--max-connections`` into the file-descriptor
limit at start-up (each client connection may hold an upstream one).
"""

from __future__ import annotations

import heapq
from operator import attrgetter

from twisted.logger import Logger

log = Logger()

#: Fraction of the limit at which idle connections start being closed.
HIGH_WATER = 0.9
#: Fraction of the limit they are closed down to, and below which the listener is no longer overloaded.
LOW_WATER = 0.8

#: File descriptors a client connection may hold: its own and its upstream connection's.
FDS_PER_CONNECTION = 2
#: File descriptors kept for everything else: the other ports, the control-plane stream, log files, DNS.
FD_RESERVE = 256
#: Below this many connections per listener a sidecar is of no use: start-up stops instead.
MIN_CONNECTIONS = 16

_last_activity = attrgetter("last_activity")


def connection_limit(requested: int, listeners: int, fd_limit: int) -> int:
    """The per-listener connection limit: ``requested``, or less when ``listeners`` of them would not fit
    in ``fd_limit`` file descriptors (see :data:`FDS_PER_CONNECTION`, :data:`FD_RESERVE`)."""
    fits = (fd_limit - FD_RESERVE) // (FDS_PER_CONNECTION * listeners)
    return max(0, min(requested, fits))


class ConnectionOverload:
    """The overload state and counters of one listener's connections (see the module docstring).

    :param direction: the listener's name in log lines and metrics.
    :param limit: its ``max_connections``.

    A connection in the listener's set has ``last_activity`` (reactor
    seconds), ``is_idle()`` and ``drain()`` (which closes an idle one).
    """

    def __init__(self, direction: str, limit: int):
        self.direction = direction
        self.limit = limit
        self.high_water = max(1, int(limit * HIGH_WATER))
        self.low_water = min(int(limit * LOW_WATER), self.high_water - 1)
        self.closed_idle = 0  # idle connections closed to make room (mesh_downstream_cx_overload_closed_total)
        self.refused = 0  # connections refused at the limit (mesh_downstream_cx_overflow_total)
        self.active = False
        self._episode = (0, 0)  # the counters when the state was entered
        self._scan_allowed = True

    def make_room(self, connections: set) -> bool:
        """A new connection arrives with at least ``high_water`` open: close idle ones; may it be accepted?

        Closed connections leave ``connections`` at once, though their
        sockets close a moment later.
        """
        if not self.active:
            self._enter(len(connections))
        wanted = len(connections) + 1 - self.low_water
        if wanted > 0 and self._scan_allowed:
            idle = heapq.nsmallest(wanted, (conn for conn in connections if conn.is_idle()), key=_last_activity)
            for conn in idle:
                connections.discard(conn)
                conn.drain()
            self.closed_idle += len(idle)
            self._scan_allowed = len(idle) == wanted  # nothing more to find until the next sweep
        if len(connections) < self.limit:
            return True
        self.refused += 1
        return False

    def tick(self, open_connections: int) -> None:
        """The once-a-second sweep: allow a scan again; leave the overload state below the low-water mark."""
        self._scan_allowed = True
        if self.active and open_connections < self.low_water:
            self.active = False
            closed, refused = self.closed_idle - self._episode[0], self.refused - self._episode[1]
            log.info("{direction} listener no longer overloaded: {open} of {limit} connections open; "
                     "{closed} idle connection(s) closed and {refused} refused meanwhile",
                     direction=self.direction, open=open_connections, limit=self.limit, closed=closed,
                     refused=refused)

    def _enter(self, open_connections: int) -> None:
        self.active = True
        self._episode = (self.closed_idle, self.refused)
        log.warn("{direction} listener overloaded: {open} of {limit} connections open; closing the connections "
                 "idle the longest to admit new ones (busy ones are kept) until fewer than {low} are open; "
                 "raise --max-connections if this is normal load",
                 direction=self.direction, open=open_connections, limit=self.limit, low=self.low_water)

    def describe(self, open_connections: int) -> dict:
        """For /config_dump."""
        return {"open": open_connections, "limit": self.limit, "overloaded": self.active,
                "closed_idle": self.closed_idle, "refused": self.refused}
