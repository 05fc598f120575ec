"""Which policies select which proxy: a sidecar without the ``--label`` a selector needs is never silent.

A real control plane (``--config-dir``) holds, for the ``api`` workload of namespace ``default``, an
AuthorizationPolicy and a PeerAuthentication selecting ``app=api`` and a ServiceEntry whose
``workloadSelector`` is ``app=api``.  Two sidecars of that workload connect: ``api`` started with
``--label app=api``, and ``api-unlabelled`` started with ``--label version=v1`` only (the mistake: the
policies silently do not apply to it).  Then:

- ``meshctl proxy-status`` (table and ``-o json``) shows what selects each proxy, and warns about the
  unlabelled one;
- ``meshctl analyze --control-admin`` reports it as a finding and shows which resource selects which
  proxy;
- the unlabelled sidecar's own log says so, naming the policies, its labels and the ``--label`` to add
  (the control plane sends the warning in its snapshot); the labelled one's log does not;
- a standalone sidecar (``--config-dir``) without the label logs the same warning, from its own config.
"""

from __future__ import annotations

import json

import pytest

from tests.harness import wait_for
from tests.integration.test_distribution_support import ControlledProxy, proxies, selector_service
from tests.integration.test_identity_support import authorization_policy, peer_authentication
from tests.integration.test_meshctl_ops import meshctl
from tests.integration.test_proxy_support import write_config

SELECTOR = {"app": "api"}
WARNING = "matches no selector of namespace default's policies"


def policies():
    return (authorization_policy("deny-admin", "default", selector=SELECTOR, action="DENY",
                                 rules=[{"to": [{"operation": {"paths": ["/admin*"]}}]}]),
            peer_authentication("api-mtls", "default", "PERMISSIVE", selector=SELECTOR),
            selector_service("api", selector=SELECTOR))


@pytest.fixture(scope="module")
def mesh(control_factory, backend_factory, process_log_dir, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("selection-config"), *policies())
    control = control_factory(extra_args=["--config-dir", str(config)])
    started = []
    for workload, labels in (("api", SELECTOR), ("api-unlabelled", {"version": "v1"})):
        app = backend_factory(workload)
        started.append(ControlledProxy(control, workload, service_account="api", app_port=app.port, labels=labels,
                                       log_dir=process_log_dir).start())
    rows = wait_for(lambda: (lambda r: r if {"api", "api-unlabelled"} <= set(r) and all(
        row["version_acked"] == row["version_sent"] for row in r.values()) else None)(proxies(control)),
        20, what="both sidecars to ACK their config")
    yield {"control": control, "config": config, "labelled": started[0], "unlabelled": started[1],
           "nodes": {workload: row["node"] for workload, row in rows.items()},
           "admin": f"127.0.0.1:{control.admin_port}"}
    for proxy in reversed(started):
        proxy.stop()


def test_proxy_status_shows_what_selects_each_proxy_and_warns_about_the_unlabelled_one(mesh):
    nodes = mesh["nodes"]
    code, out, err = meshctl("proxy-status", "--control-admin", mesh["admin"])
    assert code == 0, err
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.split()[:3] == ["NODE", "LABELS", "SELECTED"]))
    rows = {line.split()[0]: line for line in lines[header + 1:header + 3]}
    assert rows[nodes["api"]].split()[1] == "app=api"
    assert ("AuthorizationPolicy default/deny-admin (app=api), PeerAuthentication default/api-mtls (app=api), "
            "ServiceEntry default/api (app=api)") in rows[nodes["api"]]
    assert rows[nodes["api-unlabelled"]].split()[1:] == ["version=v1", "nothing"]
    warning = next(line for line in lines if line.startswith(f"  {nodes['api-unlabelled']}: "))
    assert WARNING in warning and "(version=v1)" in warning and "--label app=api" in warning
    assert "AuthorizationPolicy default/deny-admin (app=api); PeerAuthentication default/api-mtls (app=api)" in warning
    assert not any(line.startswith(f"  {nodes['api']}: ") for line in lines)

    code, out, err = meshctl("proxy-status", "--control-admin", mesh["admin"], "-o", "json")
    rows = {row["node"]: row for row in json.loads(out)["proxies"]}
    labelled, unlabelled = rows[nodes["api"]], rows[nodes["api-unlabelled"]]
    assert labelled["labels"] == SELECTOR and labelled["selection_warning"] is None
    assert [(row["kind"], row["name"], row["scope"], row["selector"]) for row in labelled["selected_by"]] == [
        ("AuthorizationPolicy", "deny-admin", "workload", "app=api"),
        ("PeerAuthentication", "api-mtls", "workload", "app=api"),
        ("ServiceEntry", "api", "workload", "app=api")]
    assert unlabelled["labels"] == {"version": "v1"} and unlabelled["selected_by"] == []
    assert WARNING in unlabelled["selection_warning"]


def test_analyze_with_the_control_plane_reports_the_proxy_and_which_policy_selects_which_proxy(mesh):
    nodes, config = mesh["nodes"], mesh["config"]
    code, out, err = meshctl("analyze", config, "--control-admin", mesh["admin"])
    assert code == 1, (out, err)
    assert "1 finding(s) in 1 file(s)" in err
    [finding] = [line for line in out.splitlines() if line.startswith(str(config))]
    assert finding.startswith(f"{config}/mesh.yaml:")
    assert (f"AuthorizationPolicy/default/deny-admin: spec.selector: proxy {nodes['api-unlabelled']} (workload "
            f"default/api-unlabelled) (version=v1) {WARNING}") in finding
    assert "--label app=api" in finding
    lines = out.splitlines()
    start = lines.index("which resources select which of the 2 connected proxy(ies):")
    table = {tuple(line.split()[:3]): line.split()[3:] for line in lines[start + 2:]}
    assert table == {("AuthorizationPolicy", "default/deny-admin", "app=api"): [nodes["api"]],
                     ("PeerAuthentication", "default/api-mtls", "app=api"): [nodes["api"]],
                     ("ServiceEntry", "default/api", "app=api"): [nodes["api"]]}


def test_analyze_says_what_to_do_when_the_control_plane_cannot_be_reached(mesh, tmp_path):
    from tests.harness import free_port
    port = free_port()
    code, out, err = meshctl("analyze", mesh["config"], "--control-admin", f"127.0.0.1:{port}")
    assert code == 1 and out == ""
    assert f"meshctl analyze: cannot reach the control plane's admin port at http://127.0.0.1:{port}/proxies" in err
    assert f"--admin-port {port}" in err


def test_the_unlabelled_sidecar_logs_a_warning_naming_the_policies_and_the_label_to_add(mesh):
    unlabelled, labelled = mesh["unlabelled"], mesh["labelled"]
    line = wait_for(lambda: next((line for line in unlabelled.log_path.read_text().splitlines()
                                  if "config warning:" in line and WARNING in line), None),
                    5.0, what="the unlabelled sidecar's warning")
    assert "workload default/api-unlabelled (version=v1)" in line
    assert "AuthorizationPolicy default/deny-admin (app=api)" in line and "--label app=api" in line
    assert WARNING not in labelled.log_path.read_text()
    warnings = unlabelled.admin("/config_dump")["warnings"]
    assert any(WARNING in warning for warning in warnings)


def test_a_standalone_sidecar_without_the_label_logs_the_warning_too(proxy_factory, backend_factory, tmp_path):
    config = write_config(tmp_path / "config", *policies())
    app = backend_factory("api-standalone")
    proxy = proxy_factory(config, "api-standalone", app_port=app.port)
    text = proxy.log_path.read_text()
    assert "config warning:" in text and f"workload default/api-standalone (no labels) {WARNING}" in text
    assert "--label app=api" in text
