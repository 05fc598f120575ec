"""Check Kubernetes manifests against the ``kubernetes`` client's models (imported lazily).

``check_model(obj)`` deserializes a manifest dict into its model class (e.g.
``V1Deployment``), which checks required fields and types, then serializes it
back: a field the model does not know is dropped on the way, so any difference
from the input names a misspelt or misplaced field.  Used by the tests of
``meshctl inject`` and of deploy/.
"""

from __future__ import annotations

#: (apiVersion, kind) -> model class name of the ``kubernetes`` client.
MODELS = {
    ("v1", "Pod"): "V1Pod",
    ("v1", "Service"): "V1Service",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("apps/v1", "DaemonSet"): "V1DaemonSet",
    ("apps/v1", "ReplicaSet"): "V1ReplicaSet",
    ("batch/v1", "Job"): "V1Job",
    ("batch/v1", "CronJob"): "V1CronJob",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration"): "V1MutatingWebhookConfiguration",
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): "V1CustomResourceDefinition",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
}


def model_name(obj: dict) -> str | None:
    return MODELS.get((obj.get("apiVersion"), obj.get("kind")))


def _prune(value):
    """JSON as the client serializes it: no None values, no empty-dict-vs-missing noise."""
    if isinstance(value, dict):
        return {k: _prune(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


def _differences(expected, actual, path="") -> list[str]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for key in expected:
            if key not in actual:
                out.append(f"{path}.{key}: not a field of the model (dropped)")
            else:
                out.extend(_differences(expected[key], actual[key], f"{path}.{key}"))
        for key in actual:
            if key not in expected:
                out.append(f"{path}.{key}: added by the model ({actual[key]!r})")
        return out
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        out = []
        for i, (e, a) in enumerate(zip(expected, actual)):
            out.extend(_differences(e, a, f"{path}[{i}]"))
        return out
    if expected != actual:
        return [f"{path or '.'}: {expected!r} became {actual!r}"]
    return []


def check_model(obj: dict):
    """Load ``obj`` into its model; return ``(model, problems)``. Raises KeyError for an unknown kind."""
    from kubernetes.client import ApiClient

    name = model_name(obj)
    if name is None:
        raise KeyError(f"no kubernetes model for apiVersion {obj.get('apiVersion')!r} kind {obj.get('kind')!r}")
    client = ApiClient()
    try:
        model = client._ApiClient__deserialize(obj, name)  # the client's own JSON -> model path
    except Exception as error:
        return None, [f"{name}: {type(error).__name__}: {error}"]
    back = client.sanitize_for_serialization(model)
    return model, _differences(_prune(obj), _prune(back))
