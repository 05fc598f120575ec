"""Which resources select which workload (mesh.config.selection) and where it is reported.

The compiler's warning (standalone sidecars), the control plane's snapshot warning and ``/proxies``
rows, ``meshctl analyze`` with proxies and the proxy-status table.  The same with real processes:
tests/integration/test_policy_selection.py.
"""

from twisted.internet.task import Clock

from mesh.cli.proxy_status import render_selection
from mesh.config.analyze import analyze, selection
from mesh.config.compile import Workload, compile_proxy_config
from mesh.config.loader import load_documents
from mesh.config.selection import selected_by, selects, unselected_warning
from mesh.config.validate import validate
from tests.unit.test_protocol import FakeStream, distributor, service_entry

SECURITY = "security.istio.io/v1"
WARNING = "matches no selector of namespace shop's policies"


def policy(kind, name, namespace="shop", selector=None):
    spec = {"selector": {"matchLabels": selector}} if selector else {}
    if kind == "AuthorizationPolicy":
        spec["rules"] = [{}]
    return {"apiVersion": SECURITY, "kind": kind, "metadata": {"name": name, "namespace": namespace}, "spec": spec}


DOCUMENTS = [policy("AuthorizationPolicy", "api-only", selector={"app": "api"}),
             policy("PeerAuthentication", "api-strict", selector={"app": "api", "tier": "back"}),
             policy("AuthorizationPolicy", "everyone"),
             policy("AuthorizationPolicy", "mesh-ratings", namespace="istio-system", selector={"app": "ratings"}),
             service_entry("api", selector={"app": "api"})]


def objects(documents=DOCUMENTS):
    loaded = load_documents(documents, "test")
    valid, errors = validate(loaded.resources)
    assert loaded.errors == [] and errors == []
    return valid


def workload(labels, name="api-1", namespace="shop"):
    return Workload(name, namespace, dict(labels), "api")


def test_a_selector_selects_the_workloads_that_have_all_its_labels():
    assert selects(None, {}) and selects((("app", "api"),), {"app": "api", "version": "v1"})
    assert not selects((("app", "api"),), {"app": "web"}) and not selects((("app", "api"),), {})
    assert not selects((("app", "api"), ("tier", "back")), {"app": "api"})


def test_the_warning_names_the_namespaces_selector_policies_the_labels_and_the_fix():
    warning = unselected_warning(objects(), workload({"version": "v1"}))
    assert warning.kind == "AuthorizationPolicy" and warning.name == "api-only" and warning.field == "spec.selector"
    assert warning.reason == (
        f"workload shop/api-1 (version=v1) {WARNING}: AuthorizationPolicy shop/api-only (app=api); "
        "PeerAuthentication shop/api-strict (app=api, tier=back); none of them applies to it. If one should, "
        "start its sidecar with the labels of that selector (for example mesh-proxy --label app=api) or fix the "
        "selector")


def test_no_warning_when_one_selector_matches_or_no_policy_of_the_namespace_has_one():
    assert unselected_warning(objects(), workload({"app": "api"})) is None
    # namespace-wide and root-namespace policies do not count: only the namespace's selectors
    assert unselected_warning(objects(), workload({}, namespace="other")) is None
    assert unselected_warning(objects(DOCUMENTS[2:]), workload({})) is None


def test_selected_by_lists_policies_by_scope_and_the_service_entries_it_is_an_endpoint_of():
    rows = selected_by(objects(), workload({"app": "api", "tier": "back"}), "istio-system")
    assert [(row["kind"], row["name"], row["scope"], row["selector"]) for row in rows] == [
        ("AuthorizationPolicy", "api-only", "workload", "app=api"),
        ("AuthorizationPolicy", "everyone", "namespace", None),
        ("PeerAuthentication", "api-strict", "workload", "app=api, tier=back"),
        ("ServiceEntry", "api", "workload", "app=api")]
    rows = selected_by(objects(), workload({"app": "ratings"}, namespace="books"), "istio-system")
    assert [(row["namespace"], row["name"]) for row in rows] == [("istio-system", "mesh-ratings")]


def test_a_standalone_compile_warns():
    config = compile_proxy_config(objects(), workload({}))
    assert [w.reason for w in config.warnings if WARNING in w.reason] != []
    assert not any(WARNING in w.reason for w in compile_proxy_config(objects(), workload({"app": "api"})).warnings)


def test_the_control_plane_sends_the_warning_and_reports_the_selection_in_its_proxy_rows():
    clock = Clock()
    dist = distributor(clock)
    dist.set_resources(DOCUMENTS)
    labelled = FakeStream("a", "shop", {"app": "api"})
    unlabelled = FakeStream("b", "shop", {"version": "v1"})
    dist.hello(labelled, "10.0.0.1")
    dist.hello(unlabelled, "10.0.0.2")
    assert labelled.warnings == []
    [warning] = unlabelled.warnings
    assert WARNING in warning and "(version=v1)" in warning
    # the policies that miss it are not in its snapshot, only the warning is
    assert {d["metadata"]["name"] for d in unlabelled.pushed[-1][1]} == {"everyone", "api"}
    rows = {row["node"]: row for row in dist.proxy_status()}
    assert rows["a"]["labels"] == {"app": "api"} and rows["a"]["selection_warning"] is None
    assert [row["name"] for row in rows["a"]["selected_by"]] == ["api-only", "everyone", "api"]
    assert rows["b"]["selection_warning"] == warning
    assert [row["name"] for row in rows["b"]["selected_by"]] == ["everyone"]
    # the warning goes with the version: fixing the selector pushes a snapshot without it
    fixed = [dict(doc) for doc in DOCUMENTS]
    fixed[0] = policy("AuthorizationPolicy", "api-only", selector={"version": "v1"})
    dist.set_resources(fixed)
    clock.advance(0.1)
    assert unlabelled.warnings == [] and len(unlabelled.pushed) == 2


def test_analyze_with_proxies_reports_the_unselected_one_and_counts_proxies_as_workloads():
    proxies = [("node-a", workload({"app": "api"}, name="api")), ("node-b", workload({}, name="api-2"))]
    found = [str(finding) for finding in analyze(objects(), proxies=proxies)]
    assert [finding for finding in found if "node-b" in finding] == [
        str(unselected_warning(objects(), proxies[1][1], describe="proxy node-b (workload shop/api-2)"))]
    assert "proxy node-b (workload shop/api-2) (no labels) " + WARNING in found[0]
    assert [finding.partition(": ")[2].partition(":")[0] for finding in found] == [
        "AuthorizationPolicy/shop/api-only", "AuthorizationPolicy/istio-system/mesh-ratings"]
    assert "and 2 proxy(ies) connected to the control plane" in found[1]
    # without the proxies, api-only matches no workload known from the files
    assert any("selector (app=api) matches no workload" in str(f) for f in analyze(objects()))
    assert selection(objects(), proxies) == [
        ("AuthorizationPolicy", "istio-system/mesh-ratings", "app=ratings", []),
        ("AuthorizationPolicy", "shop/api-only", "app=api", ["node-a"]),
        ("AuthorizationPolicy", "shop/everyone", "namespace-wide", ["node-a", "node-b"]),
        ("PeerAuthentication", "shop/api-strict", "app=api, tier=back", []),
        ("ServiceEntry", "shop/api", "app=api", ["node-a"])]


def test_proxy_status_renders_the_selection_and_the_warnings():
    rows = [{"node": "a", "labels": {"app": "api"}, "selection_warning": None,
             "selected_by": [{"kind": "AuthorizationPolicy", "namespace": "shop", "name": "api-only",
                              "scope": "workload", "selector": "app=api"},
                             {"kind": "AuthorizationPolicy", "namespace": "shop", "name": "everyone",
                              "scope": "namespace", "selector": None}]},
            {"node": "b", "labels": {}, "selected_by": [], "selection_warning": "the warning"}]
    assert "\n".join(render_selection(rows)).splitlines() == [
        "",
        "NODE  LABELS     SELECTED BY",
        "a     app=api    AuthorizationPolicy shop/api-only (app=api), AuthorizationPolicy shop/everyone "
        "(namespace-wide)",
        "b     no labels  nothing",
        "",
        "1 proxy(ies) match no selector of their namespace's policies (restart the sidecar with the right "
        "--label if a policy is meant for it):",
        "  b: the warning"]
    assert render_selection([{"node": "old"}]) == []  # a control plane that does not report selection
