"""SubjectAccessReview for the test API server, by evaluating the RBAC objects it stores.

A faithful subset of Kubernetes' RBAC authorizer, exactly what txmesh asks: mesh-control reviews
whether a gateway's service account may ``get`` ``secrets`` in its namespace
(:mod:`mesh.control.kube.secretaccess`).  :func:`review` answers a ``SubjectAccessReview``
(``authorization.k8s.io/v1``) body with ``status.allowed`` and a ``reason``:

- the user is ``spec.user`` with ``spec.groups``; a ``system:serviceaccount:NS:SA`` user also is in
  the groups ``system:serviceaccounts`` and ``system:serviceaccounts:NS``, as the API server adds them;
- a subject matches as ``ServiceAccount`` (name and namespace), ``User`` (name) or ``Group`` (name);
- ClusterRoleBindings grant their ClusterRole's rules in every namespace; the RoleBindings of the
  attributes' namespace grant their Role's (of that namespace) or ClusterRole's rules there;
- a rule matches when its ``apiGroups``, ``resources`` and ``verbs`` hold the asked ones or ``*``, and its
  ``resourceNames`` are empty or hold the asked name (a rule with names never matches a request without one).

Not modelled: aggregated ClusterRoles, nonResourceAttributes, subresources, other authorizers.
"""

from __future__ import annotations

import re

from .kuberesources import ApiError, Resources

_SERVICE_ACCOUNT = re.compile(r"^system:serviceaccount:(?P<ns>[^:]+):(?P<sa>[^:]+)$")
RBAC = "rbac.authorization.k8s.io"


def review(resources: Resources, body: dict) -> dict:
    """The answered SubjectAccessReview ``body`` (its spec, and a status)."""
    spec = body.get("spec") if isinstance(body, dict) else None
    attributes = (spec or {}).get("resourceAttributes")
    if not isinstance(spec, dict) or not isinstance(attributes, dict) or not spec.get("user"):
        raise ApiError(422, "Invalid", "SubjectAccessReview.authorization.k8s.io \"\" is invalid: spec: Invalid "
                       "value: this test server answers resourceAttributes reviews for a user only")
    binding = _granting_binding(resources, spec["user"], spec.get("groups") or [], attributes)
    if binding is None:
        status = {"allowed": False}
    else:
        status = {"allowed": True, "reason": f"RBAC: allowed by {binding}"}
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "metadata": {},
            "spec": spec, "status": status}


def _granting_binding(resources: Resources, user: str, groups: list, attributes: dict) -> str | None:
    """``KIND NAMESPACE/NAME`` of a binding that grants ``attributes`` to the user, or None."""
    namespace = attributes.get("namespace") or ""
    bindings = [("ClusterRoleBinding", obj) for obj in _objects(resources, "clusterrolebindings", None)]
    if namespace:
        bindings += [("RoleBinding", obj) for obj in _objects(resources, "rolebindings", namespace)]
    for kind, binding in bindings:
        if not any(_subject_matches(subject, user, groups) for subject in binding.get("subjects") or []):
            continue
        if any(_rule_matches(rule, attributes) for rule in _role_rules(resources, kind, binding, namespace)):
            metadata = binding.get("metadata") or {}
            return f"{kind} \"{metadata.get('name')}\"" + (f" of namespace \"{namespace}\""
                                                          if kind == "RoleBinding" else "")
    return None


def _objects(resources: Resources, plural: str, namespace: str | None) -> list:
    """The stored objects of ``plural`` (of ``namespace``; None: a cluster-scoped type)."""
    return resources.store.items(resources.lookup(RBAC, "v1", plural).storage, namespace)


def _subject_matches(subject: dict, user: str, groups: list) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    match = _SERVICE_ACCOUNT.match(user)
    if kind == "ServiceAccount":
        return match is not None and (match["ns"], match["sa"]) == (subject.get("namespace"), name)
    if kind == "User":
        return name == user
    if kind == "Group":
        implied = ["system:serviceaccounts", f"system:serviceaccounts:{match['ns']}"] if match else []
        return name in [*groups, *implied]
    return False


def _role_rules(resources: Resources, kind: str, binding: dict, namespace: str) -> list:
    """The rules of the role ``binding`` refers to (none if it does not exist, as RBAC treats it)."""
    ref = binding.get("roleRef") or {}
    plural = {"ClusterRole": "clusterroles", "Role": "roles"}.get(ref.get("kind"))
    if plural is None or (plural == "roles" and kind == "ClusterRoleBinding"):
        return []
    store_namespace = namespace if plural == "roles" else ""
    role = resources.store.get(resources.lookup(RBAC, "v1", plural).storage, store_namespace, ref.get("name") or "")
    return (role or {}).get("rules") or []


def _rule_matches(rule: dict, attributes: dict) -> bool:
    def holds(field: str, value: str) -> bool:
        listed = rule.get(field) or []
        return value in listed or "*" in listed

    names = rule.get("resourceNames") or []
    return (holds("apiGroups", attributes.get("group") or "") and holds("resources", attributes.get("resource") or "")
            and holds("verbs", attributes.get("verb") or "")
            and (not names or (attributes.get("name") or "") in names))
