"""The interfaces between the exchange and the codecs.

An :class:`mesh.proxy.exchange.Exchange` knows no protocol: it talks to the
client side through an :class:`IDownstreamStream` and to each upstream
connection through an :class:`IUpstreamStream`.  The codecs implement them
(:mod:`mesh.proxy.codec.http1_server`, :mod:`mesh.proxy.codec.http1_client`)
and own every byte of their protocol: heads, chunk framing, ``100 Continue``,
keep-alive.  An HTTP/2 codec plugs in by implementing the same two
interfaces (for HTTP/2 a stream, not a connection, provides them).

:class:`Backpressure` links one side's buffer to the other side's reading.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from zope.interface import Attribute, Interface, implementer


class IDownstreamStream(Interface):
    """The client side of one exchange: where its response goes.

    Calls come in this order: at most one :meth:`send_continue`; then either
    :meth:`send_head` (then :meth:`send_body` any number of times and
    :meth:`send_end`, or :meth:`start_tunnel` after a 101) or one
    :meth:`send_local`; then :meth:`finished`.  :meth:`abort` may come
    instead at any point after a response started.
    """

    deadlines = Attribute("the :class:`mesh.proxy.deadline.Deadlines` of the connection")
    forward_headers = Attribute("``(name, value)`` pairs to add to the forwarded request (x-forwarded-client-cert)")

    def send_continue():
        """The client waits for permission to send its body: give it."""

    def send_head(exchange, status, reason, headers):
        """Start the response: ``status``, ``reason`` (bytes or empty) and the upstream's header pairs.

        The stream may hold the head back until the first body bytes or :meth:`flush`.
        A 101 is the head of a protocol switch (:meth:`start_tunnel` follows).
        """

    def flush():
        """Write any head held back by :meth:`send_head`."""

    def send_body(data):
        """Response body bytes."""

    def send_end():
        """The response is complete."""

    def send_trailers(headers):
        """Response trailers (``(name, value)`` byte pairs); :meth:`send_end` follows at once.

        HTTP/2 sends them as a HEADERS frame ending the stream; HTTP/1.1 sends them in the
        last chunk of a chunked response and drops them otherwise (the client did not ask).
        """

    def send_local(exchange, status, body, headers):
        """A whole proxy-generated response: ``body`` bytes, extra header pairs ``headers``."""

    def abort():
        """Cut the client off (a response cannot be completed)."""

    def pause_reading():
        """Stop reading the request body (the upstream cannot take more yet)."""

    def resume_reading():
        """Undo :meth:`pause_reading`."""

    def link_response(upstream):
        """From now on a full client buffer pauses reading from ``upstream`` (an :class:`IUpstreamStream`)."""

    def unlink_response():
        """Undo :meth:`link_response`, resuming the upstream if it is paused."""

    def start_tunnel(upstream, rest):
        """Splice the client to ``upstream`` after a 101; ``rest`` are upstream bytes already read."""

    def finished(exchange):
        """The exchange has ended: answer the next request, or close."""


class IUpstreamStream(Interface):
    """One upstream connection while a try owns it: where the request goes.

    The owner (a :class:`mesh.proxy.exchange.Try`) gets the response as calls
    of ``upstream_head(status, reason, headers, keep_alive)``,
    ``upstream_body(data)``, ``upstream_trailers(headers)`` (only just before
    ``upstream_end()``, when the response has trailers), ``upstream_end()``, ``upstream_upgraded(rest)``,
    ``upstream_flush()`` and ``upstream_lost(reason_text, refused=None)``
    (``refused``: True when the upstream never processed the request, False
    when it may have, None when the codec cannot tell).  A connection whose
    response is complete and that may be reused goes back to its pool
    (``connection.pool.release(connection)``).
    """

    def send_request(owner, exchange):
        """Take ownership for one request and send the head of ``exchange`` (built once, for every try)."""

    def send_body(data):
        """Request body bytes."""

    def send_end():
        """The request body is complete."""

    def send_trailers(headers):
        """Request trailers (``(name, value)`` byte pairs); :meth:`send_end` follows at once."""

    def link_body(downstream):
        """From now on a full upstream buffer pauses reading from ``downstream`` (an :class:`IDownstreamStream`)."""

    def unlink_body():
        """Undo :meth:`link_body`, resuming the downstream if it is paused."""

    def pause_reading():
        """Stop reading the response (the client cannot take more yet)."""

    def resume_reading():
        """Undo :meth:`pause_reading`."""

    def detach():
        """The owner is gone (failed, timed out): never reuse this connection."""

    def hand_over():
        """The connection leaves its owner for a tunnel: it is neither pooled nor closed."""


@implementer(IPushProducer)
class Backpressure:
    """Registered on a consumer transport; pauses and resumes a source.

    ``release()`` undoes a pause that is still in force, so a source is never
    left paused after the exchange that linked it has ended.
    """

    __slots__ = ("_pause", "_resume", "paused")

    def __init__(self, pause, resume):
        self._pause = pause
        self._resume = resume
        self.paused = False

    def pauseProducing(self):
        if not self.paused:
            self.paused = True
            self._pause()

    def resumeProducing(self):
        if self.paused:
            self.paused = False
            self._resume()

    def stopProducing(self):
        """The consumer is gone; the exchange notices that on its own."""

    def release(self):
        self.resumeProducing()
