"""Where DogStatsD goes, and the service that flushes the aggregated metrics there.

The agent listens on UDP (``HOST:8125``) and, where it is set up for it, on a
Unix datagram socket (``unix:///var/run/datadog/dsd.socket``).
:class:`DogStatsDFlusher` sends from a non-blocking datagram socket, on the
reactor thread, once per flush interval, in slices that leave the reactor to
the requests between them: a ``sendto`` either queues the datagram in the
kernel at once or fails at once.  When the agent's queue is full (a Unix
socket holds only ``net.unix.max_dgram_qlen`` datagrams, 10 by default), the
flush waits for room, a few milliseconds at a time and 100 ms at most, as
Datadog's clients do; a datagram that cannot be sent (agent absent, queue
still full) is lost, counted and logged at most once per ``log_interval``.
No request ever waits for the agent.
"""

from __future__ import annotations

import ipaddress
import socket

from twisted.application import service
from twisted.internet.defer import succeed
from twisted.internet.task import Cooperator, LoopingCall, TaskStopped, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from .addresses import StatsdTarget
from .wire import UDP_MAX_BYTES, UNIX_MAX_BYTES, datagrams

log = Logger(namespace="txmesh_datadog")

#: Seconds between two DNS resolutions of an agent given by host name.
RESOLVE_INTERVAL = 60.0
#: Lines are packed into datagrams once they fill this many (a flush sends as it goes).
PACKED_DATAGRAMS = 8
#: While the agent's queue is full (a Unix socket holds few datagrams), a flush waits this long at a time,
#: and at most MAX_WAIT seconds in all, before it counts the rest lost.
RETRY_DELAY = 0.005
MAX_WAIT = 0.1


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class DogStatsDFlusher(service.Service):
    """Every ``interval`` seconds, sends what ``aggregator`` gathered (its ``drain(max_bytes)``) to ``target``.

    Counters, for tests and logs: ``sent`` and ``lost`` datagrams, ``flushes``.
    A host name is resolved (off the reactor thread, by the reactor's
    resolver) when the service starts and every :data:`RESOLVE_INTERVAL`
    seconds; until it resolves, datagrams are lost.  The last flush happens
    when the service stops.
    """

    name = "datadog-dogstatsd"

    def __init__(self, reactor, target: StatsdTarget, aggregator, interval: float, log_interval: float = 10.0):
        self.reactor = reactor
        self.target = target
        self.aggregator = aggregator
        self.interval = interval
        self.log_interval = log_interval
        self.max_bytes = UNIX_MAX_BYTES if target.kind == "unix" else UDP_MAX_BYTES
        self.sent = 0
        self.lost = 0
        self.flushes = 0
        self._address = target.path if target.kind == "unix" else (
            (target.host, target.port) if _is_ip(target.host) else None)
        self._socket = None
        self._resolved_at = None
        self._lost_since_log = 0
        self._last_log = None
        self._loop = LoopingCall(self.flush)
        self._loop.clock = reactor
        self._cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        self._task = None
        self._patience = MAX_WAIT

    def startService(self):
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self):
        """Stop flushing; after a flush under way, flush once more; then close the socket.  The Deferred
        fires when that is done (the sidecar waits for it as it stops)."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        done = self._task.whenDone() if self._task is not None else succeed(None)
        done.addCallback(lambda _: self.flush())
        done.addBoth(self._close)
        return done

    def _close(self, _):
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def flush(self):
        """Send what was gathered since the last flush, series by series, yielding to the reactor between
        them (a :class:`Cooperator` works for at most 10 ms at a time), so that a large flush does not
        stall the requests; the Deferred fires once all is sent (the LoopingCall waits for it)."""
        self.flushes += 1
        if self.target.kind == "udp" and not _is_ip(self.target.host):
            self._resolve()
        self._patience = MAX_WAIT
        self._task = self._cooperator.cooperate(self._send_steps())
        return self._task.whenDone().addBoth(self._flushed)

    def _flushed(self, result):
        self._task = None
        if isinstance(result, Failure) and not result.check(TaskStopped):
            log.failure("datadog: a flush failed; the requests were not affected", result)

    def _send_steps(self):
        """Drain the aggregate one series per step; send full datagrams as they add up, the rest at the end."""
        pending, size = [], 0
        for lines in self.aggregator.drain(self.max_bytes):
            pending += lines
            size += sum(map(len, lines)) + len(lines)
            if size >= PACKED_DATAGRAMS * self.max_bytes:
                yield from self._send_all(datagrams(pending, self.max_bytes))
                pending, size = [], 0
            yield None
        if pending:
            yield from self._send_all(datagrams(pending, self.max_bytes))

    def _send_all(self, payloads: list[bytes]):
        """Send ``payloads``; while the agent's queue is full, wait for it :data:`RETRY_DELAY` at a time
        (:data:`MAX_WAIT` per flush in all, as Datadog's clients wait on a Unix socket), then count the
        rest lost.  A generator of the Deferreds to wait on."""
        while True:
            payloads = self._send(payloads)
            if not payloads:
                return
            if self._patience <= 0:
                self._lose(len(payloads), _reason(BlockingIOError()))
                return
            self._patience -= RETRY_DELAY
            yield deferLater(self.reactor, RETRY_DELAY, lambda: None)

    def _send(self, payloads: list[bytes]) -> list[bytes]:
        """Send what can be sent now; return what waits for room in the agent's queue (else [])."""
        if self._address is None:
            self._lose(len(payloads), f"{self.target.host} has not resolved (yet)")
            return []
        try:
            sock = self._socket_for(self._address)
        except OSError as error:
            self._lose(len(payloads), f"cannot open a socket: {error}")
            return []
        for number, payload in enumerate(payloads):
            try:
                sock.sendto(payload, self._address)
            except BlockingIOError:
                return payloads[number:]
            except OSError as error:
                self._lose(len(payloads) - number, _reason(error))
                return []
            self.sent += 1
        return []

    def _socket_for(self, address):
        if self._socket is None:
            if self.target.kind == "unix":
                family = socket.AF_UNIX
            else:
                family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self._socket = sock
        return self._socket

    def _resolve(self) -> None:
        now = self.reactor.seconds()
        if self._resolved_at is not None and now - self._resolved_at < RESOLVE_INTERVAL:
            return
        self._resolved_at = now
        d = self.reactor.resolve(self.target.host)
        d.addCallbacks(self._resolved, lambda failure: self._lose(0, f"cannot resolve {self.target.host}: "
                                                                     f"{failure.getErrorMessage()}"))

    def _resolved(self, ip: str) -> None:
        address = (ip, self.target.port)
        if self._socket is not None and address != self._address:
            self._socket.close()  # the family may differ
            self._socket = None
        self._address = address

    def _lose(self, count: int, reason: str) -> None:
        """Count ``count`` lost datagrams; log ``reason`` at most once per ``log_interval``."""
        self.lost += count
        self._lost_since_log += count
        now = self.reactor.seconds()
        if self._last_log is None or now - self._last_log >= self.log_interval:
            self._last_log = now
            log.warn("datadog: DogStatsD to {target} failed ({lost} datagram(s) lost since the last message, "
                     "{total} in all); requests are not affected: {reason}",
                     target=str(self.target), lost=self._lost_since_log, total=self.lost, reason=reason)
            self._lost_since_log = 0


def _reason(error: OSError) -> str:
    """What a failed ``sendto`` means, and what to check."""
    if isinstance(error, FileNotFoundError):
        return "no such socket: is the agent running, with dogstatsd_socket set and the socket mounted?"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused: nothing listens there (is the agent running?)"
    if isinstance(error, BlockingIOError):
        return "the agent's receive queue is full (it is overloaded or stopped reading)"
    return f"{type(error).__name__}: {error}"
