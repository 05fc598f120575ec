"""The extension API of txmesh: every hook, and its contract, grouped by phase.

Each function below is a pluggy hook specification.  Built-in behaviour lives
in :mod:`mesh.builtin` and is registered exactly like a third-party plugin
(:data:`mesh.plugins.DEFAULT_PLUGINS`); a package adds or replaces behaviour
by exposing a module (or object) under the ``mesh.plugins`` entry-point group
and implementing any of these hooks with ``@mesh.hookimpl`` (also
:data:`mesh.api.hookimpl`).  The types the hooks pass and return are in
:mod:`mesh.api`; docs/hooks.md walks through them with an example plugin.

Phases, in the order a process meets them:

- **lifecycle**: ``mesh_addoption`` (before the command line is parsed),
  ``mesh_configure`` (before any listener opens), ``mesh_unconfigure`` (when
  the service stops);
- **data plane** (``mesh-proxy``), in the order a request meets them:
  ``mesh_connection_open``, ``mesh_route``, ``mesh_pick_endpoint``,
  ``mesh_retry_decision``, ``mesh_authorize``, ``mesh_request_headers``,
  ``mesh_response_headers``, ``mesh_request_complete``,
  ``mesh_connection_complete``;
- **control plane** (``mesh-control``): ``mesh_sign_csr``,
  ``mesh_config_sources``.

Hot-path hooks run for every request.  Their implementations must do only
table lookups and arithmetic: no I/O, no YAML or dict walking, no log string
formatting unless the log is enabled.

Hooks marked *firstresult* stop at the first implementation that returns
something other than None.  Implementations registered later run first, so a
third-party plugin loaded from an entry point overrides a built-in one; it can
return None to defer to the next implementation.

Versions and deprecation
------------------------
:data:`API_VERSION` is the version of these hooks and of :mod:`mesh.api`.
Within one version, hooks and types only grow: a new hook, a new keyword
argument (pluggy passes an implementation only the arguments it names, so
existing implementations keep working), a new attribute on a view.  A plugin
may declare the version it was written for with a ``MESH_API_VERSION``
attribute (module or object); one newer than :data:`API_VERSION` is refused
at registration, with an error naming the plugin.

A hook or argument is removed only in the next version, after one version of
deprecation: its spec gets ``warn_on_impl=DeprecationWarning(...)`` (pluggy
then warns, at registration, for every plugin implementing it) and the
docstring says what replaces it.  The version that removes it bumps
:data:`API_VERSION`.
"""

import pluggy

#: The version of the plugin API: these hooks and :mod:`mesh.api`.
API_VERSION = 1

hookspec = pluggy.HookspecMarker("mesh")


# =====================================================================================
# Lifecycle: once per process
# =====================================================================================


@hookspec
def mesh_addoption(parser):
    """Add command-line options.  *Lifecycle, all results.*

    Called once, before the command line of ``twistd mesh-proxy`` or
    ``twistd mesh-control`` is parsed (so also for ``--help``), for every
    plugin not disabled with ``MESH_DISABLE_PLUGINS`` or ``--disable-plugin``.

    :param parser: a :class:`mesh.api.OptionParser`; call
        ``parser.addoption(name, default=None, help="", coerce=None, role="proxy")``
        (``role`` is ``"proxy"``, ``"control"`` or ``"both"``).  The value is
        then ``config.option(name)`` in :func:`mesh_configure`.
    """


@hookspec
def mesh_configure(config):
    """Start using the parsed configuration.  *Lifecycle, all results.*

    Called once per process after the options are parsed and every plugin is
    registered, before any listener opens.  Registering a plugin after this
    is an error.  A plugin that does not apply to ``config.role`` or to the
    options calls ``config.set_idle(self, reason)``: none of its hooks is
    called afterwards.

    :param config: a :class:`mesh.api.Config` (``config.role``,
        ``config.option(name)``, ``config.reactor``, ``config.service``).
    """


@hookspec
def mesh_unconfigure(config):
    """Release what :func:`mesh_configure` acquired.  *Lifecycle, all results.*

    Called once when the service stops (after draining and after the child
    services stopped), for every plugin that is not idle.

    :param config: the :class:`mesh.api.Config` :func:`mesh_configure` got.
    """


# =====================================================================================
# Data plane: mesh-proxy, in the order a connection and its requests meet the hooks
# =====================================================================================


@hookspec
def mesh_connection_open(connection):
    """Observe a downstream connection the proxy accepted.  *All results.*

    Called once per connection on both listeners, HTTP and TCP
    (passthrough) alike.  An HTTP connection is reported when it is
    accepted; a TCP tunnel when it is spliced to its upstream, or, when it
    is refused by policy or its upstream cannot be reached, together with
    :func:`mesh_connection_complete` as it closes.  Must never raise into
    or block the data path.

    :param connection: a :class:`mesh.api.ConnectionView`.
    """


@hookspec(firstresult=True)
def mesh_route(ctx, table):
    """Choose the route for an outbound request.  *Hot path, firstresult.*

    :param ctx: the :class:`mesh.api.RequestView`; ``ctx.host``,
        ``ctx.method``, ``ctx.path``, ``ctx.uri_path`` and ``ctx.headers`` are set.
    :param table: the route table in force (internal: an implementation that
        replaces the built-in one matches ``ctx`` itself, and defers with None).
    :return: a route action from ``table``, or None when no route matches
        (the proxy answers 404 with flag ``NR``).
    """


@hookspec(firstresult=True)
def mesh_pick_endpoint(ctx, cluster, endpoints):
    """Choose the upstream endpoint for one try.  *Hot path, firstresult.*

    :param ctx: the :class:`mesh.api.RequestView` (``ctx.attempts`` tells which try this is);
        for a TCP connection, once per connection, one whose HTTP fields are empty
        (``ctx.protocol == "tcp"``, ``ctx.source_address`` set).
    :param cluster: a :class:`mesh.api.ClusterView` (``cluster.spec.lb_policy``,
        ``cluster.spec.hash_on``; ``cluster.state`` is free for balancers to keep state).
    :param endpoints: a non-empty sequence of healthy :class:`mesh.api.EndpointView`
        (``active_requests``, ``spec.weight``, ``spec.labels``, ``state``).
    :return: one element of ``endpoints``, or None to defer.
    """


@hookspec(firstresult=True)
def mesh_retry_decision(ctx, attempt, outcome, policy):
    """Decide whether a failed try is retried.  *firstresult.*

    Called only when a try failed and the request can still be replayed.

    :param ctx: the :class:`mesh.api.RequestView`.
    :param attempt: the number of tries made so far (1 after the first try).
    :param outcome: a :class:`mesh.api.TryOutcome` describing the failure
        (``kind`` is ``"status"``, ``"connect-failure"``, ``"reset"`` or
        ``"timeout"``; ``status`` holds the upstream status, if any).
    :param policy: the route's retry policy (``attempts``, ``per_try_timeout``,
        ``retry_on``, ``retry_status_codes``, ``backoff_base``), or None when
        the route has none.
    :return: the delay in seconds before the next try (``0.0`` for at once),
        :data:`mesh.api.GIVE_UP` to give up, or None to defer to the next
        implementation.  The proxy still makes no retry beyond the cluster's
        retry budget (``--retry-budget-percent``) or ``maxRetries``, nor one
        whose delay would end after the request's deadline.
    """


@hookspec
def mesh_authorize(ctx, peer, policies):
    """Authorize an inbound request.  *Hot path, all results; any deny wins.*

    :param ctx: the inbound :class:`mesh.api.RequestView` (``ctx.host``,
        ``ctx.method``, ``ctx.uri_path``, ``ctx.headers``, ``ctx.source_address``
        are set).
    :param peer: the caller's verified SPIFFE id
        (``spiffe://cluster.local/ns/NS/sa/SA``), or None for plaintext.
    :param policies: the compiled AuthorizationPolicies that apply to this
        workload, or None (internal; the built-in implementation evaluates
        them).  Dry-run policies (``istio.io/dry-run``) are in its
        ``shadow_deny`` and ``shadow_allow``, apart from the enforced ``deny``
        and ``allow``: an implementation must never enforce them (the built-in
        one records their results in ``ctx.authz_dry_run``).
    :return: None (no opinion), or a :class:`mesh.api.AuthzDecision`
        ``(allowed, policy)``.  The request is denied with 403 if any
        implementation returns ``allowed`` False.

    Also called once per inbound TCP connection (a TCP, TLS or HTTPS app
    port, or captured plaintext that is not HTTP), with ``policies``
    compiled for TCP and a ``ctx`` whose HTTP fields are empty, with
    ``ctx.protocol == "tcp"`` and ``ctx.port`` the destination port; a
    denial closes the connection.
    """


@hookspec
def mesh_request_headers(ctx):
    """Rewrite the headers of the forwarded request.  *Hot path, all results.*

    Called on both listeners, once per request, after routing (and, inbound,
    after authorization) and before the upstream request head is built.  The
    head is built once per request, so every retry sends the same headers.
    Built-in use: ``builtin.tracing`` forwards the trace context
    (``traceparent``, ``b3``, ``x-b3-*``) with its own span as the parent.

    :param ctx: the :class:`mesh.api.RequestView` (``ctx.route``,
        ``ctx.cluster`` and ``ctx.headers`` are set; ``ctx.headers`` keeps the
        values as received).
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

    :param ctx: the :class:`mesh.api.RequestView`.
    :param status: the response status code.
    :param headers: the response's header pairs as received from the upstream
        (``(name, value)`` bytes, read-only), or ``()`` for a local reply.
    :return: None, or a list of ``(name, value)`` pairs, ``name`` lower-case
        bytes and ``value`` bytes, to set: each replaces every header of that
        name.  A ``value`` of None removes the header.
    """


@hookspec
def mesh_request_complete(ctx, outcome):
    """Observe a finished request.  *Runs exactly once per request.*

    Used for metrics, access logs and tracing.  An implementation must never
    raise into or block the data path: exceptions are caught and logged.

    :param ctx: the :class:`mesh.api.RequestView`, with ``response_code``,
        ``response_flags``, byte counts and timings filled in.
    :param outcome: a :class:`mesh.api.RequestOutcome`.
    """


@hookspec
def mesh_connection_complete(connection):
    """Observe a downstream connection that ended.  *All results.*

    Called exactly once per connection for which :func:`mesh_connection_open`
    was called, with its byte counts and duration filled in.

    :param connection: a :class:`mesh.api.ConnectionView`.
    """


# =====================================================================================
# Control plane: mesh-control
# =====================================================================================


@hookspec(firstresult=True)
def mesh_sign_csr(csr, identity, ttl):
    """Sign a workload CSR.  *Control plane, firstresult.*

    The built-in implementation (``builtin.ca``, ``trylast``) signs with the
    control plane's own CA; an external CA plugin (Vault, AWS PCA) returns
    its own result first.

    :param csr: a ``cryptography.x509.CertificateSigningRequest``.
    :param identity: the SPIFFE id the caller proved.
    :param ttl: the certificate lifetime in seconds, already capped by policy.
    :return: a :class:`mesh.api.SignedCertificate` ``(cert_pem, chain_pem)``,
        or a Deferred firing with one; None when this plugin's CA is not the
        one ``--ca`` selected.  Raise (or fail the Deferred with)
        :class:`mesh.api.CAUnavailable` when the CA cannot sign now: the
        caller gets a 503 with its reason.  Never block the reactor: a
        blocking client library runs in a thread (``deferToThread``).
    """


@hookspec
def mesh_ca_status():
    """Report on the certificate authority this plugin provides.  *Control plane, all results.*

    Each CA plugin (the built-in ``builtin.ca``, Vault, AWS PCA) returns a
    :class:`mesh.api.CAStatus` for its CA, whether or not ``--ca`` selected
    it; a plugin that provides no CA returns None.  The control plane calls
    it at start (``--ca NAME`` must name a reported CA, or mesh-control
    refuses to start), then every few seconds: the selected CA's
    ``roots_pem`` is the trust bundle distributed to every sidecar (a change
    is pushed without restarts), and ``ready``/``reason`` feed ``/ready``
    and the ``mesh_ca_ready`` metric.  Must return at once: a CA that talks
    to a server refreshes its status in the background.

    Only the selected CA may answer :func:`mesh_sign_csr`; the others return
    None there.
    """


@hookspec
def mesh_config_sources(options):
    """Name the places resources come from.  *Control plane, all results.*

    Called once, after :func:`mesh_configure`, when the control plane loads
    its config.

    :param options: the control plane's settings, a dict keyed by their
        Python names (``config_dir``, ``kubernetes``, ``kubeconfig``, ...).
    :return: a :class:`mesh.api.ConfigSource`, or None.
    """
