"""What an HTTP route does besides forwarding, compiled: Istio's ``fault``, ``corsPolicy``, ``redirect``,
``directResponse``, ``rewrite.uriRegexRewrite`` and per-destination ``headers``.

Validation (:mod:`mesh.config.validate`) builds the :class:`FaultInjection`, :class:`Redirect`,
:class:`DirectResponse`, :class:`CorsPolicy` and :class:`RegexRewrite` of a route; compilation
(:mod:`mesh.config.compile`) bundles them, with the per-destination variants of the route's action,
into one :class:`RouteExtras` (``RouteAction.extras``).  The proxy's route-actions stage
(:mod:`mesh.proxy.route_actions`) reads them per request.  A route that needs none of them has
``extras`` None: the one test a plain route pays.

Everything a request needs is computed here, once per config: percentages as fractions, regexes
compiled, header values as bytes, and the header operations of a route and its destination merged
into one (:func:`sequence_ops`), in the order Envoy evaluates them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.config.predicates import value_test
from mesh.config.regex import global_replace
from mesh.config.tables import HeaderOps

#: gRPC status names Istio accepts in ``fault.abort.grpcStatus`` (its ``grpc.SupportedGRPCStatus``).
GRPC_STATUS = {name: code for code, name in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"))}

#: The scheme of a request between an app and its sidecar.
REQUEST_SCHEME = b"http"


@dataclass(frozen=True, slots=True)
class FaultInjection:
    """Istio's ``fault``, as Envoy's fault filter applies it: first the delay, then the abort, each
    decided on its own.

    ``delay`` is in seconds (None: no delay), applied to the fraction ``delay_fraction`` (0 to 1) of
    the requests.  The abort answers the fraction ``abort_fraction`` with the HTTP status
    ``abort_status``, or with the gRPC status code ``abort_grpc``.  A fraction is Istio's percentage
    at Envoy's resolution (per million); without a percentage it is 0, as in Istio.
    ``without_percentage`` names the parts (``delay``, ``abort``) given without one, for a warning.
    """

    delay: float | None = None
    delay_fraction: float = 0.0
    abort_status: int | None = None
    abort_grpc: int | None = None
    abort_fraction: float = 0.0
    without_percentage: tuple = ()


@dataclass(frozen=True, slots=True)
class Redirect:
    """Istio's ``redirect``: the ``Location`` and status Envoy answers with.

    ``scheme``, ``authority`` and ``path`` (bytes) replace the request's when set; ``port`` is the
    port written after the host (None: none; Istio leaves out 80 for http and 443 for https);
    ``port_from_request`` (``derivePort: FROM_REQUEST_PORT``) writes the port the request came to
    instead.  ``status`` is 301, 302, 303, 307 or 308.
    """

    status: int = 301
    scheme: bytes | None = None
    authority: bytes | None = None
    port: int | None = None
    port_from_request: bool = False
    path: bytes | None = None

    def location(self, host: bytes, path: bytes, request_port: int) -> bytes:
        """The ``Location`` for a request to ``host`` (the Host header as received) and ``path`` (with
        its query), which came to ``request_port``: Envoy's ``Http::Utility::newUri``.

        A ``path`` of the redirect without a query keeps the request's query; one with a query
        replaces it.
        """
        scheme = self.scheme or REQUEST_SCHEME
        port = self.port
        if self.port_from_request and not default_port(request_port, scheme):
            port = request_port
        port_text = b":%d" % port if port else b""
        if self.authority is None:
            host = _request_host(host, scheme, port_text)
        else:
            host = self.authority
        new_path = self.path
        if new_path is None:
            new_path = path
        elif b"?" not in new_path:
            query = path.find(b"?")
            if query >= 0:
                new_path += path[query:]
        if not new_path.startswith(b"/"):
            new_path = b"/" + new_path
        return b"%s://%s%s%s" % (scheme, host, port_text, new_path)


def default_port(port: int, scheme: bytes) -> bool:
    """Whether ``port`` is the default of ``scheme`` (80 for http, 443 for https)."""
    return (port == 80 and scheme == b"http") or (port == 443 and scheme == b"https")


def _request_host(host: bytes, scheme: bytes, port_text: bytes) -> bytes:
    """The request's host for a Location (Envoy's ``processRequestHost``): its port is dropped when the
    redirect sets one, or when the scheme changes and the port was the old scheme's default."""
    if host.startswith(b"["):
        end = host.rfind(b"]:")
        end = end + 1 if end >= 0 else -1
    else:
        end = host.rfind(b":")
    if end < 0:
        return host
    drop = bool(port_text) or (scheme != REQUEST_SCHEME and host[end:] == b":80")
    return host[:end] if drop else host


def request_url(host: bytes, path: bytes) -> bytes:
    """The URL of the request itself, the ``Location`` Envoy gives a direct response of status 201 or 3xx."""
    return b"%s://%s%s" % (REQUEST_SCHEME, host, path)


@dataclass(frozen=True, slots=True)
class DirectResponse:
    """Istio's ``directResponse``: ``status`` and ``body`` (bytes; ``text/plain`` when not empty)."""

    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """Istio's ``corsPolicy``, as Envoy's CORS filter applies it.

    ``allows(origin)`` says whether an ``Origin`` is allowed (any of ``allowOrigins`` matches it, or
    one matches ``*``); ``origins`` describes them for ``/config_dump``.  The header values are
    bytes, empty when not configured (``allow_methods``/``allow_headers`` ``*`` echo the preflight's
    request).  ``forward_unmatched_preflights``: a preflight from an origin not allowed goes to the
    app (Istio's ``unmatchedPreflights: FORWARD``, the default) instead of being answered without
    CORS headers (``IGNORE``).
    """

    allows: Callable
    origins: tuple = ()
    allow_methods: bytes = b""
    allow_headers: bytes = b""
    expose_headers: bytes = b""
    max_age: bytes = b""
    allow_credentials: bool = False
    forward_unmatched_preflights: bool = True

    def response_ops(self, origin: bytes) -> HeaderOps:
        """The headers a response to an allowed ``origin`` gets (Envoy's ``encodeHeaders``)."""
        pairs = [(b"access-control-allow-origin", origin)]
        if self.allow_credentials:
            pairs.append((b"access-control-allow-credentials", b"true"))
        if self.expose_headers:
            pairs.append((b"access-control-expose-headers", self.expose_headers))
        return HeaderOps(set=tuple(pairs))


def origin_test(matches) -> Callable:
    """``origin -> bool`` for ``allowOrigins`` (:class:`~mesh.config.resources.StringMatch`): any
    match allows it, and a match of the string ``*`` allows every origin, as in Envoy."""
    tests = tuple(value_test(match) for match in matches)
    if any(test("*") for test in tests):
        return lambda origin: True
    return lambda origin: any(test(origin) for test in tests)


@dataclass(frozen=True, slots=True)
class RegexRewrite:
    """Istio's ``rewrite.uriRegexRewrite``: every match of ``pattern`` in the path (without the query)
    is replaced by the substitution, RE2's ``GlobalReplace`` as Envoy runs it.

    ``pattern`` is compiled by RE2 (:func:`mesh.config.regex.compile_re2`); ``parts`` is the
    substitution parsed: literal bytes and group numbers (``\\0`` is the whole match).  ``text`` is
    ``(match, rewrite)`` as written, for ``/config_dump``; two rewrites are equal when their texts are
    (RE2's compiled objects compare by identity).
    """

    pattern: object = field(compare=False)
    parts: tuple
    text: tuple

    def apply(self, path: str) -> str:
        """``path`` (as received: Latin-1) with every non-overlapping match replaced; like RE2, an empty
        match right after the previous match is skipped."""
        return global_replace(self.pattern, self.parts, path)


def substitution_parts(rewrite: str, groups: int) -> tuple:
    """``(parts, problem)`` of an RE2 substitution: ``\\0``-``\\9`` are groups, ``\\\\`` a backslash, the
    rest literal (as UTF-8 bytes); ``problem`` (else None) says what is wrong, as RE2's
    ``CheckRewriteString`` (which Envoy runs) would."""
    parts, literal, index = [], [], 0
    while index < len(rewrite):
        char = rewrite[index]
        index += 1
        if char != "\\":
            literal.append(char)
            continue
        if index == len(rewrite):
            return (), "a '\\' may not end the rewrite; write '\\\\' for a backslash"
        char = rewrite[index]
        index += 1
        if char == "\\":
            literal.append("\\")
        elif "0" <= char <= "9":  # RE2's ASCII digits: str.isdigit() also takes other scripts' digits
            if int(char) > groups:
                return (), (f"the rewrite uses group \\{char}, but the match regex has only {groups} "
                            "parenthesized group(s)")
            if literal:
                parts.append("".join(literal).encode("utf-8", "surrogatepass"))
                literal = []
            parts.append(int(char))
        else:
            return (), (f"invalid escape '\\{char}' in the rewrite: use \\0 to \\9 for the match's groups and "
                        "'\\\\' for a backslash")
    if literal:
        parts.append("".join(literal).encode("utf-8", "surrogatepass"))
    return tuple(parts), None


@dataclass(frozen=True, slots=True)
class RouteExtras:
    """Everything a route does besides forwarding (``RouteAction.extras``).

    ``whole_path`` is ``rewrite.uri`` when it replaces the whole path (a ``regex`` uri match, as Envoy
    rewrites the path of a regex route); ``by_cluster`` maps a cluster name to the action of the
    weighted destination that leads to it, its ``headers`` merged with the route's.  ``mirrors`` are
    ``(cluster name, fraction)`` pairs: a copy of the request goes there (:mod:`mesh.proxy.mirror`).
    """

    fault: FaultInjection | None = None
    cors: CorsPolicy | None = None
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    uri_regex: RegexRewrite | None = None
    whole_path: bytes | None = None
    by_cluster: dict = field(default_factory=dict)
    mirrors: tuple = ()

    def __bool__(self) -> bool:
        return any((self.fault, self.cors, self.redirect, self.direct_response, self.uri_regex,
                    self.whole_path is not None, self.by_cluster, self.mirrors))


# -- header operations -------------------------------------------------------------------

def sequence_ops(*parsers) -> HeaderOps | None:
    """One :class:`HeaderOps` that does what ``parsers`` do one after the other.

    A parser is a HeaderOps (or None), or a tuple of them that Envoy evaluates as one header
    parser (as Istio joins a route's ``headers`` with its lone destination's): all its removals
    first, then each set (which replaces every header of its name, also one added before) and
    add, in order.  The result has no ``set``: ``remove`` lists every name removed or set, ``add``
    what is left of the values set and added, in order; applied the usual way (drop, then
    append) it gives the same headers as the parsers.
    """
    dropped, appended = [], []

    def drop(name):
        dropped.append(name)
        appended[:] = [pair for pair in appended if pair[0] != name]

    for parser in parsers:
        parts = [ops for ops in (parser if isinstance(parser, tuple) else (parser,)) if ops is not None]
        for ops in parts:
            for name in ops.remove:
                drop(name)
        for ops in parts:
            for name, value in ops.set:
                drop(name)
                appended.append((name, value))
            appended.extend(ops.add)
    if not dropped and not appended:
        return None
    return HeaderOps(add=tuple(appended), remove=tuple(dict.fromkeys(dropped)))


def replacement_pairs(ops: HeaderOps) -> list:
    """``ops`` (as :func:`sequence_ops` makes them) as the pairs of a local reply: each replaces the
    generated headers of its name, and a None value only removes (``IDownstreamStream.send_local``)."""
    written = {name for name, _ in ops.add}
    return [*ops.add, *((name, None) for name in ops.remove if name not in written)]
