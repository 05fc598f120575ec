"""The deadline stage: a route's timeout, one timer per downstream connection.

A VirtualService ``timeout`` bounds a whole request, across every try.  An
exchange arms it when routing is done (:meth:`Deadlines.set`) and disarms it
when it finishes (:meth:`Deadlines.clear`); if it passes first, the
exchange's ``deadline_passed()`` is called.

One :class:`Deadlines` per downstream connection serves all the exchanges of
that connection (one at a time on HTTP/1, as many as its streams on HTTP/2): a
``callLater`` and a ``cancel`` per request cost about 3 % of the instructions
of a small request, so the pending call is kept when it comes no later than
a new deadline, and re-arms itself, when it fires, for the earliest deadline
still set.
"""

from __future__ import annotations


class Deadlines:
    """The route deadlines of the exchanges of one connection.

    :param reactor: gives ``seconds()`` and ``callLater``.
    """

    __slots__ = ("_reactor", "_timer", "_timer_due", "_due")

    def __init__(self, reactor):
        self._reactor = reactor
        self._timer = None
        self._timer_due = 0.0
        self._due = {}  # exchange -> the reactor time its deadline passes

    def set(self, exchange, seconds, now=None) -> None:
        """Call ``exchange.deadline_passed()`` in ``seconds`` unless :meth:`clear` comes first.

        ``now``: the reactor time the caller has just read, if any (one reading fewer).
        """
        reactor = self._reactor
        due = (reactor.seconds() if now is None else now) + seconds
        self._due[exchange] = due
        if self._timer is None or self._timer_due > due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = reactor.callLater(seconds, self._passed)
            self._timer_due = due

    def ends_before(self, exchange, when) -> bool:
        """Whether ``exchange``'s deadline passes before reactor time ``when`` (False: none is set)."""
        due = self._due.get(exchange)
        return due is not None and due <= when

    def clear(self, exchange) -> None:
        """``exchange`` has finished (or is gone): the pending call must not reach it."""
        self._due.pop(exchange, None)

    def stop(self) -> None:
        """The connection is gone: forget every deadline and cancel the pending call."""
        self._due.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _passed(self):
        self._timer = None
        due = self._due
        if not due:
            return
        now = self._reactor.seconds()
        passed = [exchange for exchange, when in due.items() if when <= now]
        for exchange in passed:
            del due[exchange]
        if due:  # re-arm for the earliest deadline still set
            earliest = min(due.values())
            self._timer = self._reactor.callLater(earliest - now, self._passed)
            self._timer_due = earliest
        for exchange in passed:
            exchange.deadline_passed()
