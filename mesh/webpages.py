"""Small twisted.web pieces shared by the proxy's and the control plane's HTTP ports.

Pages (:class:`JSONPage`, :class:`BytesPage`), sites (:class:`QuietSite` for
loopback admin ports, :class:`LimitedSite` for ports other hosts reach) and
:class:`OptionalServer` for ports that must not stop a sidecar when taken.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.web import http, resource, server

log = Logger()


class JSONPage(resource.Resource):
    """A GET-only page whose body is ``produce() -> (status, JSON-able)``."""

    isLeaf = True

    def __init__(self, produce):
        super().__init__()
        self._produce = produce

    def render_GET(self, request):
        status, body = self._produce()
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"


class BytesPage(resource.Resource):
    """A GET-only page serving ``produce() -> bytes`` with a content type."""

    isLeaf = True

    def __init__(self, produce, content_type: bytes):
        super().__init__()
        self._produce = produce
        self._content_type = content_type

    def render_GET(self, request):
        request.setHeader(b"content-type", self._content_type)
        return self._produce()


class DeferredPage(BytesPage):
    """A GET page whose body comes later: ``produce() -> Deferred((status, bytes))``, served with a content type
    (a failure is logged and answered 500; a client that left gets nothing)."""

    def render_GET(self, request):
        gone = []
        request.notifyFinish().addErrback(gone.append)  # the client left: nothing to write to

        def write(result):
            if gone:
                return
            status, body = result
            request.setResponseCode(status)
            request.setHeader(b"content-type", self._content_type)
            request.write(body)
            request.finish()

        def fail(failure):
            log.failure("admin page failed", failure)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        self._produce().addCallbacks(write, fail)
        return server.NOT_DONE_YET


class QuietSite(server.Site):
    """A Site for admin ports: no access log, no tracebacks to clients."""

    noisy = False
    displayTracebacks = False

    def log(self, request):
        """Admin pages are polled often; they are not access-logged."""


@dataclass(frozen=True)
class SiteLimits:
    """Limits of a twisted.web port that other hosts can reach (the health port, the webhook).

    ``request_timeout`` runs from a request's first byte to its last (a
    trickling client is cut off, unlike with twisted's idle timeout, which each
    byte resets); ``idle_timeout`` closes a connection that sends nothing;
    ``max_request_bytes`` bounds one request, head and body together.
    """

    max_connections: int = 32
    max_request_bytes: int = 8 * 1024
    request_timeout: float = 10.0
    idle_timeout: float = 30.0


class _LimitedChannel(http.HTTPChannel):
    """An HTTPChannel that enforces its site's :class:`SiteLimits` (408, 413, connection count)."""

    maxHeaders = 100
    _request_bytes = 0
    _deadline = None
    _cut = False

    def connectionMade(self):
        self.site.open_connections += 1
        self.totalHeadersSize = self.site.limits.max_request_bytes
        super().connectionMade()

    def dataReceived(self, data):
        if self._cut:
            return
        limits = self.site.limits
        if self._deadline is None:
            self._deadline = self.callLater(limits.request_timeout, self._cut_off, 408,
                                            f"the request took longer than {limits.request_timeout:g}s to arrive; "
                                            "send it at once")
        self._request_bytes += len(data)
        if self._request_bytes > limits.max_request_bytes:
            self._cut_off(413, f"the request is larger than {limits.max_request_bytes} bytes (head and body)")
            return
        super().dataReceived(data)

    def allContentReceived(self):
        self._end_request()
        super().allContentReceived()

    def connectionLost(self, reason):
        self.site.open_connections -= 1
        self._end_request()
        super().connectionLost(reason)

    def _end_request(self):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._request_bytes = 0

    def _cut_off(self, status: int, reason: str):
        """Answer ``status`` with ``reason`` and close, whatever state the request is in."""
        self._end_request()
        self._cut = True
        body = f"{reason}\n".encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, http.RESPONSES[status], len(body), body))
        self.transport.loseConnection()


class LimitedSite(QuietSite):
    """A :class:`QuietSite` with :class:`SiteLimits`: beyond ``max_connections``, new connections are closed."""

    protocol = _LimitedChannel

    def __init__(self, root, limits: SiteLimits, reactor=None):
        super().__init__(root, timeout=limits.idle_timeout, reactor=reactor)
        self.limits = limits
        self.open_connections = 0

    def buildProtocol(self, addr):
        if self.open_connections >= self.limits.max_connections:
            return None  # twisted closes the connection at once
        return super().buildProtocol(addr)


def socket_family(fd: int) -> int:
    """The address family of the socket ``fd`` (for ``reactor.adoptStreamPort``)."""
    probe = socket.socket(fileno=os.dup(fd))
    try:
        return probe.family
    finally:
        probe.close()


class OptionalServer(service.Service):
    """Serves ``site`` on ``interface:port`` if it can: a port that is taken is logged, and the process goes on.

    For the ports that are not the data path (metrics, health): a sidecar
    whose metrics or health port is busy keeps serving traffic.  ``option``
    names the command-line option that moves the port.
    """

    def __init__(self, reactor, site, port: int, interface: str, what: str, option: str):
        """``what`` is plural (``"metrics"``, ``"health checks"``), as in "metrics are not served"."""
        self._reactor = reactor
        self._site = site
        self._address = (port, interface)
        self._what = what
        self._option = option
        self._listening = None
        self.adopted_fd = None  # a listening socket inherited from a parent process (mesh.proxy.workers)

    def startService(self):
        super().startService()
        port, interface = self._address
        if self.adopted_fd is not None:
            self._listening = self._reactor.adoptStreamPort(self.adopted_fd, socket_family(self.adopted_fd), self._site)
            return
        try:
            self._listening = self._reactor.listenTCP(port, self._site, interface=interface)
        except CannotListenError as error:
            log.error("{what} are not served: cannot listen on {interface}:{port} ({reason}); give each sidecar on "
                      "this host its own {option} (0 turns it off)", what=self._what, interface=interface,
                      port=port, reason=error.socketError, option=self._option)

    def stopService(self):
        super().stopService()
        if self._listening is not None:
            listening, self._listening = self._listening, None
            return listening.stopListening()
        return None
