"""Where DogStatsD goes, and the service that flushes the aggregated metrics there.

The agent listens on UDP (``HOST:8125``) and, where it is set up for it, on a
Unix datagram socket (``unix:///var/run/datadog/dsd.socket``).
:class:`DogStatsDFlusher` sends from a non-blocking datagram socket, on the
reactor thread, once per flush interval: a ``sendto`` either queues the
datagram in the kernel at once or fails at once (agent not there, its queue
full); the datagram is then lost, counted and logged at most once per
``log_interval``.  Nothing waits for the agent, so an absent or slow agent
never touches the traffic.
"""

from __future__ import annotations

import ipaddress
import socket

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .addresses import StatsdTarget
from .wire import UDP_MAX_BYTES, UNIX_MAX_BYTES, datagrams

log = Logger(namespace="txmesh_datadog")

#: Seconds between two DNS resolutions of an agent given by host name.
RESOLVE_INTERVAL = 60.0


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class DogStatsDFlusher(service.Service):
    """Every ``interval`` seconds, sends what ``aggregator`` gathered (its ``lines(max_bytes)``) to ``target``.

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

    def startService(self):
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self):
        """Stop flushing, flush once more, close the socket."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self.flush()
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def flush(self) -> None:
        """Format and send what was gathered since the last flush."""
        self.flushes += 1
        if self.target.kind == "udp" and not _is_ip(self.target.host):
            self._resolve()
        lines = self.aggregator.lines(self.max_bytes)
        if lines:
            self._send(datagrams(lines, self.max_bytes))

    def _send(self, payloads: list[bytes]) -> None:
        if self._address is None:
            self._lose(len(payloads), f"{self.target.host} has not resolved (yet)")
            return
        try:
            sock = self._socket_for(self._address)
        except OSError as error:
            self._lose(len(payloads), f"cannot open a socket: {error}")
            return
        for number, payload in enumerate(payloads):
            try:
                sock.sendto(payload, self._address)
            except OSError as error:
                self._lose(len(payloads) - number, _reason(error))
                return
            self.sent += 1

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
