"""One request through the proxy: route, pick, forward, retry, respond.

An :class:`Exchange` is created by the downstream codec
(:mod:`mesh.proxy.http1`) for each request head.  It asks the listener's
router for a route and cluster, then makes one or more :class:`Try` objects,
each of which owns one upstream connection for as long as it lasts.  The
response streams back with backpressure in both directions (for a response,
once it is larger than the downstream transport's write buffer).

Failure rules (see docs/configuration.md and ARCHITECTURE.md):

- no route -> 404 ``NR``; unknown cluster -> 503 ``NC``; no endpoint -> 503 ``UH``
- connect failure -> 503 ``UF``; reset before a response -> 503 ``UC``
- timeout -> 504 ``UT``; gave up after retries -> flag ``URX`` as well
- a request body is buffered for replay up to a limit; past it, no retry.
- a plugin that raises in a hook -> 500 ``PE`` for this request only (the
  connection's other requests go on); :mod:`mesh.plugins` logs it once.

The caller gets the status, the flags and a message; the access log also gets
Envoy's response code details (``RequestOutcome.detail``), such as the policy
that denied a request.
"""

from __future__ import annotations

from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from mesh.plugins import PluginError
from mesh.proxy import outlier
from mesh.proxy.outcome import LocalReply, RequestOutcome, TryOutcome
from mesh.proxy.heads import local_response, request_head, response_head

_CHUNK_END = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

#: Body bytes of one response sent downstream before its upstream connection is
#: registered as a producer on the downstream transport.  A Twisted transport asks
#: its producer to pause only when a write leaves more than ``bufferSize`` (64 KiB)
#: buffered, so for the usual small response the link would never be used, while
#: making, registering and unregistering it cost about 1.6 % of the instructions of
#: a small request.  A response adds at most this much to what the downstream
#: buffer holds before backpressure starts.
_LINK_RESPONSE_AFTER = 64 * 1024


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


class Try:
    """One attempt at an upstream endpoint; the listener of its connection."""

    __slots__ = ("exchange", "endpoint", "connection", "timer", "started", "reused",
                 "got_head", "keep_alive", "body_link", "done")

    def __init__(self, exchange, endpoint, started):
        self.exchange = exchange
        self.endpoint = endpoint
        self.connection = None
        self.timer = None
        self.started = started
        self.reused = False
        self.got_head = False
        self.keep_alive = False
        self.body_link = None
        self.done = False

    # -- connection set-up -------------------------------------------------
    def connected(self, connection):
        if self.done:  # abandoned while connecting: keep the connection warm
            self.endpoint.pool.release(connection)
            return
        self.connection = connection
        self.exchange.send_request(self)

    def connect_failed(self, failure):
        if not self.done:
            self.exchange.try_failed(self, TryOutcome("connect-failure", None, failure.getErrorMessage()))

    def per_try_timeout(self):
        self.timer = None
        if not self.done:
            self.exchange.try_failed(self, TryOutcome("timeout", None, "per-try timeout"))

    def finish(self, reusable: bool) -> None:
        """End this try: drop timers and links, pool or close the connection."""
        if self.done:
            return
        self.done = True
        self.endpoint.active_requests -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        connection = self.connection
        if connection is None:
            return
        self.unlink_body()
        if reusable:
            self.endpoint.pool.release(connection)
        elif connection.listener is self or connection.listener is None:
            connection.detach()

    def unlink_body(self):
        link = self.body_link
        if link is not None:
            self.body_link = None
            self.connection.transport.unregisterProducer()
            link.release()

    # -- UpstreamConnection listener interface ------------------------------
    def upstream_head(self, status, reason, headers, keep_alive):
        self.keep_alive = keep_alive
        self.exchange.response_head(self, status, reason, headers)

    def upstream_body(self, data):
        self.exchange.response_body(self, data)

    def upstream_end(self):
        self.exchange.response_end(self)

    def upstream_upgraded(self, rest):
        self.exchange.upgraded(self, rest)

    def upstream_flush(self):
        self.exchange.flush_head()

    def upstream_lost(self, reason_text):
        if not self.done:
            self.exchange.try_failed(self, TryOutcome("reset", None, reason_text))


class Exchange:
    """A request and its response, across every try.

    ``conn`` is the downstream :class:`mesh.proxy.http1.DownstreamConnection`,
    ``ctx`` the :class:`mesh.proxy.context.RequestContext`.  ``framing`` is
    how the request body arrives: ``None`` (no body), ``"length"`` or
    ``"chunked"``.  ``deadline`` is true while the route's timeout is armed:
    the connection (``conn.set_deadline``) calls :meth:`deadline_passed` when
    it expires, unless ``conn.clear_deadline`` was called first.
    """

    __slots__ = ("conn", "ctx", "listener", "framing", "content_length", "expect_continue",
                 "upgrade", "head_only", "keep_alive", "action", "cluster", "head",
                 "body_chunks", "body_size", "replayable", "body_done", "current",
                 "deadline", "response_started", "response_chunked", "response_link",
                 "finished", "free_retry_used", "response_close", "pending_head")

    def __init__(self, conn, ctx, framing, content_length, expect_continue, upgrade, keep_alive):
        self.conn = conn
        self.ctx = ctx
        self.listener = conn.listener
        self.framing = framing
        self.content_length = content_length
        self.expect_continue = expect_continue
        self.upgrade = upgrade
        self.head_only = ctx.method == "HEAD"
        self.keep_alive = keep_alive
        self.action = None
        self.cluster = None
        self.head = None
        self.body_chunks = []
        self.body_size = 0
        self.replayable = True
        self.body_done = framing is None
        self.current = None
        self.deadline = False
        self.response_started = False
        self.response_chunked = False
        self.response_link = None
        self.finished = False
        self.free_retry_used = False
        # After an upgrade request the codec reads no more HTTP: unless the upstream
        # switches protocols, the connection closes after the response (local ones too).
        self.response_close = upgrade
        self.pending_head = None

    # -- start ---------------------------------------------------------------
    def start(self):
        """Route the request and make the first try (the exchange is active)."""
        ctx = self.ctx
        listener = self.listener
        try:
            action, cluster = listener.router.route(ctx)
            self.action = action
            self.cluster = cluster
            ctx.route = action
            ctx.cluster = cluster.name
            # mesh_request_headers (tracing and other header rewrites): asked once, here; the head is
            # built once per exchange, so retries resend the same rewritten headers.
            rewrites = listener.request_headers(ctx=ctx)
        except LocalReply as reply:
            self.local_reply(reply.status, reply.flag, reply.message, reply.details)
            return
        except PluginError as error:
            self.plugin_failed(error)
            return
        extra = _set_headers(ctx, rewrites, self.conn.forward_headers)
        self.head = request_head(ctx, action, self.framing, self.content_length, self.upgrade, extra)
        if action.timeout:
            self.deadline = True
            self.conn.set_deadline(self, action.timeout)
        if self.expect_continue and not self.body_done:
            self.conn.write(_CONTINUE)
        self._new_try()

    def _new_try(self):
        if self.finished:
            return
        cluster = self.cluster
        listener = self.listener
        now = listener.reactor.seconds()
        endpoints = cluster.healthy_endpoints(now)
        if not endpoints:
            self.local_reply(503, "UH", f"no healthy upstream: cluster {cluster.name} has no endpoints; "
                             "check the ServiceEntry endpoints and DestinationRule subset labels",
                             "no_healthy_upstream")
            return
        ctx = self.ctx
        try:
            endpoint = listener.pick_endpoint(ctx=ctx, cluster=cluster, endpoints=endpoints) or endpoints[0]
        except PluginError as error:
            self.plugin_failed(error)
            return
        ctx.attempts += 1
        ctx.upstream_host = endpoint.host_port
        if ctx.upstream_start is None:
            ctx.upstream_start = now
        endpoint.active_requests += 1
        endpoint.total_requests += 1
        attempt = Try(self, endpoint, now)
        self.current = attempt
        retry = self.action.retry
        if retry is not None and retry.per_try_timeout:
            attempt.timer = listener.reactor.callLater(retry.per_try_timeout, attempt.per_try_timeout)
        connection = endpoint.pool.acquire()
        if connection is not None:
            attempt.reused = True
            attempt.connected(connection)
        else:
            endpoint.pool.connect().addCallbacks(attempt.connected, attempt.connect_failed)

    def send_request(self, attempt):
        """The try has a connection: write the head and whatever body we have."""
        connection = attempt.connection
        connection.start_request(attempt, self.head, self.head_only)
        for chunk in self.body_chunks:
            connection.send(self._frame(chunk))
        if self.body_done:
            if self.framing == "chunked":
                connection.send(_CHUNK_END)
        else:
            down = self.conn
            attempt.body_link = link = Backpressure(down.pause_for_upstream, down.resume_for_upstream)
            connection.transport.registerProducer(link, True)
            if self.body_size > self.listener.limits.retry_buffer:
                self._stop_buffering()

    def _frame(self, chunk):
        if self.framing == "chunked":
            return b"%x\r\n%s\r\n" % (len(chunk), chunk)
        return chunk

    # -- downstream events -----------------------------------------------------
    def request_body(self, data):
        """A piece of the request body arrived from downstream."""
        ctx = self.ctx
        ctx.bytes_received += len(data)
        limit = self.listener.limits.max_request_body
        if limit and ctx.bytes_received > limit:
            self.local_reply(413, "", f"request body larger than {limit} bytes; "
                             "send a smaller body or raise --max-request-body", "request_payload_too_large")
            return
        if self.finished:
            return
        attempt = self.current
        sending = attempt is not None and attempt.connection is not None and not attempt.done
        if sending:
            attempt.connection.send(self._frame(data))
        if self.replayable or not sending:
            self.body_chunks.append(data)
            self.body_size += len(data)
            if self.body_size > self.listener.limits.retry_buffer:
                if sending:
                    self._stop_buffering()
                else:
                    self.conn.pause_for_upstream()

    def _stop_buffering(self):
        """Too big to replay: stream from here on, and never retry."""
        self.replayable = False
        self.body_chunks = []
        self.body_size = 0
        self.conn.resume_for_upstream()

    def request_end(self):
        """The request body is complete."""
        self.body_done = True
        attempt = self.current
        if self.finished or attempt is None or attempt.connection is None or attempt.done:
            return
        attempt.unlink_body()
        if self.framing == "chunked":
            attempt.connection.send(_CHUNK_END)

    def downstream_lost(self):
        """The client went away before the exchange finished."""
        if self.finished:
            return
        self.ctx.add_flag("DC")
        if self.current is not None:
            self.current.finish(reusable=False)
        self._complete(local=False, detail="downstream_remote_disconnect")

    # -- upstream events -------------------------------------------------------
    def response_head(self, attempt, status, reason, headers):
        if attempt is not self.current or self.finished:
            return
        attempt.got_head = True
        ctx = self.ctx
        now = self.listener.reactor.seconds()
        ctx.upstream_time = now - attempt.started
        if attempt.timer is not None:
            attempt.timer.cancel()
            attempt.timer = None
        if status >= 500:
            outlier.record_failure(attempt.endpoint, self.cluster, now, status=status)
            if self._retry(attempt, TryOutcome("status", status)):
                return
        else:
            outlier.record_success(attempt.endpoint)
            if 400 <= status < 500 and self._retry(attempt, TryOutcome("status", status)):
                return
        if status == 101:
            if not self.upgrade:  # never a tunnel the client did not ask for and the proxy did not pass
                self.try_failed(attempt, TryOutcome("reset", None, "the upstream switched protocols (101) "
                                                    "on a request that asked for no upgrade"))
                return
            self.response_started = True
            ctx.response_code = status
            self.conn.write(response_head(status, reason, headers, self, upgrade=True))
            return
        self.response_started = True
        ctx.response_code = status
        # Held back until the first body bytes, so that a small response takes one downstream
        # write instead of two, or until the upstream data at hand is parsed (flush_head).
        self.pending_head = response_head(status, reason, headers, self)

    def flush_head(self):
        """Write a response head held back by :meth:`response_head`, if any."""
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            self.conn.write(head)

    def response_body(self, attempt, data):
        if attempt is not self.current or self.finished:
            return
        ctx = self.ctx
        ctx.bytes_sent += len(data)
        if ctx.bytes_sent > _LINK_RESPONSE_AFTER and self.response_link is None:
            # A large response: from now on a full downstream buffer pauses the upstream.
            upstream = attempt.connection.transport
            self.response_link = link = Backpressure(upstream.pauseProducing, upstream.resumeProducing)
            self.conn.transport.registerProducer(link, True)
        if self.response_chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            data = head + data
        self.conn.write(data)

    def response_end(self, attempt):
        if attempt is not self.current or self.finished:
            return
        self.flush_head()
        if self.response_chunked:
            self.conn.write(_CHUNK_END)
        attempt.finish(reusable=attempt.keep_alive and self.body_done)
        self._complete(local=False)

    def upgraded(self, attempt, rest):
        """The upstream switched protocols: splice the two connections."""
        if attempt is not self.current or self.finished:
            return
        connection = attempt.connection
        connection.listener = None
        attempt.connection = None  # the tunnel owns it now; finish() must not pool it
        attempt.finish(reusable=False)
        self._cancel_deadline()
        self.conn.start_tunnel(connection, rest)
        self._complete(local=False, tunnel=True)

    # -- failures and retries ------------------------------------------------
    def try_failed(self, attempt, outcome):
        if attempt is not self.current or self.finished:
            return
        endpoint = attempt.endpoint
        now = self.listener.reactor.seconds()
        if outcome.kind == "connect-failure":
            outlier.record_failure(endpoint, self.cluster, now, connect_failure=True)
        elif outcome.kind == "timeout":
            outlier.record_failure(endpoint, self.cluster, now, status=504)
        if self.response_started:
            # Too late to answer anything else: cut the client off.
            attempt.finish(reusable=False)
            self.ctx.add_flag("UC")
            self.conn.abort()
            self._complete(local=False, detail="upstream_per_try_timeout" if outcome.kind == "timeout"
                           else "upstream_reset_after_response_started{connection_termination}")
            return
        stale_reuse = (outcome.kind == "reset" and attempt.reused and not attempt.got_head
                       and not self.free_retry_used and self._replayable())
        if stale_reuse:
            # A pooled connection the upstream had already closed: try again on
            # a fresh one without spending a retry, as browsers and Envoy do.
            self.free_retry_used = True
            attempt.finish(reusable=False)
            self.ctx.attempts -= 1
            self._new_try()
            return
        if self._retry(attempt, outcome):
            return
        status, flag, message, details = _failure_reply(outcome, endpoint.host_port)
        if self.ctx.attempts > 1:
            self.ctx.add_flag("URX")
        self.local_reply(status, flag, message, details)

    def _replayable(self):
        return self.replayable and not self.upgrade

    def _retry(self, attempt, outcome) -> bool:
        """Ask ``mesh_retry_decision``; if it says so, schedule another try.

        True when the try's outcome is dealt with: another try is on its way,
        or the retry plugin failed and the request got its 500.
        """
        if not self._replayable():
            return False
        ctx = self.ctx
        try:
            delay = self.listener.retry_decision(ctx=ctx, attempt=ctx.attempts, outcome=outcome,
                                                 policy=self.action.retry)
        except PluginError as error:
            self.plugin_failed(error)
            return True
        if delay is None or delay is False:
            return False
        attempt.finish(reusable=False)
        if delay > 0:
            self.current = None
            self.listener.reactor.callLater(delay, self._new_try)
        else:
            self._new_try()
        return True

    def deadline_passed(self):
        """The route's timeout has passed since :meth:`start` (called by the connection)."""
        self.deadline = False
        if self.finished:
            return
        if self.current is not None:
            if not self.current.got_head:
                outlier.record_failure(self.current.endpoint, self.cluster,
                                       self.listener.reactor.seconds(), status=504)
            self.current.finish(reusable=False)
        if self.response_started:
            self.ctx.add_flag("UT")
            self.conn.abort()
            self._complete(local=False, detail="upstream_response_timeout")
        else:
            self.local_reply(504, "UT", f"upstream request timeout after {self.action.timeout:g}s "
                             "(the route's timeout); raise the VirtualService timeout if this is expected",
                             "upstream_response_timeout")

    # -- ending ----------------------------------------------------------------
    def local_reply(self, status, flag, message, details=""):
        """Answer with a proxy-generated response and finish.

        The caller gets ``status``, the flags and ``message``; ``details``
        (Envoy's response code details) go to ``mesh_request_complete`` only.
        """
        if self.finished:
            return
        if self.current is not None:
            self.current.finish(reusable=False)
        ctx = self.ctx
        if flag:
            ctx.add_flag(flag)
        ctx.error = message
        if self.response_started:
            self.conn.abort()
            self._complete(local=True, detail=details)
            return
        if not self.body_done:
            self.response_close = True  # unread body left on the wire
        ctx.response_code = status
        body = message.encode("utf-8", "replace") + b"\n"
        self.response_started = True
        self.conn.write(local_response(status, ctx.response_flags, body, self))
        ctx.bytes_sent += len(body)
        self._complete(local=True, detail=details)

    def plugin_failed(self, error):
        """A plugin raised in a hook (:class:`mesh.plugins.PluginError`, already logged): 500 ``PE``.

        Envoy has no flag for a failing extension; ``PE`` (PluginError) names it,
        and the details name the plugin and the hook for the access log.  The
        caller is not told which plugin failed, and the connection stays open
        for its other requests.
        """
        self.local_reply(500, "PE", "internal proxy error: a plugin failed on this request; the sidecar's log "
                         f"names it (x-request-id {self.ctx.request_id})",
                         f"plugin_error{{{error.plugin},{error.hook}}}")

    def _cancel_deadline(self):
        if self.deadline:
            self.deadline = False
            self.conn.clear_deadline(self)

    def _complete(self, local, detail="via_upstream", tunnel=False):
        """Finish exactly once: report, unlink, and hand the connection back."""
        self.finished = True
        self._cancel_deadline()
        self.body_chunks = []
        link = self.response_link
        if link is not None:
            self.response_link = None
            self.conn.transport.unregisterProducer()
            link.release()
        ctx = self.ctx
        outcome = RequestOutcome(ctx.response_code, ctx.response_flags, local,
                                 self.listener.reactor.seconds() - ctx.start, detail)
        self.listener.request_complete(ctx, outcome)
        if not tunnel:
            self.conn.exchange_finished(self, self.keep_alive and not self.response_close and self.body_done)


def _failure_reply(outcome, host_port):
    """``(status, flag, message, details)`` of the local reply to a failed last try."""
    if outcome.kind == "connect-failure":
        return (503, "UF", f"upstream connect error ({host_port}): {outcome.detail}",
                "upstream_reset_before_response_started{connection_failure}")
    if outcome.kind == "timeout":
        return (504, "UT", f"upstream per-try timeout ({host_port}); raise perTryTimeout if this is expected",
                "upstream_per_try_timeout")
    return (503, "UC", f"upstream connection reset before response headers ({host_port}): {outcome.detail}",
            "upstream_reset_before_response_started{connection_termination}")


def _set_headers(ctx, results, extra):
    """Apply ``mesh_request_headers`` results: each pair replaces the forwarded headers of its name.

    Same-named headers leave ``ctx.raw_headers``; pairs with a value are added to ``extra``
    (the listener's own headers, such as x-forwarded-client-cert); a None value only removes.
    """
    if not results:
        return extra
    pairs = [pair for result in results for pair in result]
    names = {name for name, _ in pairs}
    ctx.raw_headers = [pair for pair in ctx.raw_headers if pair[0].lower() not in names]
    return (*extra, *(pair for pair in pairs if pair[1] is not None))
