"""Dry-run AuthorizationPolicies with a real sidecar and app: staged, logged, counted, never enforced.

One sidecar (standalone, plaintext inbound) in front of the demo app, with two DENY policies for its
workload: ``staged-admin`` (``istio.io/dry-run: "true"``, paths ``/admin*``) and ``no-secret``
(enforced, paths ``/secret*``).  Istio's semantics: the staged DENY lets ``/admin`` through to the app,
and the access log and ``mesh_authz_dry_run_total`` show that it would have been denied; the enforced
DENY still answers 403 and the app never sees the request.
"""

from __future__ import annotations

import pytest

from tests.harness import curl, free_port, wait_for
from tests.integration.test_identity_support import authorization_policy
from tests.integration.test_meshctl_ops import meshctl
from tests.integration.test_proxy_support import write_config
from tests.integration.test_telemetry_support import access_log, scrape

NS = "shop"
SELECTOR = {"app": "api"}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, backend_factory, proxy_factory):
    staged = authorization_policy("staged-admin", NS, selector=SELECTOR, action="DENY",
                                  rules=[{"to": [{"operation": {"paths": ["/admin*"]}}]}])
    staged["metadata"]["annotations"] = {"istio.io/dry-run": "true"}
    enforced = authorization_policy("no-secret", NS, selector=SELECTOR, action="DENY",
                                    rules=[{"to": [{"operation": {"paths": ["/secret*"]}}]}])
    config = write_config(tmp_path_factory.mktemp("dry-run-config"), staged, enforced)
    app = backend_factory("api")
    log = tmp_path_factory.mktemp("dry-run-logs") / "access.log"
    metrics_port = free_port()
    proxy = proxy_factory(config, "api", namespace=NS, app_port=app.port, labels=SELECTOR,
                          extra_args=["--access-log", log, "--metrics-port", metrics_port])
    return {"proxy": proxy, "log": log, "metrics_port": metrics_port}


def logged(sidecar, path: str) -> dict:
    """The access-log entry of the one inbound request to ``path`` (waits for the one-second flush)."""
    def entry():
        found = [line for line in access_log(sidecar["log"]) if line["path"] == path]
        return found[0] if found else None
    return wait_for(entry, 5.0, what=f"the access-log line of {path}")


def dry_run_counts(sidecar) -> dict:
    """``{(action, result): count}`` of ``mesh_authz_dry_run_total`` on the sidecar's metrics port."""
    counts = {}
    for line in scrape(sidecar["metrics_port"], "/stats/prometheus").decode().splitlines():
        if line.startswith("mesh_authz_dry_run_total{"):
            labels, _, value = line.partition("} ")
            pairs = dict(part.split("=", 1) for part in labels.partition("{")[2].split(","))
            counts[pairs["authz_dry_run_action"].strip('"'), pairs["authz_dry_run_result"].strip('"')] = float(value)
    return counts


def test_a_dry_run_deny_lets_the_request_reach_the_app_and_logs_and_counts_the_shadow_deny(sidecar):
    proxy = sidecar["proxy"]
    result = curl(f"{proxy.inbound_url}/admin/users")
    assert result.status == 200, result
    assert result.headers.get("x-demo-service") == "api" and result.json()["path"] == "/admin/users"
    entry = logged(sidecar, "/admin/users")
    assert (entry["response_code"], entry["authz_policy"]) == (200, None)
    assert (entry["istio_dry_run_deny_shadow_engine_result"],
            entry["istio_dry_run_deny_shadow_effective_policy_id"]) == ("denied", f"{NS}/staged-admin")
    assert "istio_dry_run_allow_shadow_engine_result" not in entry  # no dry-run ALLOW policy applies
    assert wait_for(lambda: dry_run_counts(sidecar).get(("deny", "denied")) == 1.0, 5.0,
                    what="the shadow deny to be counted")


def test_a_request_the_staged_policy_would_allow_is_logged_as_shadow_allowed(sidecar):
    assert curl(f"{sidecar['proxy'].inbound_url}/public").status == 200
    entry = logged(sidecar, "/public")
    assert (entry["istio_dry_run_deny_shadow_engine_result"],
            entry["istio_dry_run_deny_shadow_effective_policy_id"]) == ("allowed", None)


def test_an_enforced_deny_still_denies(sidecar):
    result = curl(f"{sidecar['proxy'].inbound_url}/secret/key")
    assert result.status == 403 and result.body.strip() == b"RBAC: access denied"
    assert "x-demo-service" not in result.headers  # answered by the sidecar: the app never saw it
    entry = logged(sidecar, "/secret/key")
    assert (entry["response_code"], entry["authz_policy"]) == (403, f"{NS}/no-secret")
    assert entry["istio_dry_run_deny_shadow_engine_result"] == "allowed"  # the staged policy ran first
    counts = wait_for(lambda: (lambda c: c if c.get(("deny", "allowed")) == 2.0 else None)(dry_run_counts(sidecar)),
                      5.0, what="the shadow results of all three requests to be counted")
    assert counts == {("deny", "denied"): 1.0, ("deny", "allowed"): 2.0}


def test_proxy_config_authz_shows_the_staged_policy_as_dry_run(sidecar):
    authz = sidecar["proxy"].admin("/config_dump")["config"]["authz"]
    assert [policy["name"] for policy in authz["deny"]] == [f"{NS}/no-secret"]
    assert [policy["name"] for policy in authz["dry_run"]["deny"]] == [f"{NS}/staged-admin"]
    code, out, err = meshctl("proxy-config", "authz", "--admin", f"127.0.0.1:{sidecar['proxy'].admin_port}")
    assert code == 0, err
    rows = {line.split("  ")[0]: line for line in out.splitlines() if f"{NS}/" in line}
    assert f"{NS}/staged-admin" in rows["DENY (dry run)"] and f"{NS}/no-secret" in rows["DENY"]
    assert "dry-run policies are evaluated, logged and counted, never enforced" in out
