"""Compiling AuthorizationPolicy rules into per-request predicates ``(ctx, peer) -> bool``.

``ctx`` is the inbound :class:`mesh.proxy.context.RequestContext`, ``peer`` the
caller's verified SPIFFE id (None for plaintext).  Everything is decided when
the config is compiled: exact values become a frozenset, prefixes and
suffixes tuples for one ``startswith``/``endswith`` call, IP blocks
:mod:`ipaddress` networks.  Conditions on the destination port are decided
then too, since it is the workload's app port; they fold to True or False,
and so can whole rules.

Request attributes, as Istio reads them:

- **principal**: ``peer`` without ``spiffe://``; **namespace**: the ``/ns/NS/``
  part of it.  Both are absent for plaintext, so ``principals``/``namespaces``
  never match plaintext and ``notPrincipals``/``notNamespaces`` always do
  (``notPrincipals: ["*"]`` is Istio's "deny plaintext").
- **ip**: ``ctx.source_address``, the peer address of the connection.
- **host**: the Host header as received (with its port, if any), compared
  case-insensitively: ``example.com`` does not match ``example.com:8080``; write
  ``example.com:*`` as well, as Istio advises.
- **method**: ``ctx.method``; **path**: ``ctx.uri_path`` (no query), which the
  codec has normalized as the sidecar's ``--path-normalization`` says
  (:mod:`mesh.proxy.paths`; Istio's ``BASE`` by default).
- **header**: ``ctx.headers[name]`` (repeated headers joined with ``", "``).
- **request_principal**, **audience**, **presenter**, **claim** (the end-user
  attributes: ``requestPrincipals``, ``request.auth.principal``,
  ``.audiences``, ``.presenter``, ``.claims[...]``): read from
  ``ctx.request_auth``, the :class:`mesh.proxy.authn.RequestAuth` of the
  request's verified JWT (None without one, so they never match and their
  not-forms always do).  The principal is ``iss/sub``; audiences (``aud``)
  and a claim may be lists, which match when any string in them does; a claim
  that is neither a string nor a list of strings never matches.  Claims are
  read as Envoy's payload metadata has them: ``scope``, ``permission`` and the
  rule's ``spaceDelimitedClaims`` are already split on spaces into lists
  (:class:`mesh.proxy.authn.RequestAuth`), so ``scope: "read write"`` matches
  ``read``.
- **port**: the workload's app port.  When it is unknown, a port condition
  fails closed as Istio does with attributes it cannot evaluate: it matches in
  a DENY rule and does not in an ALLOW rule.  Rules compiled for TCP
  connections (``app_port`` :data:`CONNECTION_PORT`) read ``ctx.port``, the
  port the connection came to, instead.

Patterns: ``abc`` exact, ``abc*`` prefix, ``*abc`` suffix, ``*`` any non-empty
value (for a header: present, even if empty).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

#: The attributes whose values are IP addresses or CIDR ranges: the connection's peer (``ipBlocks``) and
#: the original client (``remoteIpBlocks``, see :func:`remote_ip`).
IP_ATTRIBUTES = frozenset({"ip", "remote_ip"})

_SPIFFE = "spiffe://"
#: ``app_port`` of :func:`compile_rule` for TCP connections: port conditions read ``ctx.port``.
CONNECTION_PORT = "connection"


def compile_rule(rule, app_port, deny: bool):
    """The predicate of an :class:`~mesh.config.security.AuthzRule`, or True/False when decided.

    ``app_port`` is the workload's app port (None: unknown), or :data:`CONNECTION_PORT`.
    ``deny`` tells whether the rule belongs to a DENY policy (how an unknown
    port is decided).
    """
    def clause(matches):
        return _combine([_condition(match, app_port, deny) for match in matches], any_of=False)

    sources = _combine([clause(c) for c in rule.sources], any_of=True) if rule.sources else True
    operations = _combine([clause(c) for c in rule.operations], any_of=True) if rule.operations else True
    return _combine([sources, operations, clause(rule.conditions)], any_of=False)


def string_test(patterns, empty_is_present: bool = False) -> Callable[[str | None], bool]:
    """``value -> bool``: does ``value`` match any Istio pattern?  None (absent) never does.

    ``*`` requires a non-empty value, or only a present one with ``empty_is_present``.
    """
    if "*" in patterns:
        if empty_is_present:
            return lambda value: value is not None
        return bool
    exact = frozenset(p for p in patterns if "*" not in p)
    prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))
    suffixes = tuple(p[1:] for p in patterns if p.startswith("*"))
    if not prefixes and not suffixes:
        return exact.__contains__
    return lambda value: value is not None and (value in exact or value.startswith(prefixes)
                                                or value.endswith(suffixes))


def _combine(tests, any_of: bool):
    """OR (``any_of``) or AND of conditions, folding the ones decided at compile time.

    Like :func:`mesh.config.predicates._combine`, for two-argument predicates.
    """
    decisive = any_of  # True decides an OR, False decides an AND
    if any(test is decisive for test in tests):
        return decisive
    tests = tuple(test for test in tests if test is not (not decisive))
    if not tests:
        return not decisive
    if len(tests) == 1:
        return tests[0]
    if any_of:
        def any_matches(ctx, peer) -> bool:
            for test in tests:
                if test(ctx, peer):
                    return True
            return False
        return any_matches

    def all_match(ctx, peer) -> bool:
        for test in tests:
            if not test(ctx, peer):
                return False
        return True
    return all_match


def _condition(match, app_port, deny):
    """The predicate of one :class:`~mesh.config.security.AuthzMatch` (or True/False)."""
    if match.attribute == "port":
        if app_port is CONNECTION_PORT:
            ports, negated = frozenset(match.values), match.negated
            return lambda ctx, peer: (ctx.port in ports) is not negated
        if app_port is None:
            return deny
        return (app_port in match.values) is not match.negated
    if match.attribute in IP_ATTRIBUTES:
        test = _ip_test(match.values)
    elif match.attribute in _LISTS:
        test = _any_of(string_test(match.values))
    else:
        test = string_test(match.values, empty_is_present=match.attribute == "header")
    if match.attribute == "header":
        read = _header_reader(match.header)
    elif match.attribute == "claim":
        read = _claim_reader(match.claim)
    else:
        read = _READERS[match.attribute]
    if match.negated:
        return lambda ctx, peer: not test(read(ctx, peer))
    return lambda ctx, peer: test(read(ctx, peer))


def _any_of(test) -> Callable:
    """A test of a JWT value: a string, or a list that matches when any of its strings does."""
    def any_string(value) -> bool:
        if isinstance(value, list):
            for item in value:
                if isinstance(item, str) and test(item):
                    return True
            return False
        return isinstance(value, str) and test(value)
    return any_string


def _ip_test(networks) -> Callable:
    networks = tuple(networks)

    def test(address) -> bool:
        if address is not None:
            for network in networks:
                if address in network:
                    return True
        return False
    return test


def _principal(ctx, peer) -> str | None:
    return peer[len(_SPIFFE):] if peer is not None and peer.startswith(_SPIFFE) else None


def _namespace(ctx, peer) -> str | None:
    principal = _principal(ctx, peer)
    if principal is None:
        return None
    _, found, rest = principal.partition("/ns/")
    namespace, slash, _ = rest.partition("/")
    return namespace if found and slash else None


def _source_ip(ctx, peer):
    return _address(ctx.source_address)


def remote_ip(ctx, peer):
    """Envoy's remote address (``remoteIpBlocks``, ``remote.ip``), with no trusted proxies in front.

    A request that came over mesh mTLS (``peer``) is from the last ``X-Forwarded-For`` entry, which the
    gateway in front appended (the client's address) or the calling workload sent, else from the
    connection's address (the calling sidecar's): Envoy's rule on Istio's sidecars
    (``use_remote_address: false``; sidecars append nothing).  Anything else, such as an ingress
    gateway's clients, is the connection's own address: an ``X-Forwarded-For`` a client sends itself is
    not trusted (Envoy's rule with ``use_remote_address`` and ``xff_num_trusted_hops: 0``, Istio's
    gateway default; stricter than Istio for plaintext requests to a sidecar).
    """
    if peer is not None:
        headers = getattr(ctx, "headers", None)
        forwarded = headers.get("x-forwarded-for") if headers else None
        if forwarded:
            return _address(forwarded.rpartition(",")[2].strip())
    return _address(ctx.source_address)


def _address(text):
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return (address.ipv4_mapped or address) if address.version == 6 else address


def _header_reader(name: str) -> Callable:
    return lambda ctx, peer: ctx.headers.get(name)


def _claim_reader(path: tuple) -> Callable:
    """The value of claim ``path`` (nested names) of the request's verified JWT, or None (its space-delimited
    claims are lists already: :class:`mesh.proxy.authn.RequestAuth`)."""
    def read(ctx, peer):
        auth = ctx.request_auth
        value = None if auth is None else auth.claims
        for name in path:
            if not isinstance(value, dict):
                return None
            value = value.get(name)
        return value
    return read


def _auth_reader(name: str) -> Callable:
    """An attribute of the request's :class:`~mesh.proxy.authn.RequestAuth` (None without a verified JWT)."""
    def read(ctx, peer):
        auth = ctx.request_auth
        return None if auth is None else getattr(auth, name)
    return read


#: The attributes whose value may be a list (JWT ``aud`` and claims).
_LISTS = frozenset({"audience", "claim"})


_READERS = {
    "principal": _principal,
    "namespace": _namespace,
    "ip": _source_ip,
    "remote_ip": remote_ip,
    "host": lambda ctx, peer: ctx.authority.decode("latin-1").lower(),
    "method": lambda ctx, peer: ctx.method,
    "path": lambda ctx, peer: ctx.uri_path,
    "request_principal": _auth_reader("principal"),
    "audience": _auth_reader("audiences"),
    "presenter": _auth_reader("presenter"),
}
