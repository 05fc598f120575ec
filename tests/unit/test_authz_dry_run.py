"""Dry-run AuthorizationPolicies (``istio.io/dry-run``): validation, compilation and evaluation.

Their access-log fields and counter are tested in test_telemetry_accesslog.py and
test_telemetry_istio.py; the end-to-end case (a real sidecar and app: the staged DENY lets the request
through, the access log and the metric show the shadow deny) in tests/integration/test_authz_dry_run.py.
"""

import json

import pytest

from mesh.builtin.authz import mesh_authorize
from mesh.config.compile import Workload
from mesh.config.loader import load_files
from mesh.config.security_tables import NO_ALLOW_MATCHED
from mesh.proxy.context import RequestContext
from tests.harness.config_yaml import compile_yaml, validate_yaml

API = Workload("api", "shop", {"app": "api"}, "api", app_port=8080)


def policy(name, action, paths, dry_run=None, annotations=None):
    """An AuthorizationPolicy for app=api in namespace shop, matching ``paths``, as YAML."""
    annotations = dict(annotations or {})
    if dry_run is not None:
        annotations["istio.io/dry-run"] = dry_run
    meta = f"  annotations: {json.dumps(annotations)}\n" if annotations else ""
    return (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n"
            f"  namespace: shop\n{meta}spec:\n  selector: {{matchLabels: {{app: api}}}}\n  action: {action}\n"
            f"  rules: [{{to: [{{operation: {{paths: {json.dumps(paths)}}}}}]}}]\n")


def load(tmp_path, *documents):
    objects, errors, path = validate_yaml(tmp_path, *documents, name="policies.yaml")
    return objects, [str(error) for error in errors], path


def compiled(tmp_path, *documents):
    return compile_yaml(tmp_path, *documents, workload=API, name="policies.yaml")


def decide(config, path, peer=None):
    """``(verdict, ctx.authz_dry_run)`` of a GET ``path`` to the api workload."""
    ctx = RequestContext.for_test(path=path, source_address="10.0.0.5")
    return mesh_authorize(ctx=ctx, peer=peer, policies=config.authz), ctx.authz_dry_run


# -- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["yes", "True", "1", ""])
def test_a_dry_run_value_other_than_true_or_false_is_an_error_naming_its_line(tmp_path, value):
    _, errors, path = load(tmp_path, policy("staged", "DENY", ["/admin*"], dry_run=value))
    assert errors == [
        f'{path}:6: AuthorizationPolicy/shop/staged: metadata.annotations["istio.io/dry-run"]: invalid value '
        f'{value!r}: write "true" to evaluate and log the policy without enforcing it (dry run), or "false" '
        "(or remove the annotation) to enforce it"]


def test_an_unquoted_boolean_says_to_quote_it(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(policy("staged", "DENY", ["/admin*"]).replace(
        "  namespace: shop\n", "  namespace: shop\n  annotations: {istio.io/dry-run: true}\n"))
    loaded = load_files([path])
    assert [str(error) for error in loaded.errors] == [
        f'{path}:6: AuthorizationPolicy/shop/staged: metadata.annotations: metadata.annotations must map names '
        'to strings (quote numbers and booleans: "true")']


def test_true_and_false_are_read_and_other_annotations_ignored(tmp_path):
    objects, errors, _ = load(tmp_path, policy("staged", "DENY", ["/a"], dry_run="true"),
                              policy("enforced", "DENY", ["/b"], dry_run="false"),
                              policy("plain", "DENY", ["/c"], annotations={"owner": "team-a"}))
    assert errors == []
    assert {obj.name: obj.dry_run for obj in objects} == {"staged": True, "enforced": False, "plain": False}


# -- compilation and evaluation ---------------------------------------------------------------

def test_a_dry_run_deny_is_never_enforced_and_its_result_is_recorded(tmp_path):
    config = compiled(tmp_path, policy("staged", "DENY", ["/admin*"], dry_run="true"))
    assert config.authz.deny == () and config.authz.allow == () and not config.authz.enforced
    assert decide(config, "/admin/users") == ((True, None), (("deny", "denied", "shop/staged"),))
    assert decide(config, "/") == ((True, None), (("deny", "allowed", None),))
    assert config.dump["authz"] == {"deny": [], "allow": [], "dry_run": {"deny": [
        {"name": "shop/staged", "rules": [{"from": [], "to": [["paths: /admin*"]], "when": []}]}], "allow": []}}


def test_the_enforced_decision_is_unchanged_and_the_deny_shadow_runs_first(tmp_path):
    config = compiled(tmp_path, policy("staged", "DENY", ["/admin*"], dry_run="true"),
                      policy("no-secret", "DENY", ["/secret*"]))
    assert config.authz.enforced
    assert decide(config, "/secret") == ((False, "shop/no-secret"), (("deny", "allowed", None),))
    assert decide(config, "/admin") == ((True, None), (("deny", "denied", "shop/staged"),))


def test_a_dry_run_allow_is_evaluated_alone_and_only_for_requests_the_enforced_denies_let_through(tmp_path):
    """As Envoy's shadow engine of the ALLOW filter: its result is its own policies' (not the enforced
    ALLOW's), and a request an enforced DENY stopped never reaches it."""
    config = compiled(tmp_path, policy("staged-allow", "ALLOW", ["/public*"], dry_run="true"),
                      policy("allow-api", "ALLOW", ["/api*"]), policy("no-secret", "DENY", ["/secret*"]))
    assert decide(config, "/public/x") == ((False, NO_ALLOW_MATCHED), (("allow", "allowed", "shop/staged-allow"),))
    assert decide(config, "/api/x") == ((True, "shop/allow-api"), (("allow", "denied", None),))
    assert decide(config, "/secret") == ((False, "shop/no-secret"), None)


def test_both_shadow_engines(tmp_path):
    config = compiled(tmp_path, policy("staged-deny", "DENY", ["/admin*"], dry_run="true"),
                      policy("staged-allow", "ALLOW", ["/public*"], dry_run="true"))
    assert decide(config, "/admin") == ((True, None), (("deny", "denied", "shop/staged-deny"),
                                                       ("allow", "denied", None)))


def test_without_dry_run_policies_nothing_is_recorded(tmp_path):
    config = compiled(tmp_path, policy("no-secret", "DENY", ["/secret*"]))
    assert config.authz.shadow_deny is None and config.authz.shadow_allow is None
    assert "dry_run" not in config.dump["authz"]
    assert decide(config, "/") == ((True, None), None)
