"""Compiling AuthorizationPolicies and PeerAuthentications for one workload.

**Which policies apply** (Istio): those of the workload's namespace whose
selector matches the workload's labels (no selector: the whole namespace), and
those of the root namespace (``istio-system`` by default) likewise: without a
selector they apply to the whole mesh, with one to the matching workloads of
every namespace.  PeerAuthentications with a selector in the root namespace
are the exception: Istio ignores them, and so does txmesh (with a warning).

**PeerAuthentication precedence** (Istio): the workload's own policy (with a
selector) over its namespace's policy over the mesh-wide policy over the
default, PERMISSIVE.  UNSET (or no ``mtls``) inherits from the next level;
``portLevelMtls`` of the workload policy overrides the result for its ports
(UNSET there inherits the workload's mode): the sidecar applies each to the
connections sent to that workload port, the app port and, with transparent
capture, every other captured port (Istio's inbound passthrough, since 1.9).
A port of the sidecar's own (15000-15090: iptables never captures them) gets
a warning: no connection can ever have its mode.  Where Istio picks the
oldest of several policies of one level, txmesh, which may not know creation
times, picks the first by name and warns about the others.
"""

from __future__ import annotations

from mesh.config.authz_predicates import CONNECTION_PORT, compile_rule
from mesh.config.security import AuthorizationPolicy, AuthzRule, PeerAuthentication
from mesh.config.security_tables import AuthzPolicies, AuthzPolicy, PeerAuthn, ShadowEngine
from mesh.config.selection import selects
from mesh.sidecar_contract import INBOUND_PORT, PROXY_PORTS

DEFAULT_ROOT_NAMESPACE = "istio-system"
#: The request attributes a TCP connection does not have (Istio's HTTP-only fields: hosts, methods,
#: paths, requestPrincipals and their not-forms, ``request.headers[...]`` and ``request.auth.*`` conditions).
HTTP_ONLY_ATTRIBUTES = frozenset({"host", "method", "path", "header", "request_principal", "audience", "presenter",
                                  "claim"})


def applicable(objects, cls, workload, root_namespace) -> list:
    """The policies of type ``cls`` that apply to ``workload``: its namespace's, then the root's."""
    found = [obj for obj in objects if isinstance(obj, cls)
             and obj.namespace in (workload.namespace, root_namespace) and selects(obj.selector, workload.labels)]
    return sorted(found, key=lambda obj: (obj.namespace != workload.namespace, obj.namespace, obj.name))


def compile_authz(objects, workload, root_namespace, warn) -> tuple:
    """``(AuthzPolicies or None, dump)``: the workload's compiled AuthorizationPolicies.

    None when no policy applies (every request is allowed).  Dry-run policies
    go to the shadow engines (:class:`~mesh.config.security_tables.ShadowEngine`),
    and to the dump's ``dry_run`` key, present only when there are some.
    ``warn(obj, path, reason)`` records a
    :class:`~mesh.config.errors.ConfigWarning`.
    """
    return _compile_policies(objects, workload, root_namespace, lambda policy: _compile_rules(policy, workload, warn))


def compile_tcp_authz(objects, workload, root_namespace, warn=None):
    """The workload's AuthorizationPolicies compiled for TCP connections (None when none applies).

    As Istio does for TCP (its authz-tcp task): an ALLOW rule that uses an HTTP-only field
    (:data:`HTTP_ONLY_ATTRIBUTES`) never matches a connection, and a DENY rule is applied
    without its HTTP-only conditions (so one that has only those denies every connection).
    Port conditions test the port each connection came to (``ctx.port``).  ``warn`` (None:
    silent) is told about each such rule; the compiler passes it when the app port is TCP.
    """
    policies, _ = _compile_policies(objects, workload, root_namespace, lambda policy: _tcp_rules(policy, warn))
    return policies


def _compile_policies(objects, workload, root_namespace, rules_of) -> tuple:
    """``(AuthzPolicies or None, dump)`` with ``rules_of(policy)`` giving each policy's predicates."""
    compiled = {(dry_run, action): [] for dry_run in (False, True) for action in ("ALLOW", "DENY")}
    dump = {key: [] for key in compiled}
    for policy in applicable(objects, AuthorizationPolicy, workload, root_namespace):
        name = f"{policy.namespace}/{policy.name}"
        key = (policy.dry_run, policy.action)
        compiled[key].append(AuthzPolicy(name, rules_of(policy)))
        dump[key].append({"name": name, "rules": [describe_rule(rule) for rule in policy.rules]})
    if not any(compiled.values()):
        return None, None
    shadow = {action: ShadowEngine.build(action, tuple(compiled[True, action])) if compiled[True, action] else None
              for action in ("ALLOW", "DENY")}
    policies = AuthzPolicies(deny=tuple(compiled[False, "DENY"]), allow=tuple(compiled[False, "ALLOW"]),
                             shadow_deny=shadow["DENY"], shadow_allow=shadow["ALLOW"])
    described = {"deny": dump[False, "DENY"], "allow": dump[False, "ALLOW"]}
    if dump[True, "DENY"] or dump[True, "ALLOW"]:
        described["dry_run"] = {"deny": dump[True, "DENY"], "allow": dump[True, "ALLOW"]}
    return policies, described


def _compile_rules(policy, workload, warn) -> tuple:
    """The predicates of a policy's rules that can match (rules decided False are left out)."""
    deny = policy.action == "DENY"
    rules = []
    for index, rule in enumerate(policy.rules):
        if workload.app_port is None and _tests_port(rule):
            warn(policy, ("spec", "rules", index), "the workload's app port is unknown, so this rule's port "
                 f"conditions cannot be evaluated: {'they count as matching' if deny else 'it never matches'}")
        predicate = compile_rule(rule, workload.app_port, deny)
        if predicate is True:
            rules.append(_always)
        elif predicate is not False:
            rules.append(predicate)
    return tuple(rules)


def _tcp_rules(policy, warn) -> tuple:
    """The predicates of a policy's rules for TCP connections (see :func:`compile_tcp_authz`)."""
    deny = policy.action == "DENY"
    rules = []
    for index, rule in enumerate(policy.rules):
        http_only = sorted({match.field for match in _all_matches(rule) if match.attribute in HTTP_ONLY_ATTRIBUTES})
        if http_only:
            if warn is not None:
                effect = ("Istio applies the rule without them, so it denies the connections its other conditions "
                          "match (every connection, if it has no other)") if deny else (
                          "Istio ignores the whole rule for TCP, so it never allows a connection")
                warn(policy, ("spec", "rules", index), f"this rule uses HTTP-only fields ({', '.join(http_only)}) and "
                     f"the workload's app port is TCP: {effect}; keep to principals, namespaces, ipBlocks and ports "
                     "for TCP workloads")
            if not deny:
                continue
            rule = _without_http(rule)
        predicate = compile_rule(rule, CONNECTION_PORT, deny)
        if predicate is True:
            rules.append(_always)
        elif predicate is not False:
            rules.append(predicate)
    return tuple(rules)


def _all_matches(rule):
    return [match for clause in rule.sources + rule.operations + (rule.conditions,) for match in clause]


def _without_http(rule) -> AuthzRule:
    """``rule`` without its HTTP-only conditions (an operation left empty matches every connection)."""
    def keep(matches):
        return tuple(match for match in matches if match.attribute not in HTTP_ONLY_ATTRIBUTES)

    return AuthzRule(sources=tuple(keep(clause) for clause in rule.sources),
                     operations=tuple(keep(clause) for clause in rule.operations),
                     conditions=keep(rule.conditions))


def compile_peer_authn(objects, workload, root_namespace, warn) -> tuple:
    """``(PeerAuthn, dump)``: the workload's effective PeerAuthentication."""
    levels = {"mesh": [], "namespace": [], "workload": []}
    for policy in applicable(objects, PeerAuthentication, workload, root_namespace):
        if policy.selector is None:
            levels["mesh" if policy.namespace == root_namespace else "namespace"].append(policy)
        elif policy.namespace != root_namespace:
            levels["workload"].append(policy)
        else:
            warn(policy, ("spec", "selector"), f"a PeerAuthentication with a selector in the root namespace "
                 f"({root_namespace}) is ignored, as in Istio; put it in the workload's namespace")
    mode, port_modes, chosen = "PERMISSIVE", (), {}
    for level, policies in levels.items():
        if not policies:
            continue
        policy = min(policies, key=lambda p: p.name)
        for other in policies:
            if other is not policy:
                warn(other, ("metadata", "name"), f"PeerAuthentication {policy.namespace}/{policy.name} also "
                     f"applies to workload {workload.namespace}/{workload.name} at the {level} level and "
                     "takes precedence (first by name); this one is ignored for it")
        chosen[level] = f"{policy.namespace}/{policy.name}"
        if policy.mode != "UNSET":
            mode = policy.mode
        port_modes = tuple((port, mode if port_mode == "UNSET" else port_mode)
                           for port, port_mode in policy.port_modes)
        for port, _ in policy.port_modes:
            if port in PROXY_PORTS:
                warn(policy, ("spec", "portLevelMtls", str(port)), f"port {port} is one of the sidecar's own ports, "
                     "which iptables never redirects to its inbound listener, so this mode applies to no "
                     f"connection (one sent straight to the inbound port {INBOUND_PORT} gets the app port's mode); "
                     "use the workload port the clients dial")
    result = PeerAuthn(mode=mode, port_modes=port_modes)
    return result, {"mode": mode, "port_modes": {str(port): value for port, value in port_modes},
                    "policies": chosen}


def describe_rule(rule) -> dict:
    """A rule as JSON values for ``/config_dump``: its conditions as text."""
    return {"from": [[_describe(match) for match in clause] for clause in rule.sources],
            "to": [[_describe(match) for match in clause] for clause in rule.operations],
            "when": [_describe(match) for match in rule.conditions]}


def _describe(match) -> str:
    return f"{match.field}: {', '.join(str(value) for value in match.values)}"


def _tests_port(rule) -> bool:
    clauses = rule.sources + rule.operations + (rule.conditions,)
    return any(match.attribute == "port" for clause in clauses for match in clause)


def _always(ctx, peer) -> bool:
    """The predicate of a rule that matches every request."""
    return True
