"""Validation of AuthorizationPolicy: every supported field, and every rejection naming its line."""

import ipaddress
import textwrap

from mesh.config.security import AuthorizationPolicy, AuthzMatch, AuthzRule
from tests.harness.config_yaml import validate_yaml

_HEAD = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ap, namespace: shop}\n"
_PATTERNS = ("Istio matches exact values, prefixes ('abc*'), suffixes ('*abc') and any non-empty value "
             "('*')")


def _validate(tmp_path, spec):
    """Validate a policy ``ap`` in namespace shop with ``spec`` (YAML, from line 4 on)."""
    objects, errors, path = validate_yaml(tmp_path, _HEAD + textwrap.dedent(spec).lstrip("\n"), name="policy.yaml")
    return objects, [str(error) for error in errors], path


def _policy(tmp_path, spec) -> AuthorizationPolicy:
    objects, errors, _ = _validate(tmp_path, spec)
    assert errors == []
    [policy] = objects
    return policy


def _errors(tmp_path, spec, expected):
    """Assert the errors of ``spec``, given as ``(line, "field: reason")`` pairs."""
    _, errors, path = _validate(tmp_path, spec)
    assert errors == [f"{path}:{line}: AuthorizationPolicy/shop/ap: {text}" for line, text in expected]


def test_every_field(tmp_path):
    policy = _policy(tmp_path, """
        spec:
          selector:
            matchLabels: {app: web, version: v1}
          action: DENY
          rules:
          - from:
            - source:
                principals: [cluster.local/ns/a/sa/b, "cluster.local/ns/c/*"]
                notPrincipals: ["*/sa/admin"]
                namespaces: [a]
                notNamespaces: ["*"]
                ipBlocks: [10.0.0.1, 10.1.0.0/16]
                notIpBlocks: ["fd00::/8"]
            - source: {namespaces: [b]}
            to:
            - operation:
                hosts: [Web.Example.COM, "*.example.com"]
                notHosts: [admin.example.com]
                methods: [GET, HEAD]
                notMethods: [DELETE]
                paths: [/api/*, /health]
                notPaths: ["*.secret"]
                ports: ["8080"]
                notPorts: ["9090", "9091"]
            when:
            - key: request.headers[X-User]
              values: [alice, "bob*"]
              notValues: [mallory]
            - {key: source.principal, values: [cluster.local/ns/a/sa/b]}
            - {key: source.namespace, notValues: [kube-system]}
            - {key: source.ip, values: [192.168.0.0/24]}
            - {key: destination.port, values: ["8080"]}
        """)
    assert (policy.name, policy.namespace, policy.action) == ("ap", "shop", "DENY")
    assert policy.selector == (("app", "web"), ("version", "v1"))
    assert policy.source.name == "ap"
    [rule] = policy.rules
    assert rule.sources == (
        (AuthzMatch("principal", ("cluster.local/ns/a/sa/b", "cluster.local/ns/c/*"), False, None, "principals"),
         AuthzMatch("principal", ("*/sa/admin",), True, None, "notPrincipals"),
         AuthzMatch("namespace", ("a",), False, None, "namespaces"),
         AuthzMatch("namespace", ("*",), True, None, "notNamespaces"),
         AuthzMatch("ip", (ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("10.1.0.0/16")), False, None,
                    "ipBlocks"),
         AuthzMatch("ip", (ipaddress.ip_network("fd00::/8"),), True, None, "notIpBlocks")),
        (AuthzMatch("namespace", ("b",), False, None, "namespaces"),),
    )
    assert rule.operations == ((
        AuthzMatch("host", ("web.example.com", "*.example.com"), False, None, "hosts"),
        AuthzMatch("host", ("admin.example.com",), True, None, "notHosts"),
        AuthzMatch("method", ("GET", "HEAD"), False, None, "methods"),
        AuthzMatch("method", ("DELETE",), True, None, "notMethods"),
        AuthzMatch("path", ("/api/*", "/health"), False, None, "paths"),
        AuthzMatch("path", ("*.secret",), True, None, "notPaths"),
        AuthzMatch("port", (8080,), False, None, "ports"),
        AuthzMatch("port", (9090, 9091), True, None, "notPorts"),
    ),)
    assert rule.conditions == (
        AuthzMatch("header", ("alice", "bob*"), False, "x-user", "when[request.headers[X-User]].values"),
        AuthzMatch("header", ("mallory",), True, "x-user", "when[request.headers[X-User]].notValues"),
        AuthzMatch("principal", ("cluster.local/ns/a/sa/b",), False, None, "when[source.principal].values"),
        AuthzMatch("namespace", ("kube-system",), True, None, "when[source.namespace].notValues"),
        AuthzMatch("ip", (ipaddress.ip_network("192.168.0.0/24"),), False, None, "when[source.ip].values"),
        AuthzMatch("port", (8080,), False, None, "when[destination.port].values"),
    )


def test_defaults_and_empty_forms(tmp_path):
    allow_nothing = _policy(tmp_path, "spec: {}\n")
    assert (allow_nothing.action, allow_nothing.rules, allow_nothing.selector) == ("ALLOW", (), None)
    allow_all = _policy(tmp_path, "spec:\n  selector: {matchLabels: {}}\n  rules: [{}]\n")
    assert (allow_all.rules, allow_all.selector) == ((AuthzRule(),), None)
    deny_all = _policy(tmp_path, "spec: {action: DENY, rules: [{}]}\n")
    assert (deny_all.action, deny_all.rules) == ("DENY", (AuthzRule(),))
    assert _policy(tmp_path, "spec:\n  rules:\n  - to: [{operation: {paths: [/a, /a]}}]\n").rules == (
        AuthzRule(operations=((AuthzMatch("path", ("/a",), False, None, "paths"),),)),)


def test_unsupported_fields_are_rejected(tmp_path):
    _errors(tmp_path, """
        spec:
          targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: gw}
          targetRefs: []
          provider: {name: ext}
          action: CUSTOM
          rules:
          - from:
            - source:
                requestPrincipals: ["*"]
                notRequestPrincipals: [a*b]
                principals: [cluster.local/ns/a/sa/b]
            when:
            - {key: "request.auth.claims[]", values: [x]}
            - {key: source.serviceAccount, values: [a]}
            - {key: destination.ip, values: [1.2.3.4]}
            - {key: connection.sni, values: [a]}
            - {key: "experimental.envoy.filters.a.b[c]", values: [d]}
            - {key: request.method, values: [GET]}
        """, [
        (5, "spec.targetRef: 'targetRef' is not supported by txmesh; policies attached to Gateway API resources "
            "are not supported; use selector"),
        (6, "spec.targetRefs: 'targetRefs' is not supported by txmesh; policies attached to Gateway API "
            "resources are not supported; use selector"),
        (7, "spec.provider: 'provider' is not supported by txmesh; CUSTOM actions (external authorization) are "
            "not supported; remove it"),
        (8, "spec.action: action CUSTOM is not supported by txmesh; external authorization is not implemented; "
            "use ALLOW or DENY"),
        (13, f"spec.rules[0].from[0].source.notRequestPrincipals[0]: '*' can only start or end a value, not "
             f"'a*b': {_PATTERNS}"),
        (16, "spec.rules[0].when[0].key: invalid claim key 'request.auth.claims[]': write "
             "request.auth.claims[NAME], and a nested claim as request.auth.claims[OUTER][INNER]"),
        (17, "spec.rules[0].when[1].key: condition key 'source.serviceAccount' is not supported by txmesh; use "
             "source.principal (cluster.local/ns/NS/sa/SA)"),
        (18, "spec.rules[0].when[2].key: condition key 'destination.ip' is not supported by txmesh; the "
             "workload has one address; remove it"),
        (19, "spec.rules[0].when[3].key: condition key 'connection.sni' is not supported by txmesh; remove it; "
             "the SNI of mesh traffic is not meaningful to policies"),
        (20, "spec.rules[0].when[4].key: condition key 'experimental.envoy.filters.a.b[c]' is not supported by "
             "txmesh; Envoy filter metadata does not exist in txmesh; remove it"),
        (21, "spec.rules[0].when[5].key: unknown condition key 'request.method'; supported: "
             "request.headers[NAME], request.auth.claims[NAME] (nested: [OUTER][INNER]), source.principal, "
             "source.namespace, source.ip, remote.ip, destination.port, request.auth.principal, "
             "request.auth.audiences, request.auth.presenter"),
    ])


def test_audit_action_and_unknown_fields(tmp_path):
    _errors(tmp_path, """
        spec:
          action: AUDIT
          rules:
          - from: [{source: {principal: [a]}}]
            to: [{operation: {method: [GET]}}]
            unless: []
        """, [
        (5, "spec.action: action AUDIT is not supported by txmesh; audit logging policies are not implemented; "
            "remove the policy"),
        (7, "spec.rules[0].from[0].source.principal: unknown field 'principal' (did you mean 'principals'?); "
            "supported: ipBlocks, namespaces, notIpBlocks, notNamespaces, notPrincipals, notRemoteIpBlocks, "
            "notRequestPrincipals, principals, remoteIpBlocks, requestPrincipals"),
        (8, "spec.rules[0].to[0].operation.method: unknown field 'method' (did you mean 'methods'?); supported: "
            "hosts, methods, notHosts, notMethods, notPaths, notPorts, paths, ports"),
        (9, "spec.rules[0].unless: unknown field 'unless'; supported: from, to, when"),
    ])


def test_structure_problems(tmp_path):
    _errors(tmp_path, """
        spec:
          action: DENY
        """, [(4, "spec.rules: a DENY policy without rules denies nothing (Istio rejects it too); add rules, or "
                  "delete the policy")])
    _errors(tmp_path, """
        spec:
          rules:
          - from: []
            to: [{operation: {}}, {}]
          - from: [{source: {principals: []}}]
            when:
            - {values: [a]}
            - {key: "request.headers[x-a]"}
            - {key: "request.headers[bad name]", values: [a]}
        """, [
        (6, "spec.rules[0].from: 'from' must not be empty"),
        (7, "spec.rules[0].to[0].operation: set at least one of: hosts, notHosts, methods, notMethods, paths, "
            "notPaths, ports, notPorts; Istio rejects an empty operation (remove the to entry to match any "
            "operation)"),
        (7, "spec.rules[0].to[1].operation: 'operation' is required"),
        (8, "spec.rules[1].from[0].source: set at least one of: principals, notPrincipals, requestPrincipals, "
            "notRequestPrincipals, namespaces, notNamespaces, ipBlocks, notIpBlocks, remoteIpBlocks, "
            "notRemoteIpBlocks; Istio rejects an empty source (remove the from entry to match any source)"),
        (10, "spec.rules[1].when[0].key: 'key' is required"),
        (11, f"spec.rules[1].when[1]: {_no_values('request.headers[x-a]')}"),
        (12, "spec.rules[1].when[2].key: invalid header name 'bad name' in 'request.headers[bad name]'"),
    ])


def test_value_problems(tmp_path):
    _errors(tmp_path, """
        spec:
          rules:
          - from:
            - source:
                principals: ["spiffe://cluster.local/ns/a/sa/b", "cluster.local/ns/*/sa/b"]
                namespaces: ["**"]
                ipBlocks: [10.0.0.300, 10.0.0.0/33, "*"]
            to:
            - operation:
                paths: ["/api/{*}/items"]
                hosts: ["*.example.*"]
                ports: [8080, "0", "http", "65536"]
            when:
            - {key: destination.port, values: ["80*"]}
            - {key: source.ip, notValues: [example.com]}
        """, [
        (8, "spec.rules[0].from[0].source.principals[0]: write principals without 'spiffe://': "
            "'cluster.local/ns/a/sa/b'"),
        (8, "spec.rules[0].from[0].source.principals[1]: '*' can only start or end a value, not "
            f"'cluster.local/ns/*/sa/b': {_PATTERNS}"),
        (9, f"spec.rules[0].from[0].source.namespaces[0]: '*' can only start or end a value, not '**': {_PATTERNS}"),
        (10, "spec.rules[0].from[0].source.ipBlocks[0]: invalid IP address or CIDR range '10.0.0.300' (like "
             "10.0.0.1 or 10.0.0.0/16)"),
        (10, "spec.rules[0].from[0].source.ipBlocks[1]: invalid IP address or CIDR range '10.0.0.0/33' (like "
             "10.0.0.1 or 10.0.0.0/16)"),
        (10, "spec.rules[0].from[0].source.ipBlocks[2]: invalid IP address or CIDR range '*' (like 10.0.0.1 or "
             "10.0.0.0/16)"),
        (13, "spec.rules[0].to[0].operation.paths[0]: path templates ('/api/{*}/items') are not supported by "
             "txmesh; use a prefix ('/api/*') or suffix ('*.json') match"),
        (14, f"spec.rules[0].to[0].operation.hosts[0]: '*' can only start or end a value, not '*.example.*': "
             f"{_PATTERNS}"),
        (15, "spec.rules[0].to[0].operation.ports[0]: must be a non-empty string, not a number"),
        (15, "spec.rules[0].to[0].operation.ports[1]: invalid port '0'; use a number from 1 to 65535, as a string"),
        (15, "spec.rules[0].to[0].operation.ports[2]: invalid port 'http'; use a number from 1 to 65535, as a "
             "string"),
        (15, "spec.rules[0].to[0].operation.ports[3]: invalid port '65536'; use a number from 1 to 65535, as a "
             "string"),
        (17, "spec.rules[0].when[0].values[0]: invalid port '80*'; use a number from 1 to 65535, as a string"),
        (18, "spec.rules[0].when[1].notValues[0]: invalid IP address or CIDR range 'example.com' (like 10.0.0.1 "
             "or 10.0.0.0/16)"),
    ])


def test_selector_labels_are_checked(tmp_path):
    _errors(tmp_path, """
        spec:
          selector:
            matchLabels: {app: "we b"}
            labels: {app: web}
          rules: [{}]
        """, [
        (6, 'spec.selector.matchLabels.app: invalid label value \'we b\': at most 63 letters, digits, \'-\', \'_\' '
            "and '.'"),
        (7, "spec.selector.labels: unknown field 'labels'; supported: matchLabels"),
    ])


def _no_values(key):
    return (f"at least one of values or notValues must list a value for '{key}' (an empty or null list counts "
            "as unset, as in Istio); list the values to match, or remove the when entry")


def test_when_condition_with_empty_values_is_rejected(tmp_path):
    """An empty or null values/notValues list is unset (as in Istio): a condition with neither is an error,
    not a condition dropped from the rule, which would then match every request."""
    _errors(tmp_path, """
        spec:
          rules:
          - when:
            - {key: source.ip, values: []}
            - {key: source.ip, values: null}
            - {key: source.namespace, notValues: []}
            - {key: source.principal, values: [], notValues: null}
        """, [
        (7, f"spec.rules[0].when[0]: {_no_values('source.ip')}"),
        (8, f"spec.rules[0].when[1]: {_no_values('source.ip')}"),
        (9, f"spec.rules[0].when[2]: {_no_values('source.namespace')}"),
        (10, f"spec.rules[0].when[3]: {_no_values('source.principal')}"),
    ])
    _errors(tmp_path, """
        spec:
          action: DENY
          rules:
          - when:
            - key: request.headers[x-debug]
              values: []
        """, [(8, f"spec.rules[0].when[0]: {_no_values('request.headers[x-debug]')}")])
    # one list with a value is enough; the other may be empty or null
    [rule] = _policy(tmp_path, """
        spec:
          rules:
          - when:
            - {key: source.ip, values: [], notValues: [10.0.0.0/8]}
            - {key: source.namespace, values: [a], notValues: null}
        """).rules
    assert rule.conditions == (
        AuthzMatch("ip", (ipaddress.ip_network("10.0.0.0/8"),), True, None, "when[source.ip].notValues"),
        AuthzMatch("namespace", ("a",), False, None, "when[source.namespace].values"),
    )


def test_null_list_items_are_rejected(tmp_path):
    """A null rule would read as {} (every request); null from/to/when items are rejected the same way."""
    null_rule = "spec.rules[0]: a rule must not be null; write {} for a rule that matches every request, or " \
                "remove the item"
    _errors(tmp_path, "spec:\n  rules: [null]\n", [(5, null_rule)])
    _errors(tmp_path, """
        spec:
          action: DENY
          rules:
          -
        """, [(7, null_rule)])
    _errors(tmp_path, """
        spec:
          rules:
          - {}
          - from: [null]
            to:
            -
            when:
            - {key: source.ip, values: [10.0.0.1]}
            -
        """, [
        (7, "spec.rules[1].from[0]: a from entry must not be null; write {source: {...}}, or remove the item (a "
            "rule without from matches any source)"),
        (9, "spec.rules[1].to[0]: a to entry must not be null; write {operation: {...}}, or remove the item (a "
            "rule without to matches any operation)"),
        (12, "spec.rules[1].when[1]: a when condition must not be null; write {key: ..., values: [...]}, or "
             "remove the item"),
    ])


def test_a_null_from_or_to_list_is_no_condition_as_istio_reads_it(tmp_path):
    """``from:`` or ``to:`` with nothing after it is a null list, which Istio reads as absent."""
    policy = _policy(tmp_path, """
        spec:
          rules:
          - from:
            to: [{operation: {methods: [GET]}}]
          - to:
        """)
    assert [(rule.sources, len(rule.operations)) for rule in policy.rules] == [((), 1), ((), 0)]
