"""The deadline stage: a route's timeout, one timer per downstream connection.

A VirtualService ``timeout`` bounds a whole request, across every try.  An
exchange arms it when routing is done (:meth:`Deadlines.set`) and disarms it
when it finishes (:meth:`Deadlines.clear`); if it passes first, the
exchange's ``deadline_passed()`` is called.

One :class:`Deadlines` per downstream connection serves the exchanges of that
connection in turn (an HTTP/1 connection has one active exchange at a time):
a ``callLater`` and a ``cancel`` per request cost about 3 % of the
instructions of a small request, so the pending call is kept when it comes
no later than the new deadline and re-arms itself, when it fires, for what
is left of the current one.
"""

from __future__ import annotations


class Deadlines:
    """The route deadline of the active exchange of one connection.

    :param reactor: gives ``seconds()`` and ``callLater``.
    """

    __slots__ = ("_reactor", "_timer", "_timer_due", "_owner", "_due")

    def __init__(self, reactor):
        self._reactor = reactor
        self._timer = None
        self._timer_due = 0.0
        self._owner = None
        self._due = 0.0

    def set(self, exchange, seconds, now=None) -> None:
        """Call ``exchange.deadline_passed()`` in ``seconds`` unless :meth:`clear` comes first.

        ``now``: the reactor time the caller has just read, if any (one reading fewer).
        """
        reactor = self._reactor
        due = (reactor.seconds() if now is None else now) + seconds
        self._owner = exchange
        self._due = due
        if self._timer is None or self._timer_due > due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = reactor.callLater(seconds, self._passed)
            self._timer_due = due

    def ends_before(self, exchange, when) -> bool:
        """Whether ``exchange``'s deadline passes before reactor time ``when`` (False: none is set)."""
        return self._owner is exchange and self._due <= when

    def clear(self, exchange) -> None:
        """``exchange`` has finished: the pending call must not reach it."""
        if self._owner is exchange:
            self._owner = None

    def stop(self) -> None:
        """The connection is gone: cancel the pending call."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _passed(self):
        self._timer = None
        exchange = self._owner
        if exchange is None:
            return
        remaining = self._due - self._reactor.seconds()
        if remaining > 0:  # the call was set for an earlier exchange's deadline
            self._timer = self._reactor.callLater(remaining, self._passed)
            self._timer_due = self._due
            return
        self._owner = None
        exchange.deadline_passed()
