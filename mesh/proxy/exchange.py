"""The exchange stage: one request and its response, across every try.

An :class:`Exchange` is created by a server codec (today
:mod:`mesh.proxy.codec.http1_server`) for each request head.  It knows no
protocol: it talks to the client through the codec's
:class:`mesh.proxy.streams.IDownstreamStream` and to each upstream connection
through its :class:`mesh.proxy.streams.IUpstreamStream`.  It asks the
listener's router for a route and cluster (the route and balance stages:
``mesh_route``, ``mesh_pick_endpoint``), then makes one or more :class:`Try`
objects, each of which owns one upstream connection for as long as it lasts.
Around the tries it uses the retry (:mod:`mesh.proxy.retry`), deadline
(:mod:`mesh.proxy.deadline`) and outlier (:mod:`mesh.proxy.outlier`) stages;
it ends with ``mesh_request_complete``, exactly once.

The exchange is a state machine (``Exchange.state``)::

    QUEUED --start, forward--> FORWARDING --final head--> RESPONDING --end, 101, abort--> DONE
                        |      ^
            retry later |      | next try
                        v      |
                       BACKOFF

    QUEUED, FORWARDING, BACKOFF --local reply (refused, failed, deadline), client gone--> DONE

- ``QUEUED``: parsed, waiting for the requests before it on its connection.
- ``FORWARDING``: routed; a try is connecting or waiting for its response head (or, before the
  first try, a fault delay runs: :meth:`Exchange.wait`).
- ``BACKOFF``: a try failed and the retry stage asked for a delay (one that would end after the
  request's deadline starts no retry: the deadline's 504 ends the exchange).
- ``RESPONDING``: a response head went downstream; the body streams.
- ``DONE``: finished; nothing reaches it any more.

Failure rules (see docs/configuration.md and ARCHITECTURE.md):

- no route -> 404 ``NR``; unknown cluster -> 503 ``NC``; no endpoint -> 503 ``UH``
- connect failure -> 503 ``UF``; reset before a response -> 503 ``UC``
- timeout -> 504 ``UT``; gave up after retries -> flag ``URX`` as well
- a request body is buffered for replay up to a limit; past it, no retry.
- a plugin that raises in a hook -> 500 ``PE`` for this request only (the
  connection's other requests go on); :mod:`mesh.plugins` logs it once.
- a gRPC request (``ctx.grpc``, :mod:`mesh.proxy.grpc`): its ``grpc-timeout``
  bounds the deadline, a Trailers-Only ``grpc-status`` may be retried and is
  what outlier detection counts, and local replies are gRPC statuses.

A route with more to do than forwarding (fault injection, CORS, a redirect or
direct response, a regex rewrite, per-destination headers: ``RouteAction.extras``)
goes through the route-actions stage (:mod:`mesh.proxy.route_actions`) between
routing and :meth:`Exchange.forward`; a plain route pays one test for it.

The caller gets the status, the flags and a message; the access log also gets
Envoy's response code details (``RequestOutcome.detail``), such as the policy
that denied a request.
"""

from __future__ import annotations

from mesh.config.route_extras import replacement_pairs, sequence_ops
from mesh.plugins import PluginError
from mesh.proxy import grpc, mirror, outlier, retry, route_actions
from mesh.proxy.outcome import LocalReply, Pending, RequestOutcome, TryOutcome

#: The states of an :class:`Exchange` (see the module docstring).
QUEUED, FORWARDING, BACKOFF, RESPONDING, DONE = "queued", "forwarding", "backoff", "responding", "done"

#: Body bytes of one response sent downstream before its upstream connection is
#: linked to the downstream for backpressure (:meth:`IDownstreamStream.link_response`).
#: A Twisted transport asks its producer to pause only when a write leaves more than
#: ``bufferSize`` (64 KiB) buffered, so for the usual small response the link would never
#: be used, while making, registering and unregistering it cost about 1.6 % of the
#: instructions of a small request.  A response adds at most this much to what the
#: downstream buffer holds before backpressure starts.
_LINK_RESPONSE_AFTER = 64 * 1024

_new_tuple = tuple.__new__


class Try:
    """One attempt at an upstream endpoint; the owner of its connection (an
    :class:`mesh.proxy.streams.IUpstreamStream`) while it lasts."""

    __slots__ = ("exchange", "endpoint", "connection", "timer", "started", "reused", "refused",
                 "got_head", "keep_alive", "linked", "done")

    def __init__(self, exchange, endpoint, started):
        self.exchange = exchange
        self.endpoint = endpoint
        self.connection = None
        self.timer = None
        self.started = started
        self.reused = False
        self.refused = None  # HTTP/2 says whether the upstream processed a failed try (see upstream_lost)
        self.got_head = False
        self.keep_alive = False
        self.linked = False  # the request body is linked for backpressure (IUpstreamStream.link_body)
        self.done = False

    # -- connection set-up -------------------------------------------------
    def connected(self, connection):
        if self.done:  # abandoned while connecting: keep the connection warm
            connection.pool.release(connection)
            return
        self.connection = connection
        self.exchange.send_request(self)

    def connect(self, pool):
        """Get a new connection (or HTTP/2 stream) from ``pool`` for this try."""
        pool.connect().addCallbacks(self.connected, self.connect_failed)

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
        self.endpoint.try_ended()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        connection = self.connection
        if connection is None:
            return
        if self.linked:
            self.linked = False
            connection.unlink_body()
        if reusable:
            connection.pool.release(connection)
        elif connection.listener is self or connection.listener is None:
            connection.detach()

    # -- what the upstream stream reports ----------------------------------------
    def upstream_head(self, status, reason, headers, keep_alive):
        self.keep_alive = keep_alive
        self.exchange.response_head(self, status, reason, headers)

    def upstream_body(self, data):
        self.exchange.response_body(self, data)

    def upstream_trailers(self, headers):
        self.exchange.response_trailers(self, headers)

    def upstream_end(self):
        self.exchange.response_end(self)

    def upstream_upgraded(self, rest):
        self.exchange.upgraded(self, rest)

    def upstream_flush(self):
        self.exchange.down.flush()

    def upstream_lost(self, reason_text, refused=None):
        """The connection or stream broke before the response ended.

        ``refused`` (HTTP/2 knows it): True when the upstream never processed
        the request (REFUSED_STREAM, or above a GOAWAY's last stream id), so it
        is replayed at once; False when it may have.  None (HTTP/1.1): unknown.
        """
        if not self.done:
            self.refused = refused
            self.exchange.try_failed(self, TryOutcome("reset", None, reason_text))


class _Wait:
    """Stands for the current try while the exchange waits before forwarding (a fault delay): it has no
    connection, and finishing it (the client went away, a local reply) cancels the wait."""

    __slots__ = ("call", "done")
    connection = None

    def __init__(self):
        self.call = None
        self.done = False

    def finish(self, reusable: bool) -> None:
        if not self.done:
            self.done = True
            self.call.cancel()


class Exchange:
    """A request and its response, across every try.

    ``down`` is the :class:`mesh.proxy.streams.IDownstreamStream` of the
    request, ``listener`` the :class:`mesh.proxy.listener.Listener` it came
    through, ``ctx`` the :class:`mesh.proxy.context.RequestContext`.
    ``framing`` is how the request body arrives: ``None`` (no body),
    ``"length"`` (``content_length`` bytes) or ``"chunked"`` (a stream of
    unknown length).  ``expect_continue``: the client waits for permission to
    send the body; ``upgrade``: a protocol switch (WebSocket) is asked for.
    ``trailers`` are the request's trailers once they arrived (:meth:`request_trailers`).
    ``extra_headers`` are the pairs the forwarded head adds (after routing),
    ``prepared`` the upstream codec's cache of that head, for retries.
    """

    __slots__ = ("down", "ctx", "listener", "framing", "content_length", "expect_continue",
                 "upgrade", "head_only", "action", "cluster", "extra_headers", "prepared",
                 "body_chunks", "body_size", "replayable", "body_done", "current",
                 "deadline", "state", "response_linked", "free_retry_used", "trailers", "mirror",
                 "retry_budget", "ended")

    def __init__(self, down, listener, ctx, framing, content_length, expect_continue, upgrade):
        self.down = down
        self.ctx = ctx
        self.listener = listener
        self.framing = framing
        self.content_length = content_length
        self.expect_continue = expect_continue
        self.upgrade = upgrade
        self.head_only = ctx.method == "HEAD"
        self.action = None
        self.cluster = None
        self.extra_headers = ()
        self.prepared = None
        self.body_chunks = []
        self.body_size = 0
        self.replayable = True
        self.body_done = framing is None
        self.current = None
        self.deadline = False
        self.state = QUEUED
        self.response_linked = False
        self.free_retry_used = False
        self.trailers = None
        self.mirror = None  # mirror copies waiting for the whole body (mesh.proxy.mirror)
        self.retry_budget = None  # the RetryBudget a retry of this exchange holds a place in (mesh.proxy.retry)
        self.ended = None  # reactor time when the exchange finished (DONE), for the codec's finished()
        content_type = ctx.headers.get("content-type")
        if content_type is not None and content_type.startswith("application/grpc"):
            ctx.grpc = grpc.call_for(content_type)

    @property
    def response_started(self) -> bool:
        """Whether a response (or part of one) has gone to the client."""
        return self.state is RESPONDING or (self.state is DONE and self.ctx.response_code != 0)

    # -- start ---------------------------------------------------------------
    def start(self):
        """Route the request, then forward it (the exchange is active)."""
        try:
            action, cluster = self.listener.router.route(self.ctx)
        except (LocalReply, Pending, PluginError) as error:
            self._not_forwarded(error)
            return
        if action.extras is None:
            self.forward(action, cluster)
        else:  # fault, CORS, a redirect...: the route-actions stage (rare) forwards or answers
            route_actions.start(self, action, cluster)

    def forward(self, action, cluster):
        """Forward the request along ``action`` to ``cluster``: ask ``mesh_request_headers``, arm the
        route's deadline and make the first try."""
        ctx = self.ctx
        listener = self.listener
        self.action = action
        self.cluster = cluster
        ctx.route = action
        ctx.cluster = cluster.name
        try:
            # mesh_request_headers (tracing and other header rewrites): asked once, here; the head is
            # built once per exchange, so retries resend the same rewritten headers.
            rewrites = listener.request_headers(ctx=ctx)
        except (LocalReply, Pending, PluginError) as error:
            self._not_forwarded(error)
            return
        down = self.down
        self.extra_headers = _set_headers(ctx, rewrites, _forwarded_headers(ctx, listener, action,
                                                                             down.forward_headers))
        timeout = action.timeout
        now = listener.reactor.seconds()  # one reading for the deadline and the first try: both start now
        if ctx.grpc is not None:
            timeout = ctx.grpc.deadline(ctx, timeout, now, self.extra_headers)
        if timeout:
            self.deadline = True
            down.deadlines.set(self, timeout, now)
        if self.expect_continue and not self.body_done:
            down.send_continue()
        self._new_try(now)

    def _not_forwarded(self, error):
        """Routing or ``mesh_request_headers`` refused the request (a :class:`~mesh.proxy.outcome.LocalReply`),
        asked it to wait (:class:`~mesh.proxy.outcome.Pending`: a JWT issuer's keys being fetched), or a
        plugin failed."""
        if isinstance(error, LocalReply):
            self.local_reply(error.status, error.flag, error.message, error.details, error.headers)
        elif isinstance(error, Pending):
            error.deferred.addCallback(self._resume)
        else:
            self.plugin_failed(error)

    def _resume(self, _):
        """A :class:`~mesh.proxy.outcome.Pending` wait is over: route again, unless the exchange ended."""
        if self.state is QUEUED:
            self.start()

    def wait(self, seconds, then, *args):
        """Hold the request ``seconds`` before ``then(*args)`` (a fault delay, before the first try).

        The wait ends with the exchange: a client that goes away or a local reply cancels it.
        """
        self.state = FORWARDING
        wait = self.current = _Wait()
        wait.call = self.listener.reactor.callLater(seconds, self._waited, wait, then, args)

    def _waited(self, wait, then, args):
        wait.done = True
        if self.current is wait:
            self.current = None
            then(*args)

    def _new_try(self, now=None):
        """Make the next try (``now``: the reactor time, if the caller has just read it)."""
        if self.state is DONE:
            return
        self.state = FORWARDING
        cluster = self.cluster
        listener = self.listener
        if now is None:
            now = listener.reactor.seconds()
        endpoints = cluster.healthy_endpoints(now)
        if not endpoints:
            self.local_reply(503, "UH", f"no healthy upstream: cluster {cluster.name} has no endpoints; "
                             f"{cluster.empty_hint}", cluster.empty_details)
            return
        breaker = cluster.breaker  # circuit breaking (mesh.proxy.circuit): None for a cluster without limits
        make_try = Try if breaker is None else breaker.admit(self)
        if make_try is None:
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
        endpoint.try_started()
        attempt = make_try(self, endpoint, now)
        self.current = attempt
        policy = self.action.retry
        if policy is not None and policy.per_try_timeout:
            attempt.timer = listener.reactor.callLater(policy.per_try_timeout, attempt.per_try_timeout)
        if ctx.grpc is not None and ctx.grpc.due is not None:  # this try's grpc-timeout: what is left
            self.extra_headers = ctx.grpc.forwarded_headers(now, policy.per_try_timeout if policy else None)
            self.prepared = None
        pool = endpoint.pool
        if (cluster.h2_always or (ctx.http_version == "2" and (cluster.h2_follows_client or pool.tls is not None))) \
                and not self.upgrade:
            pool = pool.h2  # this try speaks HTTP/2 (see Cluster; an upgrade stays HTTP/1.1)
        connection = pool.acquire()
        if connection is not None:  # attempt.connected(connection), inlined: the try is new, so not done
            attempt.reused = True
            attempt.connection = connection
            self.send_request(attempt)
        else:
            attempt.connect(pool)

    def send_request(self, attempt):
        """The try has a connection: send the head and whatever body we have."""
        connection = attempt.connection
        connection.send_request(attempt, self)
        for chunk in self.body_chunks:
            connection.send_body(chunk)
        if self.body_done:
            if self.trailers is not None:
                connection.send_trailers(self.trailers)
            if self.framing is not None:
                connection.send_end()
        else:
            attempt.linked = True
            connection.link_body(self.down)
            if self.body_size > self.listener.limits.retry_buffer:
                self._stop_buffering()

    # -- downstream events -----------------------------------------------------
    def request_body(self, data):
        """A piece of the request body arrived from downstream."""
        ctx = self.ctx
        ctx.bytes_received += len(data)
        if ctx.grpc is not None:
            ctx.grpc.requests.feed(data)
        limit = self.listener.limits.max_request_body
        if limit and ctx.bytes_received > limit:
            self.local_reply(413, "", f"request body larger than {limit} bytes; "
                             "send a smaller body or raise --max-request-body", "request_payload_too_large")
            return
        if self.state is DONE:
            return
        attempt = self.current
        sending = attempt is not None and attempt.connection is not None and not attempt.done
        if sending:
            attempt.connection.send_body(data)
        if self.replayable or not sending:
            self.body_chunks.append(data)
            self.body_size += len(data)
            if self.body_size > self.listener.limits.retry_buffer:
                if sending:
                    self._stop_buffering()
                else:
                    self.down.pause_reading()

    def _stop_buffering(self):
        """Too big to replay: stream from here on, and never retry."""
        self.replayable = False
        self.body_chunks = []
        self.body_size = 0
        self.down.resume_reading()

    def request_trailers(self, headers):
        """Trailers (``(name, value)`` byte pairs) ended the request body; :meth:`request_end` follows at once.

        They go to the current try's upstream stream and are kept, with the body, for a retry.
        """
        self.trailers = headers
        attempt = self.current
        if self.state is not DONE and attempt is not None and attempt.connection is not None and not attempt.done:
            attempt.connection.send_trailers(headers)

    def request_end(self):
        """The request body is complete."""
        self.body_done = True
        if self.mirror is not None:
            pending, self.mirror = self.mirror, None
            mirror.send(self, pending)
        attempt = self.current
        if self.state is DONE or attempt is None or attempt.connection is None or attempt.done:
            return
        if attempt.linked:
            attempt.linked = False
            attempt.connection.unlink_body()
        if self.framing is not None:
            attempt.connection.send_end()

    def downstream_lost(self):
        """The client went away before the exchange finished."""
        if self.state is DONE:
            return
        if self.mirror is not None:  # copies waiting for a body that will not come
            pending, self.mirror = self.mirror, None
            mirror.abandon(pending)
        self.ctx.add_flag("DC")
        if self.current is not None:
            self.current.finish(reusable=False)
        self._complete(local=False, detail="downstream_remote_disconnect")

    # -- upstream events -------------------------------------------------------
    def response_head(self, attempt, status, reason, headers):
        if attempt is not self.current or self.state is DONE:
            return
        attempt.got_head = True
        ctx = self.ctx
        now = self.listener.reactor.seconds()
        ctx.upstream_time = now - attempt.started
        if attempt.timer is not None:
            attempt.timer.cancel()
            attempt.timer = None
        grpc_status = None if ctx.grpc is None else ctx.grpc.head_status(headers)
        # a Trailers-Only gRPC error counts as the HTTP status it stands for, as in Envoy's router
        outlier.response(attempt.endpoint, self.cluster, now,
                         status if grpc_status is None else grpc.outlier_status(grpc_status))
        if (status >= 400 or grpc_status) and self._retry(attempt, TryOutcome("status", status,
                                                                               grpc_status=grpc_status)):
            return
        if status == 101 and not self.upgrade:
            # never a tunnel the client did not ask for and the proxy did not pass
            self.try_failed(attempt, TryOutcome("reset", None, "the upstream switched protocols (101) "
                                                "on a request that asked for no upgrade"))
            return
        rewrite = self.listener.response_headers
        if rewrite is not None:  # mesh_response_headers, only when a plugin implements it
            try:
                headers = _rewritten(headers, rewrite(ctx=ctx, status=status, headers=headers))
            except PluginError as error:
                self.plugin_failed(error)
                return
        self.state = RESPONDING
        ctx.response_code = status
        self.down.send_head(self, status, reason, headers)

    def response_body(self, attempt, data):
        if attempt is not self.current or self.state is DONE:
            return
        ctx = self.ctx
        ctx.bytes_sent += len(data)
        if ctx.grpc is not None:
            ctx.grpc.responses.feed(data)
        if ctx.bytes_sent > _LINK_RESPONSE_AFTER and not self.response_linked:
            # A large response: from now on a full downstream buffer pauses the upstream.
            self.response_linked = True
            self.down.link_response(attempt.connection)
        self.down.send_body(data)

    def response_trailers(self, attempt, headers):
        """The response ends with trailers (``(name, value)`` byte pairs); :meth:`response_end` follows."""
        if attempt is not self.current or self.state is DONE:
            return
        if self.ctx.grpc is not None:
            self.ctx.grpc.trailers(headers)
        self.down.send_trailers(headers)

    def response_end(self, attempt):
        if attempt is not self.current or self.state is DONE:
            return
        self.down.send_end()
        attempt.finish(reusable=attempt.keep_alive and self.body_done)
        self._complete(local=False)

    def upgraded(self, attempt, rest):
        """The upstream switched protocols: splice the two connections."""
        if attempt is not self.current or self.state is DONE:
            return
        connection = attempt.connection
        connection.hand_over()
        attempt.connection = None  # the tunnel owns it now; finish() must not pool it
        attempt.finish(reusable=False)
        self._cancel_deadline()
        self.down.start_tunnel(connection, rest)
        self._complete(local=False, tunnel=True)

    # -- failures and retries ------------------------------------------------
    def try_failed(self, attempt, outcome):
        if attempt is not self.current or self.state is DONE:
            return
        endpoint = attempt.endpoint
        outlier.try_failed(endpoint, self.cluster, self.listener.reactor.seconds(), outcome.kind)
        if self.state is RESPONDING:
            # Too late to answer anything else: cut the client off.
            attempt.finish(reusable=False)
            self.ctx.add_flag("UC")
            self.down.abort()
            self._complete(local=False, detail="upstream_per_try_timeout" if outcome.kind == "timeout"
                           else "upstream_reset_after_response_started{connection_termination}")
            return
        if (not self.free_retry_used and self._replayable()
                and retry.free_retry(outcome, attempt.reused, attempt.got_head, attempt.refused)):
            self.free_retry_used = True
            attempt.finish(reusable=False)
            self.ctx.attempts -= 1
            self._new_try()
            return
        if self._retry(attempt, outcome):
            return
        status, flag, message, details = retry.failure_reply(outcome, endpoint.host_port)
        if self.ctx.attempts > 1:
            self.ctx.add_flag("URX")
        self.local_reply(status, flag, message, details)

    def _replayable(self):
        return self.replayable and not self.upgrade

    def _retry(self, attempt, outcome) -> bool:
        """Ask the retry stage; if it says so, schedule another try.

        True when the try's outcome is dealt with: another try is on its way,
        or the retry plugin failed and the request got its 500.
        """
        if not self._replayable():
            return False
        try:
            delay = retry.retry_delay(self.listener, self.ctx, self.action.retry, outcome)
        except PluginError as error:
            self.plugin_failed(error)
            return True
        if delay is None:
            return False
        if delay > 0 and self.deadline and self.down.deadlines.ends_before(self, self.listener.reactor.seconds()
                                                                           + delay):
            attempt.finish(reusable=False)  # no retry after the deadline: its 504 comes instead
            self.current = None
            self.state = BACKOFF
            return True
        if not self._take_retry_place():
            return False  # a refused retry: the client gets this failure (the try still streams it)
        breaker = self.cluster.breaker
        if breaker is not None and not breaker.retry_allowed(ending_retry=attempt.retry):
            self._leave_retry_budget()
            return False  # maxRetries retries are in flight: the client gets this failure (streamed, as above)
        attempt.finish(reusable=False)
        if delay > 0:
            self.current = None
            self.state = BACKOFF
            self.listener.reactor.callLater(delay, self._new_try)
        else:
            self._new_try()
        return True

    def _take_retry_place(self) -> bool:
        """Hold a place in the cluster's retry budget for the next retry, giving back the place
        of the retry that just failed; False (counted) when the budget is used up."""
        self._leave_retry_budget()
        cluster = self.cluster
        if not cluster.retry_budget.acquire(cluster.endpoints, self.listener.limits):
            return False
        self.retry_budget = cluster.retry_budget
        return True

    def _leave_retry_budget(self):
        if self.retry_budget is not None:
            self.retry_budget.release()
            self.retry_budget = None

    def deadline_passed(self):
        """The route's timeout has passed since :meth:`start` (called by the deadline stage)."""
        self.deadline = False
        if self.state is DONE:
            return
        current = self.current
        if current is not None:
            if not current.got_head:
                outlier.try_failed(current.endpoint, self.cluster, self.listener.reactor.seconds(), "timeout")
            current.finish(reusable=False)
        if self.state is RESPONDING:
            self.ctx.add_flag("UT")
            self.down.abort()
            self._complete(local=False, detail="upstream_response_timeout")
        elif self.ctx.grpc is not None and self.ctx.grpc.client_timeout is not None:
            self.local_reply(504, "UT", self.ctx.grpc.deadline_message(), "upstream_response_timeout")
        else:
            self.local_reply(504, "UT", f"upstream request timeout after {self.action.timeout:g}s "
                             "(the route's timeout); raise the VirtualService timeout if this is expected",
                             "upstream_response_timeout")

    # -- ending ----------------------------------------------------------------
    def local_reply(self, status, flag, message, details="", headers=(), grpc_status=None):
        """Answer with a proxy-generated response and finish.

        The caller gets ``status``, the flags, ``message`` and ``headers``
        (``(name, value)`` bytes pairs); ``details`` (Envoy's response code
        details) go to ``mesh_request_complete`` only.
        A gRPC request gets them as a gRPC status instead: HTTP 200 with
        ``grpc-status`` and ``grpc-message`` (:func:`mesh.proxy.grpc.local_reply_headers`)
        and ``headers``, as Envoy's gRPC local replies keep the headers a filter adds;
        ``grpc_status`` chooses that status instead of the one mapped from ``status``.
        """
        if self.state is DONE:
            return
        if self.current is not None:
            self.current.finish(reusable=False)
        ctx = self.ctx
        if flag:
            ctx.add_flag(flag)
        ctx.error = message
        if self.state is RESPONDING:
            self.down.abort()
            self._complete(local=True, detail=details)
            return
        action = self.action
        if action is not None and action.response_headers is not None:
            # the router's own reply (the request was forwarded): it gets the route's response headers
            # and CORS, as Envoy's router and CORS filter treat their local replies
            headers = (*replacement_pairs(sequence_ops(action.response_headers)), *headers)
        if ctx.grpc is not None:
            self._grpc_local_reply(status, flag, message, details, headers, grpc_status)
            return
        self._send_local(status, message.encode("utf-8", "replace") + b"\n", headers, details)

    def respond(self, status, body, headers, details):
        """Answer with a complete response the proxy makes that is no error (a redirect, a direct
        response, a CORS preflight: :mod:`mesh.proxy.route_actions`) and finish.

        ``headers`` (``(name, value)`` bytes pairs) replace the generated headers of their names; a
        None value only removes them.
        """
        if self.state is DONE:
            return
        if self.current is not None:
            self.current.finish(reusable=False)
        self._send_local(status, body, headers, details)

    def _send_local(self, status, body, headers, details):
        ctx = self.ctx
        ctx.response_code = status
        self.down.send_local(self, status, body, (*headers, *self._local_headers(status)))
        ctx.bytes_sent += len(body)
        self._complete(local=True, detail=details)

    def _grpc_local_reply(self, status, flag, message, details, extra, grpc_status=None):
        """:meth:`local_reply` to a gRPC request: a Trailers-Only response, HTTP 200, with the ``extra``
        headers of the reply it stands for."""
        ctx = self.ctx
        headers = grpc.local_reply_headers(status, flag == "UT", message, grpc_status)
        ctx.grpc.head_status(headers)
        ctx.response_code = 200
        self.down.send_local(self, 200, b"", (*headers, *extra, *self._local_headers(200)))
        self._complete(local=True, detail=details)

    def _local_headers(self, status):
        """The pairs ``mesh_response_headers`` sets on a local reply (none if it fails: the reply must go out)."""
        rewrite = self.listener.response_headers
        if rewrite is None:
            return ()
        try:
            results = rewrite(ctx=self.ctx, status=status, headers=())
            return [pair for result in results for pair in result]  # None values remove generated headers
        except PluginError:
            return ()  # mesh.plugins.failures has logged it

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
            self.down.deadlines.clear(self)

    def _complete(self, local, detail="via_upstream", tunnel=False):
        """Finish exactly once: report, unlink, and hand the connection back.

        The last try (finished by now) is dropped: it points back at this exchange, and that
        cycle would leave every request's objects to the cyclic garbage collector.
        """
        self.state = DONE
        self.current = None
        if self.deadline:  # _cancel_deadline(), inlined: once per request
            self.deadline = False
            self.down.deadlines.clear(self)
        if self.retry_budget is not None:
            self._leave_retry_budget()
        self.body_chunks = []
        if self.response_linked:
            self.response_linked = False
            self.down.unlink_response()
        ctx = self.ctx
        if ctx.grpc is not None:
            ctx.grpc.complete(ctx.response_code)
        self.ended = now = self.listener.reactor.seconds()
        # RequestOutcome's fields made as its generated __new__ would, without that Python call
        outcome = _new_tuple(RequestOutcome, (ctx.response_code, ctx.response_flags, local, now - ctx.start, detail))
        self.listener.request_complete(ctx, outcome)
        if not tunnel:
            self.down.finished(self)


#: ``x-forwarded-proto`` added by a sidecar to a request without one, by whether it came over (m)TLS.
_PROTO = (((b"x-forwarded-proto", b"http"),), ((b"x-forwarded-proto", b"https"),))


def _forwarded_headers(ctx, listener, action, extra):
    """``extra`` with the x-forwarded-for and x-forwarded-proto of Envoy's ``mutateRequestHeaders``.

    On a gateway (``listener.forwarded_proto`` set; Istio's ``use_remote_address: true``, no trusted
    hops) the client's address is appended to the x-forwarded-for it sent, and x-forwarded-proto is the
    connection's scheme, replacing the client's value.  On a sidecar (``use_remote_address: false``)
    x-forwarded-for goes on as received (none if none), the client's x-forwarded-proto is kept, and a
    request without one gets the scheme of its connection (``https`` only over mTLS).  A route that sets
    or removes x-forwarded-proto (``headers.request``) has the last word, as Envoy's route headers come
    after.  (The codecs take x-forwarded-for out of ``ctx.raw_headers``.)"""
    received = ctx.headers.get("x-forwarded-for")
    proto = listener.forwarded_proto
    if proto is None:
        if received is not None:
            extra += ((b"x-forwarded-for", received.encode("latin-1")),)
        if "x-forwarded-proto" in ctx.headers:
            return extra
        proto = _PROTO[ctx.peer is not None]
    else:
        client = ctx.source_address.encode()
        extra += ((b"x-forwarded-for", received.encode("latin-1") + b", " + client if received else client),)
        if "x-forwarded-proto" in ctx.headers:
            ctx.raw_headers = [pair for pair in ctx.raw_headers if pair[0].lower() != b"x-forwarded-proto"]
        proto = ((b"x-forwarded-proto", proto),)
    ops = action.request_headers
    if ops is not None and (b"x-forwarded-proto" in ops.remove
                            or any(name == b"x-forwarded-proto" for name, _ in ops.set)):
        return extra
    return extra + proto


def _set_headers(ctx, results, extra):
    """Apply ``mesh_request_headers`` results: each pair replaces the forwarded headers of its name.

    Same-named headers leave ``ctx.raw_headers``; pairs with a value are added to ``extra``
    (the listener's own headers, such as x-forwarded-client-cert); a None value only removes.
    """
    if not results:
        return extra
    names = set()
    added = list(extra)
    for result in results:  # one pass, no comprehension frames: once per request
        for pair in result:
            names.add(pair[0])
            if pair[1] is not None:
                added.append(pair)
    ctx.raw_headers = [pair for pair in ctx.raw_headers if pair[0].lower() not in names]
    return tuple(added)


def _rewritten(headers, results):
    """``headers`` with the ``mesh_response_headers`` ``results`` applied: each pair replaces the headers
    of its name; a None value only removes them."""
    if not results:
        return headers
    if len(results) == 1 and type(results[0]) is list and len(results[0]) == 1:
        # the usual case (the metadata exchange's): one pair, no set
        name, value = results[0][0]
        length = len(name)
        out = [pair for pair in headers if len(pair[0]) != length or pair[0].lower() != name]
        if value is not None:
            out.append((name, value))
        return out
    pairs = [pair for result in results for pair in result]
    names = {name for name, _ in pairs}
    return [pair for pair in headers if pair[0].lower() not in names] + [pair for pair in pairs
                                                                         if pair[1] is not None]
