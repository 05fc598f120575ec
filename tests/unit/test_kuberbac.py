"""The test API server's SubjectAccessReview: RBAC evaluation over its stored roles and bindings."""

from __future__ import annotations

import pytest

from tests.harness.kuberbac import RBAC, review
from tests.harness.kuberesources import ApiError, Resources
from tests.harness.kubestore import Store

GET_SECRETS = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}


def sar(namespace="shop", sa="gw", verb="get", resource="secrets", name=None, group=""):
    attributes = {"namespace": namespace, "verb": verb, "group": group, "resource": resource}
    if name:
        attributes["name"] = name
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": f"system:serviceaccount:{namespace}:{sa}", "resourceAttributes": attributes}}


def make(resources, plural, namespace, body):
    resources.create(resources.lookup(RBAC, "v1", plural), namespace, body)


def bind(resources, plural, namespace, name, role_kind, role, subjects):
    make(resources, plural, namespace, {"metadata": {"name": name}, "subjects": subjects,
                                        "roleRef": {"apiGroup": RBAC, "kind": role_kind, "name": role}})


@pytest.fixture
def resources():
    resources = Resources(Store())
    resources.create(resources.lookup("", "v1", "namespaces"), None, {"metadata": {"name": "shop"}})
    make(resources, "roles", "shop", {"metadata": {"name": "secret-reader"}, "rules": [GET_SECRETS]})
    return resources


def allowed(resources, **kwargs) -> bool:
    return review(resources, sar(**kwargs))["status"]["allowed"]


def test_nothing_is_allowed_without_a_binding(resources):
    assert allowed(resources) is False


def test_a_rolebinding_to_the_service_account_allows_its_namespace_only(resources):
    bind(resources, "rolebindings", "shop", "gw-secrets", "Role", "secret-reader",
         [{"kind": "ServiceAccount", "name": "gw", "namespace": "shop"}])
    answer = review(resources, sar())
    assert answer["status"] == {"allowed": True, "reason": 'RBAC: allowed by RoleBinding "gw-secrets" of '
                                                           'namespace "shop"'}
    assert allowed(resources, sa="other") is False
    assert allowed(resources, verb="delete") is False
    assert allowed(resources, resource="configmaps") is False
    assert allowed(resources, group="apps") is False


def test_groups_cluster_roles_wildcards_and_resource_names(resources):
    make(resources, "clusterroles", None, {"metadata": {"name": "all"}, "rules": [
        {"apiGroups": [""], "resources": ["*"], "verbs": ["*"]}]})
    make(resources, "clusterroles", None, {"metadata": {"name": "one"}, "rules": [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["tls"]}]})
    bind(resources, "rolebindings", "shop", "named", "ClusterRole", "one",
         [{"kind": "Group", "name": "system:serviceaccounts:shop"}])
    assert allowed(resources, name="tls") is True
    assert allowed(resources, name="db") is False and allowed(resources) is False  # names set: a name is needed
    bind(resources, "clusterrolebindings", None, "everyone", "ClusterRole", "all",
         [{"kind": "Group", "name": "system:serviceaccounts"}])
    assert allowed(resources, verb="list") is True and allowed(resources, namespace="default") is True


def test_a_binding_to_a_missing_role_grants_nothing_and_a_bad_review_is_422(resources):
    bind(resources, "rolebindings", "shop", "dangling", "Role", "missing",
         [{"kind": "ServiceAccount", "name": "gw", "namespace": "shop"}])
    bind(resources, "clusterrolebindings", None, "wrong", "Role", "secret-reader",
         [{"kind": "ServiceAccount", "name": "gw", "namespace": "shop"}])
    assert allowed(resources) is False
    with pytest.raises(ApiError) as raised:
        review(resources, {"spec": {"user": "x"}})
    assert raised.value.code == 422
