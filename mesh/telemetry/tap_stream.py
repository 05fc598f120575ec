"""``builtin.tap``: live requests, streamed from the sidecar's admin port to ``meshctl tap``.

``GET /tap?method=&path=&authority=&status=&direction=&show_headers=&max_rps=`` on the admin port
(loopback only: whoever can reach it can already read ``/config_dump``; that is the access
control) answers a stream of JSON lines: first ``{"tap": {...}}`` (the subscription is live),
then one object per finished request that matches the filter, and ``{"dropped": {...}}`` before
an event when some were dropped since the last report.

Bounded, by construction:

- **no subscriber, no cost**: :meth:`TapHub.mesh_request_complete` reads one attribute and returns;
- **a slow client never grows memory**: each subscriber is the push producer of its response;
  while the transport's buffer is full (Twisted pauses the producer at 64 KiB), matching events
  are dropped and counted, not queued; a client that reads nothing for :data:`STALL_TIMEOUT`
  seconds is disconnected;
- **CPU**: at most ``max_rps`` events a second per subscriber (default :data:`DEFAULT_RPS`, at most
  :data:`MAX_RPS`; the excess is counted as dropped), and at most :data:`MAX_SUBSCRIBERS` at once.

Request headers are redacted (names only) unless ``show_headers=1``; even then
:data:`ALWAYS_REDACTED` ones never leave the sidecar.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from twisted.internet.interfaces import IPushProducer
from twisted.web import resource, server
from zope.interface import implementer

from mesh import hookimpl
from mesh.telemetry.guard import FailureLog

MAX_SUBSCRIBERS = 8
DEFAULT_RPS = 100
MAX_RPS = 5000
STALL_TIMEOUT = 30.0
ALWAYS_REDACTED = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
REDACTED = "[redacted]"
DIRECTIONS = ("inbound", "outbound")


class TapRequestError(ValueError):
    """A ``/tap`` query parameter is invalid; the message says which and what is expected."""


@dataclass(frozen=True)
class TapFilter:
    """Which finished requests a subscriber sees; None matches anything.

    ``status`` is a code (``503``) or a class (``5xx``); ``authority`` is
    compared with the Host header, lower-case, without its port.
    """

    method: str | None = None
    path: str | None = None
    authority: str | None = None
    status: str | None = None
    direction: str | None = None

    @classmethod
    def from_query(cls, query: dict) -> TapFilter:
        """Build from ``{name: value}`` (str); raises :class:`TapRequestError`."""
        status = query.get("status") or None
        if status is not None and not (len(status) == 3 and status[0] in "12345"
                                       and (status[1:].isdigit() or status[1:].lower() == "xx")):
            raise TapRequestError(f"status={status!r}: give a code (503) or a class (5xx)")
        direction = query.get("direction") or None
        if direction is not None and direction not in DIRECTIONS:
            raise TapRequestError(f"direction={direction!r}: give inbound or outbound")
        path = query.get("path") or None
        if path is not None and not path.startswith("/"):
            raise TapRequestError(f"path={path!r}: give a path prefix starting with /")
        method, authority = query.get("method") or None, query.get("authority") or None
        return cls(method=method.upper() if method else None, path=path,
                   authority=authority.lower().rsplit(":", 1)[0] if authority else None,
                   status=status.lower() if status else None, direction=direction)

    def matches(self, ctx) -> bool:
        """Whether the finished request ``ctx`` passes every condition."""
        if self.direction is not None and ctx.direction != self.direction:
            return False
        if self.method is not None and ctx.method != self.method:
            return False
        if self.path is not None and not ctx.uri_path.startswith(self.path):
            return False
        if self.authority is not None and ctx.host != self.authority:
            return False
        status = self.status
        if status is not None:
            code = str(ctx.response_code)
            return code == status or (status.endswith("xx") and code[0] == status[0] and len(code) == 3)
        return True


def event(ctx, outcome, show_headers: bool) -> dict:
    """The JSON object of one finished request, headers redacted as asked."""
    if show_headers:
        headers = {name: REDACTED if name in ALWAYS_REDACTED else value for name, value in ctx.headers.items()}
    else:
        headers = dict.fromkeys(ctx.headers, REDACTED)
    route = ctx.route
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ctx.start)) + f".{int(ctx.start % 1 * 1000):03d}Z",
        "direction": ctx.direction, "method": ctx.method, "authority": ctx.host, "path": ctx.path,
        "status": ctx.response_code, "flags": ctx.response_flags or "-",
        "duration_ms": round(outcome.duration * 1000.0, 3), "route": route.name if route is not None else None,
        "cluster": ctx.cluster, "upstream_host": ctx.upstream_host, "source_address": ctx.source_address,
        "source_principal": ctx.peer, "authz_policy": ctx.authz_policy, "request_id": ctx.request_id,
        "bytes_received": ctx.bytes_received, "bytes_sent": ctx.bytes_sent, "error": ctx.error,
        "headers": headers,
    }


@implementer(IPushProducer)
class Subscriber:
    """One ``/tap`` client: filters, rate-limits, writes, or drops and counts while its transport is full."""

    def __init__(self, hub, request, tap_filter: TapFilter, show_headers: bool, max_rps: int):
        self.hub = hub
        self.request = request
        self.filter = tap_filter
        self.show_headers = show_headers
        self.max_rps = max_rps
        self.paused = False
        self.sent = 0
        self.dropped_slow = 0
        self.dropped_rate = 0
        self._reported = (0, 0)
        self._second = None
        self._in_second = 0
        self._stall = None

    def offer(self, ctx, outcome) -> None:
        """A finished request: write it if it matches, fits the rate and the transport has room."""
        if not self.filter.matches(ctx):
            return
        second = int(ctx.start)
        if second != self._second:
            self._second, self._in_second = second, 0
        if self._in_second >= self.max_rps:
            self.dropped_rate += 1
            return
        self._in_second += 1
        if self.paused:
            self.dropped_slow += 1
            return
        if self._reported != (self.dropped_slow, self.dropped_rate):
            self._reported = (self.dropped_slow, self.dropped_rate)
            self._write({"dropped": {"slow_client": self.dropped_slow, "rate_limit": self.dropped_rate}})
        self._write(event(ctx, outcome, self.show_headers))
        self.sent += 1

    def _write(self, document) -> None:
        self.request.write(json.dumps(document, separators=(",", ":")).encode() + b"\n")

    def start(self, opening: dict) -> None:
        """Write the opening line and become the response's producer."""
        self.request.registerProducer(self, True)
        self._write(opening)

    # -- IPushProducer: Twisted pauses us while the client's transport buffer is full -------------
    def pauseProducing(self):
        self.paused = True
        if self._stall is None:
            self._stall = self.hub.reactor.callLater(STALL_TIMEOUT, self._stalled)

    def resumeProducing(self):
        self.paused = False
        self._cancel_stall()

    def stopProducing(self):
        self.hub.remove(self)

    def _stalled(self):
        self._stall = None
        self.hub.remove(self)
        self.request.channel.transport.abortConnection()

    def _cancel_stall(self):
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    def finished(self) -> None:
        """The client went away (or the sidecar stops): forget it."""
        self._cancel_stall()
        self.hub.remove(self)


class TapHub:
    """The ``mesh_request_complete`` implementation behind ``/tap``, and its subscribers.

    ``subscribers`` is a tuple replaced on every change, so the hot path reads
    it once without a copy and an empty tuple costs one truth test.
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.subscribers = ()
        self._failed = FailureLog("builtin.tap")

    @hookimpl
    def mesh_request_complete(self, ctx, outcome):
        subscribers = self.subscribers
        if not subscribers:
            return
        try:
            for subscriber in subscribers:
                subscriber.offer(ctx, outcome)
        except Exception:
            self._failed()

    def add(self, subscriber) -> bool:
        """Add a subscriber; False when :data:`MAX_SUBSCRIBERS` are tapping already."""
        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            return False
        self.subscribers += (subscriber,)
        return True

    def remove(self, subscriber) -> None:
        self.subscribers = tuple(s for s in self.subscribers if s is not subscriber)


class TapPage(resource.Resource):
    """``GET /tap``: subscribe with the filter of the query string (see the module docstring)."""

    isLeaf = True

    def __init__(self, hub: TapHub):
        super().__init__()
        self.hub = hub

    def render_GET(self, request):
        try:
            query = {key.decode(): values[-1].decode() for key, values in request.args.items()}
            tap_filter = TapFilter.from_query(query)
            max_rps = _max_rps(query.get("max_rps"))
        except (TapRequestError, UnicodeDecodeError) as error:
            return _refuse(request, 400, f"bad /tap request: {error}")
        show_headers = query.get("show_headers", "").lower() in ("1", "true", "yes")
        subscriber = Subscriber(self.hub, request, tap_filter, show_headers, max_rps)
        if not self.hub.add(subscriber):
            return _refuse(request, 503, f"{MAX_SUBSCRIBERS} taps are running on this sidecar already; "
                                         "stop one (Ctrl-C) and try again")
        request.setHeader(b"content-type", b"application/x-ndjson")
        request.setHeader(b"cache-control", b"no-store")
        request.channel.setTimeout(None)  # a quiet tap is not an idle client
        request.notifyFinish().addBoth(lambda _: subscriber.finished())
        filters = {key: value for key, value in asdict(tap_filter).items() if value is not None}
        subscriber.start({"tap": {"filter": filters, "show_headers": show_headers, "max_rps": max_rps}})
        return server.NOT_DONE_YET


def _max_rps(text) -> int:
    if not text:
        return DEFAULT_RPS
    if not text.isdigit() or not 0 < int(text) <= MAX_RPS:
        raise TapRequestError(f"max_rps={text!r}: give a whole number from 1 to {MAX_RPS}")
    return int(text)


def _refuse(request, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return message.encode() + b"\n"
