"""AuthorizationPolicies compiled for one workload and evaluated by the built-in ``mesh_authorize``."""

import json

import pytest

from mesh.builtin.authz import mesh_authorize
from mesh.config.compile import Workload
from mesh.config.security_tables import NO_ALLOW_MATCHED
from mesh.plugins import make_plugin_manager
from mesh.proxy.context import RequestContext
from mesh.proxy.paths import normalize_base
from tests.harness.config_yaml import compile_yaml

USER_SERVICE = Workload("user-service", "demo", {"app": "user-service", "version": "v1"}, "user-service",
                        app_port=8080)
PAYMENT_SERVICE = Workload("payment-service", "demo", {"app": "payment-service"}, "payment-service",
                           app_port=8080)
FRONTEND = "spiffe://cluster.local/ns/frontend/sa/frontend-service-account"
CHECKOUT = "spiffe://cluster.local/ns/shop/sa/checkout"
OPS = "spiffe://cluster.local/ns/ops/sa/oncall"

#: The seed case: user-service accepts only the frontend; payment-service's
#: policies allow checkout and ops, and deny the frontend explicitly.
SEED = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: user-service, namespace: demo}
spec:
  selector: {matchLabels: {app: user-service}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/frontend/sa/frontend-service-account]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payment-service, namespace: demo}
spec:
  selector: {matchLabels: {app: payment-service}}
  rules:
  - from:
    - source: {principals: [cluster.local/ns/shop/sa/checkout, cluster.local/ns/ops/*]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payment-no-frontend, namespace: demo}
spec:
  selector: {matchLabels: {app: payment-service}}
  action: DENY
  rules:
  - from:
    - source: {principals: [cluster.local/ns/frontend/sa/frontend-service-account]}
"""


def _compile(tmp_path, text, workload=USER_SERVICE, **kwargs):
    return compile_yaml(tmp_path, text, workload=workload, name="policies.yaml", **kwargs)


def _decide(config, peer=None, source="10.0.0.5", **request):
    """``mesh_authorize``'s verdict for a request to the workload of ``config``."""
    ctx = RequestContext.for_test(source_address=source, **request)
    return mesh_authorize(ctx=ctx, peer=peer, policies=config.authz)


def _policies(rules, action="ALLOW", selector="", namespace="demo"):
    """One AuthorizationPolicy document with ``rules`` (YAML flow text)."""
    return (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: "
            f"{namespace}}}\nspec:\n  action: {action}\n{selector}  rules: {rules}\n")


# -- the seed case and Istio's evaluation order --------------------------------------------

def test_seed_user_service_accepts_only_the_frontend(tmp_path):
    config = _compile(tmp_path, SEED)
    [policy] = config.authz.allow
    assert config.authz.deny == () and len(policy.rules) == 1 and callable(policy.rules[0])
    assert _decide(config, FRONTEND) == (True, "demo/user-service")
    assert _decide(config, CHECKOUT) == (False, NO_ALLOW_MATCHED)
    assert _decide(config, None) == (False, NO_ALLOW_MATCHED)


def test_seed_payment_service_refuses_the_frontend(tmp_path):
    config = _compile(tmp_path, SEED, PAYMENT_SERVICE)
    assert _decide(config, FRONTEND) == (False, "demo/payment-no-frontend")
    assert _decide(config, CHECKOUT) == (True, "demo/payment-service")
    assert _decide(config, OPS) == (True, "demo/payment-service")
    assert _decide(config, "spiffe://cluster.local/ns/shop/sa/cart") == (False, NO_ALLOW_MATCHED)


def test_the_registered_plugin_answers_the_hook(tmp_path):
    config = _compile(tmp_path, SEED, PAYMENT_SERVICE)
    hook = make_plugin_manager(load_entry_points=False).hook.mesh_authorize
    ctx = RequestContext.for_test()
    assert hook(ctx=ctx, peer=FRONTEND, policies=config.authz) == [(False, "demo/payment-no-frontend")]
    assert hook(ctx=ctx, peer=FRONTEND, policies=None) == []


def test_no_policy_means_no_opinion(tmp_path):
    config = _compile(tmp_path, SEED, Workload("web", "demo", {"app": "web"}))
    assert config.authz is None and config.dump["authz"] is None
    assert _decide(config, None) is None


def test_deny_wins_over_allow(tmp_path):
    config = _compile(tmp_path, _policies("[{}]") + "---\n" + _policies(
        "[{to: [{operation: {methods: [DELETE]}}]}]", action="DENY").replace("name: p", "name: no-delete"))
    assert _decide(config, method="GET") == (True, "demo/p")
    assert _decide(config, method="DELETE") == (False, "demo/no-delete")


def test_only_deny_policies_allow_the_rest(tmp_path):
    config = _compile(tmp_path, _policies("[{to: [{operation: {paths: [/admin*]}}]}]", action="DENY"))
    assert _decide(config, path="/admin/users") == (False, "demo/p")
    assert _decide(config, path="/home") == (True, None)


def test_any_matching_allow_policy_allows(tmp_path):
    config = _compile(tmp_path, _policies("[{to: [{operation: {methods: [GET]}}]}]") + "---\n" + _policies(
        "[{to: [{operation: {paths: [/public/*]}}]}]").replace("name: p", "name: public"))
    assert _decide(config, method="GET", path="/x") == (True, "demo/p")
    assert _decide(config, method="POST", path="/public/form") == (True, "demo/public")
    assert _decide(config, method="POST", path="/x") == (False, NO_ALLOW_MATCHED)


def test_allow_nothing_denies_everything_and_empty_rule_allows_everything(tmp_path):
    nothing = _compile(tmp_path, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                                 "metadata: {name: allow-nothing, namespace: demo}\nspec: {}\n")
    assert _decide(nothing, FRONTEND) == (False, NO_ALLOW_MATCHED)
    assert nothing.dump["authz"] == {"deny": [], "allow": [{"name": "demo/allow-nothing", "rules": []}]}
    everything = _compile(tmp_path, _policies("[{}]"))
    assert _decide(everything, None) == (True, "demo/p")
    deny_all = _compile(tmp_path, _policies("[{}]", action="DENY"))
    assert _decide(deny_all, FRONTEND) == (False, "demo/p")


# -- sources ---------------------------------------------------------------------------------

@pytest.mark.parametrize("principals, peer, matches", [
    ("[cluster.local/ns/shop/sa/checkout]", CHECKOUT, True),
    ("[cluster.local/ns/shop/sa/checkout]", "spiffe://cluster.local/ns/shop/sa/checkout-v2", False),
    ('["cluster.local/ns/shop/*"]', CHECKOUT, True),
    ('["cluster.local/ns/shop/*"]', OPS, False),
    ('["*/sa/checkout"]', CHECKOUT, True),
    ('["*/sa/checkout"]', OPS, False),
    ('["*"]', OPS, True),
    ('["*"]', None, False),
    ("[cluster.local/ns/shop/sa/checkout]", None, False),
])
def test_principals_exact_prefix_suffix_and_presence(tmp_path, principals, peer, matches):
    config = _compile(tmp_path, _policies(f"[{{from: [{{source: {{principals: {principals}}}}}]}}]"))
    assert _decide(config, peer)[0] is matches


def test_not_principals_match_plaintext(tmp_path):
    """``notPrincipals: ["*"]`` in a DENY policy is Istio's way to refuse plaintext."""
    config = _compile(tmp_path, _policies('[{from: [{source: {notPrincipals: ["*"]}}]}]', action="DENY"))
    assert _decide(config, None) == (False, "demo/p")
    assert _decide(config, OPS) == (True, None)


def test_namespaces_come_from_the_peer_identity(tmp_path):
    config = _compile(tmp_path, _policies('[{from: [{source: {namespaces: [shop, "op*"], notNamespaces: '
                                          '[opsec]}}]}]'))
    assert _decide(config, CHECKOUT)[0] is True
    assert _decide(config, OPS)[0] is True
    assert _decide(config, "spiffe://cluster.local/ns/opsec/sa/x")[0] is False
    assert _decide(config, FRONTEND)[0] is False
    assert _decide(config, None)[0] is False
    plaintext = _compile(tmp_path, _policies("[{from: [{source: {notNamespaces: [shop]}}]}]", action="DENY"))
    assert _decide(plaintext, None)[0] is False
    assert _decide(plaintext, CHECKOUT)[0] is True


def test_ip_blocks(tmp_path):
    config = _compile(tmp_path, _policies('[{from: [{source: {ipBlocks: [10.0.0.0/8, 192.168.1.7, "fd00::/8"], '
                                          'notIpBlocks: [10.9.0.0/16]}}]}]'))
    assert _decide(config, source="10.1.2.3")[0] is True
    assert _decide(config, source="192.168.1.7")[0] is True
    assert _decide(config, source="192.168.1.8")[0] is False
    assert _decide(config, source="10.9.0.1")[0] is False
    assert _decide(config, source="fd00::1")[0] is True
    assert _decide(config, source="::ffff:10.1.2.3")[0] is True
    assert _decide(config, source="not-an-ip")[0] is False


def test_sources_are_ored_and_their_fields_anded(tmp_path):
    config = _compile(tmp_path, _policies("[{from: [{source: {namespaces: [shop], ipBlocks: [10.0.0.0/8]}}, "
                                          "{source: {principals: [cluster.local/ns/ops/sa/oncall]}}]}]"))
    assert _decide(config, CHECKOUT, source="10.0.0.1")[0] is True
    assert _decide(config, CHECKOUT, source="11.0.0.1")[0] is False
    assert _decide(config, OPS, source="11.0.0.1")[0] is True


# -- operations --------------------------------------------------------------------------------

def test_hosts_are_case_insensitive_and_include_the_port(tmp_path):
    config = _compile(tmp_path, _policies('[{to: [{operation: {hosts: [API.example.com, "api.example.com:*", '
                                          '"*.internal"], notHosts: [secret.internal]}}]}]'))
    assert _decide(config, host="Api.Example.COM")[0] is True
    assert _decide(config, host="api.example.com:8080")[0] is True
    assert _decide(config, host="db.INTERNAL")[0] is True
    assert _decide(config, host="db.internal:80")[0] is False
    assert _decide(config, host="secret.internal")[0] is False
    assert _decide(config, host="example.com")[0] is False


def test_methods_and_not_methods(tmp_path):
    config = _compile(tmp_path, _policies('[{to: [{operation: {notMethods: [DELETE, "PA*"]}}]}]'))
    assert _decide(config, method="GET")[0] is True
    assert _decide(config, method="PATCH")[0] is False
    assert _decide(config, method="DELETE")[0] is False


def test_paths_ignore_the_query_and_are_normalized(tmp_path):
    config = _compile(tmp_path, _policies('[{to: [{operation: {paths: [/admin, "/admin/*"]}}]}]', action="DENY"))
    for path in ("/admin", "/admin?x=1", "/admin/users", "/public/../admin", "/%61dmin/x", "/./admin",
                 "/public\\..\\admin/x"):
        assert _decide(config, path=path) == (False, "demo/p"), path
    for path in ("/administrator", "/public/admin", "/Admin", "//admin"):
        assert _decide(config, path=path) == (True, None), path
    suffix = _compile(tmp_path, _policies('[{to: [{operation: {notPaths: ["*.json"]}}]}]'))
    assert _decide(suffix, path="/a.json?v=1")[0] is False
    assert _decide(suffix, path="/a.html")[0] is True


@pytest.mark.parametrize("path, normalized", [
    ("/a/b", "/a/b"), ("/a/./b/../c", "/a/c"), ("/a/b/..", "/a/"), ("/..", "/"), ("/a/.", "/a/"),
    ("/%2e%2E/x", "/x"), ("/%41%7e%5F%2D", "/A~_-"), ("/a%2fb%25", "/a%2fb%25"), ("/a\\b", "/a/b"),
    ("/a//b", "/a//b"), ("/.well-known/x", "/.well-known/x"), ("*", "*"),
])
def test_base_path_normalization(path, normalized):
    assert normalize_base(path) == normalized


def test_ports_test_the_workload_app_port(tmp_path):
    text = _policies('[{to: [{operation: {ports: ["8080"]}}]}, {to: [{operation: {notPorts: ["9090"], '
                     'methods: [GET]}}]}]', action="DENY")
    config = _compile(tmp_path, text)
    assert _decide(config, method="POST") == (False, "demo/p")
    other_port = _compile(tmp_path, text, Workload("w", "demo", app_port=9090))
    assert _decide(other_port, method="GET") == (True, None)
    assert len(config.authz.deny[0].rules) == 2 and other_port.authz.deny[0].rules == ()
    assert config.warnings == () and other_port.warnings == ()


def test_unknown_app_port_fails_closed_with_a_warning(tmp_path):
    unknown = Workload("w", "demo")
    deny = _compile(tmp_path, _policies('[{to: [{operation: {ports: ["8080"]}}]}]', action="DENY"), unknown)
    assert _decide(deny) == (False, "demo/p")
    [warning] = deny.warnings
    assert str(warning).endswith("AuthorizationPolicy/demo/p: spec.rules[0]: the workload's app port is unknown, "
                                 "so this rule's port conditions cannot be evaluated: they count as matching")
    allow = _compile(tmp_path, _policies('[{to: [{operation: {notPorts: ["8080"]}}]}]'), unknown)
    assert _decide(allow) == (False, NO_ALLOW_MATCHED)
    assert str(allow.warnings[0]).endswith("cannot be evaluated: it never matches")


# -- when ------------------------------------------------------------------------------------------

def test_when_conditions_are_anded(tmp_path):
    config = _compile(tmp_path, _policies(
        '[{when: [{key: "request.headers[X-User]", values: ["admin-*", alice], notValues: [admin-root]}, '
        '{key: source.namespace, values: [shop]}, {key: source.principal, notValues: ["*/sa/cart"]}, '
        '{key: source.ip, values: [10.0.0.0/8]}, {key: destination.port, values: ["8080"]}]}]'))
    allowed = {"peer": CHECKOUT, "headers": {"x-user": "admin-7"}}
    assert _decide(config, **allowed)[0] is True
    assert _decide(config, CHECKOUT, headers={"x-user": "alice"})[0] is True
    assert _decide(config, CHECKOUT, headers={"x-user": "admin-root"})[0] is False
    assert _decide(config, CHECKOUT, headers={"x-user": "bob"})[0] is False
    assert _decide(config, CHECKOUT)[0] is False
    assert _decide(config, OPS, headers={"x-user": "alice"})[0] is False
    assert _decide(config, "spiffe://cluster.local/ns/shop/sa/cart", headers={"x-user": "alice"})[0] is False
    assert _decide(config, **allowed, source="192.168.0.1")[0] is False
    assert _decide(_compile(tmp_path, _policies("[{when: [{key: destination.port, notValues: ['8080']}]}]")),
                   CHECKOUT)[0] is False


def test_header_presence_accepts_an_empty_value(tmp_path):
    config = _compile(tmp_path, _policies('[{when: [{key: "request.headers[x-token]", values: ["*"]}]}]'))
    assert _decide(config, headers={"x-token": ""})[0] is True
    assert _decide(config)[0] is False


# -- which policies apply ------------------------------------------------------------------------------

SCOPES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: namespace-wide, namespace: demo}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/ns]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-v2, namespace: demo}
spec:
  selector: {matchLabels: {version: v2}}
  action: DENY
  rules: [{to: [{operation: {paths: [/v2]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/mesh]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: every-v1, namespace: istio-system}
spec:
  selector: {matchLabels: {version: v1}}
  action: DENY
  rules: [{to: [{operation: {paths: [/v1]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: elsewhere, namespace: other}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/other]}}]}]}
"""


def _denied_paths(config) -> list:
    return [path for path in ("/ns", "/v1", "/v2", "/mesh", "/other") if _decide(config, path=path)[0] is False]


def test_selector_namespace_and_root_scoping(tmp_path):
    assert _denied_paths(_compile(tmp_path, SCOPES)) == ["/ns", "/v1", "/mesh"]
    v2 = Workload("user-service-v2", "demo", {"app": "user-service", "version": "v2"})
    assert _denied_paths(_compile(tmp_path, SCOPES, v2)) == ["/ns", "/v2", "/mesh"]
    elsewhere = Workload("x", "other", {"version": "v1"})
    assert _denied_paths(_compile(tmp_path, SCOPES, elsewhere)) == ["/v1", "/mesh", "/other"]
    assert _denied_paths(_compile(tmp_path, SCOPES, elsewhere, root_namespace="mesh-root")) == ["/other"]
    root = Workload("gateway", "istio-system", {"version": "v1"})
    assert _denied_paths(_compile(tmp_path, SCOPES, root)) == ["/v1", "/mesh"]


def test_config_dump_describes_the_policies(tmp_path):
    config = _compile(tmp_path, SEED, PAYMENT_SERVICE)
    assert json.loads(json.dumps(config.dump["authz"])) == {
        "deny": [{"name": "demo/payment-no-frontend", "rules": [
            {"from": [["principals: cluster.local/ns/frontend/sa/frontend-service-account"]], "to": [],
             "when": []}]}],
        "allow": [{"name": "demo/payment-service", "rules": [
            {"from": [["principals: cluster.local/ns/shop/sa/checkout, cluster.local/ns/ops/*"]], "to": [],
             "when": []}]}],
    }


@pytest.mark.parametrize("peer, source, forwarded, allowed", [
    (FRONTEND, "10.0.0.5", "203.0.113.7", True),  # from a sidecar: the client it saw (its XFF entry)
    (FRONTEND, "10.0.0.5", "198.51.100.1, 203.0.113.7", True),  # the rightmost entry, the one it appended
    (FRONTEND, "203.0.113.7", "10.9.9.9", False),
    (FRONTEND, "203.0.113.7", None, True),  # no XFF: the connection's address
    (None, "10.0.0.5", "203.0.113.7", False),  # an ingress gateway's client: its own XFF is not trusted
    (None, "203.0.113.9", "10.9.9.9", True),
], ids=["peer-xff", "peer-xff-rightmost", "peer-xff-elsewhere", "peer-no-xff", "no-peer-xff-ignored",
        "no-peer-address"])
def test_remote_ip_blocks_read_the_original_client(tmp_path, peer, source, forwarded, allowed):
    """Envoy's remote address: as the sidecar that forwarded the request saw the client, else the connection's."""
    config = _compile(tmp_path, _policies("[{from: [{source: {remoteIpBlocks: [203.0.113.0/24]}}]}]"))
    headers = {"x-forwarded-for": forwarded} if forwarded else {}
    assert _decide(config, peer=peer, source=source, headers=headers)[0] is allowed
    when = _compile(tmp_path, _policies("[{when: [{key: remote.ip, notValues: [203.0.113.0/24]}]}]", action="DENY"))
    assert _decide(when, peer=peer, source=source, headers=headers)[0] is allowed
