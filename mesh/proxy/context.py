"""The per-request state that flows through the hooks.

One :class:`RequestContext` is created when a request head has been parsed,
and the same object is handed to every hook for that request.  It is a plain
``__slots__`` object: cheap to create, no dict per request.
"""

from __future__ import annotations

from mesh.proxy.paths import normalize_base


class PluginExtra:
    """The ``extra`` dict of a :class:`mesh.api.RequestView` (an HTTP request's or a TCP connection's):
    where plugins share their per-request data.  Made on first use, so a request no plugin writes to
    costs no dict."""

    __slots__ = ("_extra",)

    @property
    def extra(self) -> dict:
        """Per-request scratch space for plugins."""
        if self._extra is None:
            self._extra = {}
        return self._extra

    def get_extra(self, key, default=None):
        """``extra[key]`` if set, else ``default``; reading does not create :attr:`extra`."""
        extra = self._extra
        return default if extra is None else extra.get(key, default)


class RequestContext(PluginExtra):
    """State of one HTTP request passing through a sidecar.

    Request fields (set by the codec before any hook runs):

    - ``direction``: ``"outbound"`` (app -> mesh) or ``"inbound"`` (mesh -> app)
    - ``method``: e.g. ``"GET"``; ``path``: the request target (``/a?b=1``)
      after path normalization (``normalize``, one of the functions of
      :mod:`mesh.proxy.paths`; Istio's ``BASE`` by default, which raises
      :class:`mesh.proxy.outcome.LocalReply` for a path it refuses);
      ``uri_path``: that path without the query string
    - ``host``: the Host header, lower-case, port stripped
    - ``authority``: the Host header as received (bytes)
    - ``headers``: ``dict`` lower-case name -> value (``str``; repeated headers
      joined with ``", "``), for matching
    - ``raw_headers``: list of ``(name, value)`` bytes pairs as received, minus
      hop-by-hop headers; this is what is forwarded
    - ``http_version``: ``"1.1"``, ``"1.0"`` or ``"2"``
    - ``request_id``: the ``x-request-id`` (str)
    - ``source_address``: the client's IP (str)
    - ``peer``: the caller's verified SPIFFE id on an mTLS inbound connection,
      else None
    - ``start``: ``reactor.seconds()`` (wall-clock epoch seconds) when the head
      was parsed

    Fields filled in as the request proceeds:

    - ``route``: the :class:`mesh.config.tables.RouteAction` chosen
    - ``cluster``: name of the cluster chosen; ``upstream_host``: ``"ip:port"``
    - ``attempts``: tries made so far
    - ``response_code``: status sent downstream (0 until a response starts)
    - ``response_flags``: Envoy-style flags in the order they were set, e.g. ``"URX,UF"``
      (``""`` if none; see :meth:`add_flag`)
    - ``error``: a short human-readable reason when the proxy generated the
      response
    - ``bytes_received`` / ``bytes_sent``: body bytes from / to the downstream
    - ``upstream_start``: time the first try was sent;
      ``upstream_time``: seconds until the response head arrived
    - ``authz_policy``: name of the AuthorizationPolicy that decided, if any
    - ``authz_dry_run``: the results of the dry-run AuthorizationPolicies
      (``istio.io/dry-run``), never enforced: None when none apply, else a
      tuple of ``(action, result, policy)`` per shadow engine evaluated, as
      :meth:`mesh.config.security_tables.ShadowEngine.evaluate` returns them
    - ``request_auth``: inbound, the :class:`mesh.proxy.authn.RequestAuth` of the
      request's verified JWT (RequestAuthentication), else None
    - ``grpc``: None, or for a gRPC request (``content-type: application/grpc``)
      its :class:`mesh.proxy.grpc.GrpcCall`: the gRPC status and message counts
      (set by the exchange)
    - ``extra``: a dict for plugins to share per-request data (created lazily)
    """

    __slots__ = (
        "direction",
        "method",
        "path",
        "uri_path",
        "host",
        "authority",
        "headers",
        "raw_headers",
        "http_version",
        "request_id",
        "source_address",
        "peer",
        "start",
        "route",
        "cluster",
        "upstream_host",
        "attempts",
        "response_code",
        "response_flags",
        "error",
        "bytes_received",
        "bytes_sent",
        "upstream_start",
        "upstream_time",
        "authz_policy",
        "authz_dry_run",
        "request_auth",
        "grpc",
    )

    def __init__(self, direction, method, path, host, authority, headers, raw_headers,
                 http_version, request_id, source_address, start, peer=None, normalize=normalize_base):
        self.direction = direction
        self.method = method
        uri_path, mark, query = path.partition("?")
        normalized = normalize(uri_path)
        self.uri_path = normalized
        self.path = path if normalized is uri_path else normalized + mark + query
        self.host = host
        self.authority = authority
        self.headers = headers
        self.raw_headers = raw_headers
        self.http_version = http_version
        self.request_id = request_id
        self.source_address = source_address
        self.peer = peer
        self.start = start
        self.route = None
        self.cluster = None
        self.upstream_host = None
        self.attempts = 0
        self.response_code = 0
        self.response_flags = ""
        self.error = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.upstream_start = None
        self.upstream_time = None
        self.authz_policy = None
        self.authz_dry_run = None
        self.request_auth = None
        self.grpc = None
        self._extra = None

    def request_port(self) -> int:
        """The port the request was sent to, Istio's listener port: the captured original
        destination's (transparent capture), else the Host header's, else 80."""
        destination = self.get_extra("original_dst")
        if destination is not None:
            return destination[1]
        authority = self.authority
        _, colon, port = authority.rpartition(b":")
        return int(port) if colon and port.isdigit() and not authority.endswith(b"]") else 80

    def add_flag(self, flag: str) -> None:
        """Record an Envoy-style response flag (UF, UH, UT, URX, NR, ...), once, after those already set.

        Set order is Envoy's since 1.30 (Istio 1.22): ``StreamInfoImpl::setResponseFlag`` appends to a
        vector and ``ResponseFlagUtils::toShortString`` joins it as it is, so the router's ``URX``
        (retries spent) comes before the last try's ``UF``/``UT``/``UC``: ``URX,UF``.  Envoy 1.29 and
        older sorted by flag bit (``UF,URX``); do not sort here.
        """
        if not self.response_flags:
            self.response_flags = flag
        elif flag not in self.response_flags.split(","):
            self.response_flags += "," + flag

    @classmethod
    def for_test(cls, method="GET", path="/", host="example", headers=None, **kw):
        """A context for unit tests of matchers and plugins."""
        headers = dict(headers or {})
        ctx = cls("outbound", method, path, host, host.encode(), headers,
                  [(k.encode(), v.encode()) for k, v in headers.items()],
                  "1.1", "test", "127.0.0.1", 0.0)
        for name, value in kw.items():
            setattr(ctx, name, value)
        return ctx
