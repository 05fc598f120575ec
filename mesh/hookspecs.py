"""The extension API of txmesh: every hook, and its contract.

Each function below is a pluggy hook specification.  Built-in behaviour lives
in :mod:`mesh.builtin` and is registered exactly like a third-party plugin; a
package adds or replaces behaviour by exposing a module (or object) under the
``mesh.plugins`` entry-point group and implementing any of these hooks with
``@mesh.hookimpl``.

Hot-path hooks run for every request.  Their implementations must do only
table lookups and arithmetic: no I/O, no YAML or dict walking, no log string
formatting unless the log is enabled.

Hooks marked *firstresult* stop at the first implementation that returns
something other than None.  Implementations registered later run first, so a
third-party plugin loaded from an entry point overrides a built-in one; it can
return None to defer to the next implementation.
"""

import pluggy

#: The version of the plugin API: these hooks and :mod:`mesh.api`.
API_VERSION = 1

hookspec = pluggy.HookspecMarker("mesh")


@hookspec
def mesh_addoption(parser):
    """Add command-line options.  *Lifecycle, all results.*

    Called once, before the command line of ``twistd mesh-proxy`` or
    ``twistd mesh-control`` is parsed.

    :param parser: a :class:`mesh.api.OptionParser`; call
        ``parser.addoption(name, default=None, help="", coerce=str, role="proxy")``
        (``role`` is ``"proxy"``, ``"control"`` or ``"both"``).
    """


@hookspec
def mesh_configure(config):
    """Start using the parsed configuration.  *Lifecycle, all results.*

    Called once per process after the options are parsed and every plugin is
    registered, before any listener opens.

    :param config: a :class:`mesh.api.Config` (``config.role``,
        ``config.option(name)``, ``config.reactor``).
    """


@hookspec
def mesh_unconfigure(config):
    """Release what :func:`mesh_configure` acquired.  *Lifecycle, all results.*

    Called once when the service stops (after draining).
    """


@hookspec(firstresult=True)
def mesh_route(ctx, table):
    """Choose the route for an outbound request.  *Hot path, firstresult.*

    :param ctx: the :class:`mesh.proxy.context.RequestContext`; ``ctx.host``,
        ``ctx.method``, ``ctx.path``, ``ctx.uri_path`` and ``ctx.headers`` are set.
    :param table: the :class:`mesh.config.tables.RouteTable` in force.
    :return: a :class:`mesh.config.tables.RouteAction`, or None when no route
        matches (the proxy answers 404 with flag ``NR``).
    """


@hookspec(firstresult=True)
def mesh_pick_endpoint(ctx, cluster, endpoints):
    """Choose the upstream endpoint for one try.  *Hot path, firstresult.*

    :param ctx: the request context (``ctx.attempts`` tells which try this is).
    :param cluster: the :class:`mesh.proxy.clusters.Cluster` (its ``spec`` is
        the :class:`mesh.config.tables.ClusterSpec` with ``lb_policy`` and
        ``hash_on``; its ``state`` dict is free for balancers to keep state).
    :param endpoints: a non-empty sequence of healthy
        :class:`mesh.proxy.clusters.Endpoint` (``active_requests``,
        ``spec.weight``, ``spec.labels`` are available).
    :return: one element of ``endpoints``, or None to defer.
    """


@hookspec(firstresult=True)
def mesh_retry_decision(ctx, attempt, outcome, policy):
    """Decide whether a failed try is retried.  *firstresult.*

    Called only when a try failed and the request can still be replayed.

    :param attempt: the number of tries made so far (1 after the first try).
    :param outcome: a :class:`mesh.proxy.outcome.TryOutcome` describing the
        failure (``kind`` is ``"status"``, ``"connect-failure"``, ``"reset"``
        or ``"timeout"``; ``status`` holds the upstream status, if any).
    :param policy: the :class:`mesh.config.tables.RetryPolicy` of the route,
        or None when the route has none.
    :return: the delay in seconds before the next try (``0.0`` for at once),
        ``False`` to give up, or None to defer to the next implementation.
    """


@hookspec
def mesh_authorize(ctx, peer, policies):
    """Authorize an inbound request.  *Hot path, all results; any deny wins.*

    :param ctx: the inbound request context (``ctx.host``, ``ctx.method``,
        ``ctx.uri_path``, ``ctx.headers``, ``ctx.source_address`` are set).
    :param peer: the caller's verified SPIFFE id
        (``spiffe://cluster.local/ns/NS/sa/SA``), or None for plaintext.
    :param policies: the compiled AuthorizationPolicies that apply to this
        workload (:attr:`mesh.config.tables.ProxyConfig.authz`), or None.
        Dry-run policies (``istio.io/dry-run``) are in its ``shadow_deny`` and
        ``shadow_allow``, apart from the enforced ``deny`` and ``allow``: an
        implementation must never enforce them (the built-in one records
        their results in ``ctx.authz_dry_run``).
    :return: None (no opinion), or a tuple ``(allowed: bool, policy_name: str)``.
        The request is denied with 403 if any implementation returns
        ``(False, name)``.
    """


@hookspec
def mesh_request_headers(ctx):
    """Rewrite the headers of the forwarded request.  *Hot path, all results.*

    Called on both listeners, once per request, after routing (and, inbound,
    after authorization) and before the upstream request head is built.  The
    head is built once per request, so every retry sends the same headers.
    Built-in use: ``builtin.tracing`` forwards the trace context
    (``traceparent``, ``b3``, ``x-b3-*``) with its own span as the parent.

    Keep it to lookups and arithmetic, as for every hot-path hook: it runs for
    every request.

    :param ctx: the request context (``ctx.route``, ``ctx.cluster`` and
        ``ctx.headers`` are set; ``ctx.headers`` keeps the values as received).
    :return: None, or a list of ``(name, value)`` pairs, ``name`` lower-case
        bytes and ``value`` bytes, to set: each replaces every forwarded header
        of that name.  A ``value`` of None removes the header.
    """


@hookspec
def mesh_response_headers(ctx, status, headers):
    """Rewrite the headers of the response sent downstream.  *Hot path, all results.*

    Called on both listeners, once per response the proxy sends to its
    client: the upstream's final response (after any retries) and a local
    reply (then ``headers`` is empty).  Not called for ``100 Continue``.

    :param ctx: the request context.
    :param status: the response status code.
    :param headers: the response's header pairs as received from the upstream
        (``(name, value)`` bytes, read-only), or ``()`` for a local reply.
    :return: None, or a list of ``(name, value)`` pairs, ``name`` lower-case
        bytes and ``value`` bytes, to set: each replaces every header of that
        name.  A ``value`` of None removes the header.
    """


@hookspec
def mesh_connection_open(connection):
    """Observe a downstream connection the proxy accepted.  *All results.*

    Called once per connection on both listeners, HTTP and TCP
    (passthrough) alike, when it is accepted (for TCP, when the tunnel is
    decided).  Must never raise into or block the data path.

    :param connection: a :class:`mesh.api.ConnectionView`.
    """


@hookspec
def mesh_connection_complete(connection):
    """Observe a downstream connection that ended.  *All results.*

    Called exactly once per connection for which :func:`mesh_connection_open`
    was called, with its byte counts and duration filled in.

    :param connection: a :class:`mesh.api.ConnectionView`.
    """


@hookspec
def mesh_request_complete(ctx, outcome):
    """Observe a finished request.  *Runs exactly once per request.*

    Used for metrics, access logs and tracing.  An implementation must never
    raise into or block the data path: exceptions are caught and logged.

    :param ctx: the request context, with ``response_code``,
        ``response_flags``, byte counts and timings filled in.
    :param outcome: a :class:`mesh.proxy.outcome.RequestOutcome`.
    """


@hookspec(firstresult=True)
def mesh_sign_csr(csr, identity, ttl):
    """Sign a workload CSR.  *Control plane, firstresult.*

    :param csr: a ``cryptography.x509.CertificateSigningRequest``.
    :param identity: the SPIFFE id the caller proved.
    :param ttl: the certificate lifetime in seconds, already capped by policy.
    :return: a Deferred or value of ``(cert_pem: bytes, chain_pem: bytes)``.
    """


@hookspec
def mesh_config_sources(options):
    """Name the places resources come from.  *Control plane, all results.*

    :param options: the control plane's parsed options (a dict).
    :return: an object providing :class:`mesh.control.sources.IConfigSource`,
        or None.
    """
