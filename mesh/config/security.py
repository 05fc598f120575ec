"""AuthorizationPolicy and PeerAuthentication: their validated form and their validators.

:func:`authorization_policy` and :func:`peer_authentication` are the
validators that :func:`mesh.config.validate.validate` dispatches to.  They
check every field the way Istio's own validation does (plus what txmesh does
not implement, which is an error naming the field), and normalize values for
the compiler: host patterns lower-case, header names lower-case, IP blocks as
:mod:`ipaddress` networks, ports as ints.

Every source, operation and ``when`` field becomes one :class:`AuthzMatch`, so
the compiler (:mod:`mesh.config.authz_predicates`) has one kind of condition to
compile, whichever field it was written in.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from mesh.config.authz_predicates import IP_ATTRIBUTES
from mesh.config.fields import Fields
from mesh.config.loader import Resource

#: an RFC 7230 header name token, lower-case
_HEADER_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9a-z]+\Z")
_HEADER_KEY = re.compile(r"request\.headers\[(.*)\]\Z")
_CLAIM_KEY = re.compile(r"request\.auth\.claims((?:\[[^\[\]]+\])+)\Z")
_SPIFFE = "spiffe://"
_PATTERNS = ("Istio matches exact values, prefixes ('abc*'), suffixes ('*abc') and any non-empty value "
             "('*')")

# -- validated resources ---------------------------------------------------------------

@dataclass(frozen=True)
class AuthzMatch:
    """One condition on a request attribute, from a source, operation or ``when`` field.

    It holds when the attribute matches any of ``values`` (``negated``: none of
    them).  ``attribute`` is principal, namespace, ip, host, method, path,
    port, header, or one of the end-user (JWT) attributes a RequestAuthentication
    sets: request_principal (``iss/sub``), audience, presenter, claim;
    ``header`` names the header (lower-case) of attribute ``"header"``,
    ``claim`` the claim path (``("a", "b")`` for ``request.auth.claims[a][b]``)
    of attribute ``"claim"``.  ``values`` are Istio string patterns (exact, ``abc*``,
    ``*abc``, ``*``), except for ``ip`` (:mod:`ipaddress` networks) and
    ``port`` (ints).  ``field`` is where it was written (``principals``,
    ``notPaths``, ``when[request.headers[x-user]].values``).
    """

    attribute: str
    values: tuple
    negated: bool = False
    header: str | None = None
    field: str = ""
    claim: tuple | None = None


@dataclass(frozen=True)
class AuthzRule:
    """A rule: one of ``sources`` and one of ``operations`` and all ``conditions``.

    ``sources`` and ``operations`` are tuples of clauses; a clause (one
    ``from[].source`` or ``to[].operation``) is a tuple of :class:`AuthzMatch`
    that must all hold.  Empty means "any" (Istio: an empty rule matches every
    request).
    """

    sources: tuple = ()
    operations: tuple = ()
    conditions: tuple = ()


@dataclass(frozen=True)
class AuthorizationPolicy:
    """An AuthorizationPolicy.  ``selector`` is sorted label pairs, or None for every workload.

    ``action`` is ALLOW or DENY.  No ``rules`` matches no request.
    ``dry_run`` (annotation ``istio.io/dry-run: "true"``): the policy is
    evaluated and its result logged and counted, never enforced.
    """

    name: str
    namespace: str
    selector: tuple | None
    action: str
    rules: tuple
    source: Resource = field(compare=False, repr=False)
    dry_run: bool = False


@dataclass(frozen=True)
class PeerAuthentication:
    """A PeerAuthentication.  ``mode`` and the modes of ``port_modes`` (sorted
    ``(port, mode)`` pairs) are STRICT, PERMISSIVE, DISABLE or UNSET (inherit)."""

    name: str
    namespace: str
    selector: tuple | None
    mode: str
    port_modes: tuple
    source: Resource = field(compare=False, repr=False)


# -- AuthorizationPolicy ------------------------------------------------------------------

#: Istio's annotation that stages an AuthorizationPolicy: evaluated, logged and counted, not enforced.
DRY_RUN_ANNOTATION = "istio.io/dry-run"
_POLICY = {"selector", "action", "rules"}
_POLICY_UNSUPPORTED = {
    "targetRef": "policies attached to Gateway API resources are not supported; use selector",
    "targetRefs": "policies attached to Gateway API resources are not supported; use selector",
    "provider": "CUSTOM actions (external authorization) are not supported; remove it",
}
_ACTION_REJECTED = {
    "AUDIT": "audit logging policies are not implemented; remove the policy",
    "CUSTOM": "external authorization is not implemented; use ALLOW or DENY",
}
#: field -> (attribute, negated), in the order they are evaluated and shown
_SOURCE_FIELDS = {
    "principals": ("principal", False), "notPrincipals": ("principal", True),
    "requestPrincipals": ("request_principal", False), "notRequestPrincipals": ("request_principal", True),
    "namespaces": ("namespace", False), "notNamespaces": ("namespace", True),
    "ipBlocks": ("ip", False), "notIpBlocks": ("ip", True),
    "remoteIpBlocks": ("remote_ip", False), "notRemoteIpBlocks": ("remote_ip", True),
}
_OPERATION_FIELDS = {
    "hosts": ("host", False), "notHosts": ("host", True),
    "methods": ("method", False), "notMethods": ("method", True),
    "paths": ("path", False), "notPaths": ("path", True),
    "ports": ("port", False), "notPorts": ("port", True),
}
_CONDITION_KEYS = {"source.principal": "principal", "source.namespace": "namespace", "source.ip": "ip",
                   "remote.ip": "remote_ip",
                   "destination.port": "port", "request.auth.principal": "request_principal",
                   "request.auth.audiences": "audience", "request.auth.presenter": "presenter"}
#: list -> why a null item of it is rejected (Istio rejects nil rules, from, to and conditions too)
_NULL_ITEM = {
    "rules": "a rule must not be null; write {} for a rule that matches every request, or remove the item",
    "from": "a from entry must not be null; write {source: {...}}, or remove the item (a rule without from "
            "matches any source)",
    "to": "a to entry must not be null; write {operation: {...}}, or remove the item (a rule without to "
          "matches any operation)",
    "when": "a when condition must not be null; write {key: ..., values: [...]}, or remove the item",
}
_CONDITION_KEYS_UNSUPPORTED = {
    "source.serviceAccount": "use source.principal (cluster.local/ns/NS/sa/SA)",
    "destination.ip": "the workload has one address; remove it",
    "connection.sni": "remove it; the SNI of mesh traffic is not meaningful to policies",
    "experimental.envoy.filters": "Envoy filter metadata does not exist in txmesh; remove it",
}


def authorization_policy(resource, report, domain) -> AuthorizationPolicy:
    """Validate an AuthorizationPolicy (``domain`` is unused: policies name no services)."""
    f = Fields(report, ("spec",), resource.spec, _POLICY, _POLICY_UNSUPPORTED)
    action = f.enum("action", ("ALLOW", "DENY"), _ACTION_REJECTED, default="ALLOW")
    items = f.items("rules")
    rules = tuple(_rule(Fields(report, path, item, {"from", "to", "when"}))
                  for path, item in _not_null(report, items, _NULL_ITEM["rules"]))
    if action == "DENY" and not items:
        f.error("rules", "a DENY policy without rules denies nothing (Istio rejects it too); add rules, or "
                         "delete the policy")
    return AuthorizationPolicy(name=resource.name, namespace=resource.namespace, selector=_selector(f),
                               action=action, rules=rules, source=resource, dry_run=_dry_run(resource, report))


def _dry_run(resource, report) -> bool:
    """The ``istio.io/dry-run`` annotation: ``"true"`` or ``"false"`` (absent: false).

    Any other value is an error rather than a guess: a staged policy read as
    enforced is an outage, an enforced one read as staged an open door.
    """
    annotations = resource.metadata.get("annotations") or {}
    value = annotations.get(DRY_RUN_ANNOTATION, "false")
    if value in ("true", "false"):
        return value == "true"
    report.add(("metadata", "annotations", DRY_RUN_ANNOTATION),
               f"invalid value {value!r}: write \"true\" to evaluate and log the policy without enforcing it "
               f"(dry run), or \"false\" (or remove the annotation) to enforce it")
    return False


def _selector(f: Fields) -> tuple | None:
    """``selector.matchLabels`` as sorted pairs; None when absent or empty (every workload)."""
    if "selector" not in f:
        return None
    return f.sub("selector", {"matchLabels"}).labels("matchLabels") or None


def _not_null(report, items, reason) -> list:
    """``items`` (``(path, item)`` pairs of a list) without its null items, each reported with ``reason``.

    :class:`Fields` reads a null mapping as ``{}``, which for a rule means "every
    request"; a null item (``[null]``, or a ``-`` with nothing after it) is almost
    certainly a mistake, and Istio rejects it.
    """
    for path, item in items:
        if item is None:
            report.add(path, reason)
    return [(path, item) for path, item in items if item is not None]


def _rule(f: Fields) -> AuthzRule:
    conditions = []
    for path, item in _not_null(f.report, f.items("when"), _NULL_ITEM["when"]):
        conditions.extend(_condition(Fields(f.report, path, item, {"key", "values", "notValues"})))
    return AuthzRule(sources=_clauses(f, "from", "source", _SOURCE_FIELDS, None),
                     operations=_clauses(f, "to", "operation", _OPERATION_FIELDS, None),
                     conditions=tuple(conditions))


def _clauses(f: Fields, key, inner, fields, unsupported) -> tuple:
    """The ``from``/``to`` list: one tuple of matches per ``source``/``operation``.  Absent or null (``from:``
    with nothing after it): no such condition, as Istio reads a null list."""
    if f.data.get(key) is None:
        return ()
    clauses = []
    for path, item in _not_null(f.report, f.items(key, required=True), _NULL_ITEM[key]):
        entry = Fields(f.report, path, item, {inner})
        if inner not in entry:
            entry.error(inner, f"'{inner}' is required")
            continue
        problems = len(f.report.problems)
        clause = entry.sub(inner, set(fields), unsupported)
        matches = [_match(clause, name, *fields[name]) for name in fields if name in clause]
        matches = tuple(match for match in matches if match is not None)
        if not matches and len(f.report.problems) == problems:
            clause.error(None, f"set at least one of: {', '.join(fields)}; Istio rejects an empty {inner} "
                               f"(remove the {key} entry to match any {inner})")
        clauses.append(matches)
    return tuple(clauses)


def _match(f: Fields, key, attribute, negated, header=None, label=None, claim=None) -> AuthzMatch | None:
    """The values of list ``key`` checked for ``attribute``; None when there are none."""
    values = []
    for path, text in f.strings(key):
        value, problem = _parse(attribute, text)
        if problem:
            f.report.add(path, problem)
        elif value not in values:
            values.append(value)
    if not values:
        return None
    return AuthzMatch(attribute, tuple(values), negated, header, label or key, claim)


def _parse(attribute, text) -> tuple:
    """``(value, None)`` or ``(None, problem)`` for one value of ``attribute``."""
    if attribute in IP_ATTRIBUTES:
        try:
            return ipaddress.ip_network(text, strict=False), None
        except ValueError:
            return None, f"invalid IP address or CIDR range '{text}' (like 10.0.0.1 or 10.0.0.0/16)"
    if attribute == "port":
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            return None, f"invalid port '{text}'; use a number from 1 to 65535, as a string"
        return int(text), None
    if attribute == "path" and "{" in text:
        return None, (f"path templates ('{text}') are not supported by txmesh; use a prefix ('/api/*') or "
                      "suffix ('*.json') match")
    stars = text.count("*")
    if stars and text != "*" and (stars > 1 or text[0] != "*" and text[-1] != "*"):
        return None, f"'*' can only start or end a value, not '{text}': {_PATTERNS}"
    if attribute == "principal" and text.startswith(_SPIFFE):
        return None, f"write principals without 'spiffe://': '{text[len(_SPIFFE):]}'"
    if attribute == "host":
        return text.lower(), None
    return text, None


def _condition(f: Fields) -> tuple:
    """The matches of one ``when`` entry: its values and its notValues."""
    key = f.string("key", required=True)
    if key is None:
        return ()
    attribute, detail = _condition_key(f, key)
    if attribute is None:
        return ()
    label = f"when[{key}]"
    header, claim = (detail, None) if attribute == "header" else (None, detail)
    matches = (_match(f, "values", attribute, False, header, f"{label}.values", claim),
               _match(f, "notValues", attribute, True, header, f"{label}.notValues", claim))
    if all(f.data.get(name) in (None, []) for name in ("values", "notValues")):
        f.error(None, f"at least one of values or notValues must list a value for '{key}' (an empty or null "
                      "list counts as unset, as in Istio); list the values to match, or remove the when entry")
    return tuple(match for match in matches if match is not None)


def _condition_key(f: Fields, key) -> tuple:
    """``(attribute, header name, claim path or None)`` of a ``when`` key; ``(None, None)`` after reporting."""
    if key in _CONDITION_KEYS:
        return _CONDITION_KEYS[key], None
    claim = _CLAIM_KEY.match(key)
    if claim:
        return "claim", tuple(claim.group(1)[1:-1].split("]["))
    header = _HEADER_KEY.match(key)
    if header:
        name = header.group(1).lower()
        if _HEADER_NAME.match(name):
            return "header", name
        f.error("key", f"invalid header name '{header.group(1)}' in '{key}'")
        return None, None
    if key.startswith("request.auth.claims"):
        f.error("key", f"invalid claim key '{key}': write request.auth.claims[NAME], and a nested claim as "
                       "request.auth.claims[OUTER][INNER]")
        return None, None
    family = next((name for name in _CONDITION_KEYS_UNSUPPORTED if key == name or key.startswith(name + "[")
                   or key.startswith(name + ".")), None)
    if family is not None:
        f.error("key", f"condition key '{key}' is not supported by txmesh; {_CONDITION_KEYS_UNSUPPORTED[family]}")
    else:
        f.error("key", f"unknown condition key '{key}'; supported: request.headers[NAME], "
                       f"request.auth.claims[NAME] (nested: [OUTER][INNER]), {', '.join(_CONDITION_KEYS)}")
    return None, None


# -- PeerAuthentication -----------------------------------------------------------------------

_MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE", "UNSET")


def peer_authentication(resource, report, domain) -> PeerAuthentication:
    """Validate a PeerAuthentication (``domain`` is unused)."""
    f = Fields(report, ("spec",), resource.spec, {"selector", "mtls", "portLevelMtls"})
    selector = _selector(f)
    port_modes = {}
    if "portLevelMtls" in f:
        if selector is None:
            f.error("portLevelMtls", "portLevelMtls needs a selector with matchLabels: as in Istio, namespace- "
                                     "and mesh-wide policies cannot set per-port modes")
        levels = f.data["portLevelMtls"]
        if not isinstance(levels, dict) or not levels:
            f.error("portLevelMtls", "must map port numbers to {mode: ...}, like {8080: {mode: DISABLE}}")
            levels = {}
        for key, value in levels.items():
            path = f.path + ("portLevelMtls", key)
            port = int(key) if isinstance(key, int) or (isinstance(key, str) and key.isdigit()) else 0
            if isinstance(key, bool) or not 1 <= port <= 65535:
                report.add(path, f"invalid port {key!r}; use a port number from 1 to 65535")
            elif port in port_modes:
                report.add(path, f"port {port} is listed twice")
            else:
                port_modes[port] = _mode(report, path, value)
    return PeerAuthentication(name=resource.name, namespace=resource.namespace, selector=selector,
                              mode=_mode(report, ("spec", "mtls"), f.data.get("mtls")),
                              port_modes=tuple(sorted(port_modes.items())), source=resource)


def _mode(report, path, value) -> str:
    """The ``mode`` of an ``mtls`` mapping at ``path``; UNSET when absent."""
    return Fields(report, path, value, {"mode"}).enum("mode", _MTLS_MODES, default="UNSET")
