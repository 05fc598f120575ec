"""Resource semantics of the test Kubernetes API server: what each verb does to which resource.

:class:`Resources` implements get, list, create, replace, patch and delete on top of the
:class:`~tests.harness.kubestore.Store`, the way the real API server's generic registry does:

- ``metadata.uid``, ``creationTimestamp`` and ``generation`` are filled in; create of an existing name is
  409 AlreadyExists; replace or patch with a stale ``metadata.resourceVersion`` is 409 Conflict; a missing
  object is 404 NotFound; a namespaced object needs its namespace to exist (404, like NamespaceLifecycle);
- for resources with a ``status`` subresource (pods, services, custom resources that declare it), writes
  to the main resource keep the stored status and ``/status`` writes change only the status;
- defaults a real server fills in: a Service's clusterIP, a Secret's ``stringData`` folded into ``data``,
  a Pod's ``Pending`` phase and service account, a namespace's ``Active`` phase, a
  MutatingWebhookConfiguration's v1 webhook defaults (failurePolicy, matchPolicy, selectors, timeoutSeconds,
  reinvocationPolicy, rule scope, service port 443) after the checks a real server makes of its fields;
- core v1 Events and events.k8s.io/v1 Events are one storage in two representations;
- creating a CustomResourceDefinition serves its group/versions/plural; deleting it deletes its objects.

Errors are :class:`ApiError`, rendered as a ``Status`` with the real server's reason and wording.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import time
import uuid
from dataclasses import dataclass, field

from .kubepatch import PatchError, UnsupportedMediaType, apply_patch
from .kubeselectors import selector
from .kubestore import Expired, Store


class ApiError(Exception):
    """An API error: ``code`` (HTTP status), ``reason`` (NotFound, AlreadyExists, Conflict, Invalid, ...)."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        """The ``Status`` object the real API server sends for this error."""
        status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            status["details"] = self.details
        return status


def not_found(plural: str, name: str, group: str = "") -> ApiError:
    """404 for a missing object, worded as by the real server (``pods "x" not found``)."""
    resource = f"{plural}.{group}" if group else plural
    return ApiError(404, "NotFound", f'{resource} "{name}" not found', {"name": name, "group": group, "kind": plural})


def invalid(kind: str, name: str, group: str, field_path: str, problem: str) -> ApiError:
    """422 Invalid naming the field and what is wrong with it."""
    return ApiError(422, "Invalid", f'{kind} "{name}" is invalid: {field_path}: {problem}',
                    {"name": name, "group": group, "kind": kind,
                     "causes": [{"reason": "FieldValueInvalid", "message": problem, "field": field_path}]})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class ResourceType:
    """One served resource: where it lives in the URL space and in the store, and its strategy."""

    group: str
    versions: tuple[str, ...]
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = False
    generation: bool = False  # metadata.generation kept (bumped when anything but metadata/status changes)
    returns_deleted: bool = False  # DELETE answers the object (else a Success Status)
    storage: str = ""  # store key; another type's key to share its objects (events.k8s.io Events)
    to_view: object = None  # storage form -> this type's representation
    from_view: object = None  # this type's representation -> storage form
    defaults: object = None  # defaults(new, old, resources) for create (old None) and replace
    list_kind: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.storage = self.storage or f"{self.group}/{self.plural}"
        self.list_kind = self.list_kind or self.kind + "List"

    def api_version(self, version: str) -> str:
        """``v1`` for the core group, else ``GROUP/VERSION``."""
        return f"{self.group}/{version}" if self.group else version

    def view(self, obj: dict, version: str, *, with_kind: bool = True) -> dict:
        """The stored object as this type at *version* (kind and apiVersion first, as a server writes them)."""
        body = self.to_view(obj) if self.to_view else obj
        head = {"kind": self.kind, "apiVersion": self.api_version(version)} if with_kind else {}
        return {**head, **{key: value for key, value in body.items() if key not in ("kind", "apiVersion")}}


# -- defaults of the built-in resources -------------------------------------------------------------------------

def _pod_defaults(new: dict, old: dict | None, resources: Resources) -> None:
    spec = new.setdefault("spec", {})
    spec.setdefault("serviceAccountName", spec.get("serviceAccount", "default"))
    spec.setdefault("serviceAccount", spec["serviceAccountName"])
    spec.setdefault("restartPolicy", "Always")
    if old is None:
        new["status"] = {"phase": "Pending"}


def _service_defaults(new: dict, old: dict | None, resources: Resources) -> None:
    spec = new.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    for port in spec.get("ports", []):
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port.get("port"))
    if old is None:
        new["status"] = {"loadBalancer": {}}
    if spec["type"] == "ExternalName":  # a real server allocates it no clusterIP
        return
    if old is not None and "clusterIP" not in spec:
        spec["clusterIP"] = old["spec"].get("clusterIP")
    if "clusterIP" not in spec or spec["clusterIP"] == "":
        spec["clusterIP"] = resources.allocate_cluster_ip()
    spec.setdefault("clusterIPs", [spec["clusterIP"]])


def _secret_defaults(new: dict, old: dict | None, resources: Resources) -> None:
    new.setdefault("type", "Opaque")
    string_data = new.pop("stringData", None) or {}
    data = new.setdefault("data", {})
    for key, value in string_data.items():
        data[key] = base64.b64encode(value.encode()).decode()
    for key, value in data.items():
        try:
            base64.b64decode(value, validate=True)
        except (ValueError, TypeError):
            raise invalid("Secret", new["metadata"]["name"], "", f"data[{key}]",
                          "Invalid value: the value must be base64-encoded (or use stringData)") from None


def _namespace_defaults(new: dict, old: dict | None, resources: Resources) -> None:
    new.setdefault("spec", {"finalizers": ["kubernetes"]})
    new["status"] = {"phase": "Active"}


def _event_check(field_path: str):
    """The real server's rule: an Event lives in its object's namespace (or ``default``, for a cluster-scoped
    object); *field_path* names the reference as the representation calls it."""

    def check(new: dict, old: dict | None, resources: Resources) -> None:
        namespace = new["metadata"].get("namespace", "")
        referenced = (new.get("involvedObject") or {}).get("namespace", "")
        if (referenced and referenced != namespace) or (not referenced and namespace not in ("", "default")):
            raise invalid("Event", new["metadata"]["name"], "", f"{field_path}.namespace",
                          f'Invalid value: "{referenced}": does not match event.namespace')

    return check


#: core v1 Event field -> events.k8s.io/v1 Event field (the rest have the same name in both).
_EVENT_FIELDS = {"involvedObject": "regarding", "message": "note", "source": "deprecatedSource",
                 "firstTimestamp": "deprecatedFirstTimestamp", "lastTimestamp": "deprecatedLastTimestamp",
                 "count": "deprecatedCount", "reportingComponent": "reportingController"}
_EVENT_FIELDS_BACK = {new: old for old, new in _EVENT_FIELDS.items()}


def _rename(obj: dict, names: dict) -> dict:
    return {names.get(key, key): value for key, value in obj.items()}


def _crd_defaults(new: dict, old: dict | None, resources: Resources) -> None:
    spec, name = new.get("spec", {}), new["metadata"]["name"]
    names, group = spec.get("names", {}), spec.get("group", "")
    if not group or not names.get("plural") or not names.get("kind"):
        raise invalid("CustomResourceDefinition", name, "apiextensions.k8s.io", "spec",
                      "Required value: spec.group, spec.names.plural and spec.names.kind are required")
    if name != f"{names['plural']}.{group}":
        raise invalid("CustomResourceDefinition", name, "apiextensions.k8s.io", "metadata.name",
                      f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group')
    versions = spec.get("versions") or []
    if not versions or sum(1 for version in versions if version.get("storage")) != 1:
        raise invalid("CustomResourceDefinition", name, "apiextensions.k8s.io", "spec.versions",
                      "Invalid value: exactly one version must be marked as storage version")
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        raise invalid("CustomResourceDefinition", name, "apiextensions.k8s.io", "spec.scope",
                      f'Unsupported value: "{spec.get("scope")}": supported values: "Cluster", "Namespaced"')
    names.setdefault("singular", names["kind"].lower())
    names.setdefault("listKind", names["kind"] + "List")
    new["status"] = {
        "acceptedNames": dict(names),
        "conditions": [{"type": condition, "status": "True", "reason": reason, "message": message,
                        "lastTransitionTime": _now()}
                       for condition, reason, message in (
                           ("NamesAccepted", "NoConflicts", "no conflicts found"),
                           ("Established", "InitialNamesAccepted", "the initial names have been accepted"))],
        "storedVersions": [version["name"] for version in versions if version.get("storage")],
    }


def _webhook_configuration_defaults(new: dict, old: dict | None, resources: Resources) -> None:
    """admissionregistration.k8s.io/v1 MutatingWebhookConfiguration: the real server's v1 defaults and the
    validation txmesh can run into (required fields, unique names, one of url/service, base64 caBundle)."""
    name, group = new["metadata"]["name"], "admissionregistration.k8s.io"
    webhooks = new.get("webhooks") or []
    seen = set()
    for index, webhook in enumerate(webhooks):
        where = f"webhooks[{index}]"
        if not webhook.get("name"):
            raise invalid("MutatingWebhookConfiguration", name, group, f"{where}.name", "Required value")
        if webhook["name"] in seen:
            raise invalid("MutatingWebhookConfiguration", name, group, f"{where}.name",
                          f'Duplicate value: "{webhook["name"]}"')
        seen.add(webhook["name"])
        if webhook.get("sideEffects") not in ("None", "NoneOnDryRun"):
            raise invalid("MutatingWebhookConfiguration", name, group, f"{where}.sideEffects",
                          'Unsupported value: supported values: "None", "NoneOnDryRun"')
        if not webhook.get("admissionReviewVersions"):
            raise invalid("MutatingWebhookConfiguration", name, group, f"{where}.admissionReviewVersions",
                          "Required value: must specify one of v1, v1beta1")
        client = webhook.get("clientConfig") or {}
        if ("url" in client) == ("service" in client):
            raise invalid("MutatingWebhookConfiguration", name, group, f"{where}.clientConfig",
                          "Required value: exactly one of url or service is required")
        if "caBundle" in client:
            try:
                base64.b64decode(client["caBundle"], validate=True)
            except (ValueError, TypeError):
                raise ApiError(400, "BadRequest", f"MutatingWebhookConfiguration in version \"v1\" cannot be handled "
                               f"as a MutatingWebhookConfiguration: illegal base64 data in {where}.clientConfig."
                               "caBundle") from None
        if "service" in client:
            client["service"].setdefault("port", 443)
        webhook.setdefault("failurePolicy", "Fail")
        webhook.setdefault("matchPolicy", "Equivalent")
        webhook.setdefault("namespaceSelector", {})
        webhook.setdefault("objectSelector", {})
        webhook.setdefault("timeoutSeconds", 10)
        webhook.setdefault("reinvocationPolicy", "Never")
        for rule in webhook.get("rules") or []:
            rule.setdefault("scope", "*")


BUILTIN_TYPES = (
    ResourceType("", ("v1",), "namespaces", "Namespace", namespaced=False, returns_deleted=True,
                 defaults=_namespace_defaults),
    ResourceType("", ("v1",), "pods", "Pod", status_subresource=True, returns_deleted=True, defaults=_pod_defaults),
    ResourceType("", ("v1",), "services", "Service", status_subresource=True, returns_deleted=True,
                 defaults=_service_defaults),
    ResourceType("", ("v1",), "secrets", "Secret", defaults=_secret_defaults),
    ResourceType("", ("v1",), "configmaps", "ConfigMap"),
    ResourceType("", ("v1",), "events", "Event", defaults=_event_check("involvedObject")),
    ResourceType("events.k8s.io", ("v1",), "events", "Event", storage="/events", defaults=_event_check("regarding"),
                 to_view=lambda obj: _rename(obj, _EVENT_FIELDS),
                 from_view=lambda obj: _rename(obj, _EVENT_FIELDS_BACK)),
    ResourceType("discovery.k8s.io", ("v1",), "endpointslices", "EndpointSlice", generation=True),
    ResourceType("admissionregistration.k8s.io", ("v1",), "mutatingwebhookconfigurations",
                 "MutatingWebhookConfiguration", namespaced=False, generation=True,
                 defaults=_webhook_configuration_defaults, extra={"merge_keys": {"webhooks": "name"}}),
    ResourceType("apiextensions.k8s.io", ("v1",), "customresourcedefinitions", "CustomResourceDefinition",
                 namespaced=False, status_subresource=True, generation=True, returns_deleted=True,
                 defaults=_crd_defaults),
    ResourceType("rbac.authorization.k8s.io", ("v1",), "roles", "Role"),
    ResourceType("rbac.authorization.k8s.io", ("v1",), "clusterroles", "ClusterRole", namespaced=False),
    ResourceType("rbac.authorization.k8s.io", ("v1",), "rolebindings", "RoleBinding"),
    ResourceType("rbac.authorization.k8s.io", ("v1",), "clusterrolebindings", "ClusterRoleBinding",
                 namespaced=False),
)


def _list_key(obj: dict) -> list[str]:
    return [obj["metadata"].get("namespace", ""), obj["metadata"]["name"]]


def _encode_continue(revision: int, last: list[str]) -> str:
    return base64.urlsafe_b64encode(json.dumps({"rv": revision, "start": last}).encode()).decode()


def _decode_continue(token: str) -> tuple[int, list[str]]:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(decoded["rv"]), [str(part) for part in decoded["start"]]
    except (ValueError, KeyError, TypeError):
        raise ApiError(400, "BadRequest", f"continue key is not valid: {token!r}; pass the metadata.continue "
                       "of the previous page unchanged, or list again without it") from None


def _without(obj: dict, *keys: str) -> dict:
    return {key: value for key, value in obj.items() if key not in keys}


class Resources:
    """The verbs of the API over a :class:`Store`, per :class:`ResourceType`."""

    def __init__(self, store: Store):
        self.store = store
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        self._cluster_ips = ipaddress.ip_network("10.96.0.0/12").hosts()
        next(self._cluster_ips)  # 10.96.0.1 is the kubernetes Service's
        for resource_type in BUILTIN_TYPES:
            self._serve(resource_type)
        for namespace in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create(self.lookup("", "v1", "namespaces"), None, {"metadata": {"name": namespace}})

    # -- the URL space ------------------------------------------------------------------------------------------

    def _serve(self, resource_type: ResourceType) -> None:
        for version in resource_type.versions:
            self._types[(resource_type.group, version, resource_type.plural)] = resource_type

    def _unserve(self, storage: str) -> None:
        for key in [key for key, value in self._types.items() if value.storage == storage]:
            del self._types[key]

    def lookup(self, group: str, version: str, plural: str) -> ResourceType:
        """The type served at GROUP/VERSION/PLURAL; 404 as the real server words it if none."""
        try:
            return self._types[(group, version, plural)]
        except KeyError:
            raise ApiError(404, "NotFound", "the server could not find the requested resource",
                           {"group": group, "kind": plural}) from None

    def allocate_cluster_ip(self) -> str:
        """The next free Service clusterIP from 10.96.0.0/12."""
        return str(next(self._cluster_ips))

    # -- verbs --------------------------------------------------------------------------------------------------

    def get(self, rtype: ResourceType, namespace: str | None, name: str) -> dict:
        """The stored object (storage form); 404 if missing."""
        obj = self.store.get(rtype.storage, namespace or "", name)
        if obj is None:
            raise not_found(rtype.plural, name, rtype.group)
        return obj

    def list(self, rtype: ResourceType, namespace: str | None, label_selector=None, field_selector=None,
             limit: int = 0, continue_token: str | None = None) -> tuple[list[dict], int, str | None]:
        """(objects in storage form, the list's revision, the continue token or None) matching the selectors.

        With *limit*, at most that many objects come back with a token for the rest; the pages after the
        first are read at the first page's revision, like a real server reads them from etcd, and a token
        older than the compacted history is 410 Expired.
        """
        matches = selector(label_selector, field_selector)
        revision, after = self.store.revision, None
        if continue_token:
            revision, after = _decode_continue(continue_token)
        try:
            objects = self.store.items_at(rtype.storage, revision, namespace)
        except Expired:
            raise ApiError(410, "Expired", "The provided continue parameter is too old to display a consistent "
                           "list result. You can start a new list without the continue parameter.") from None
        items = [obj for obj in objects if matches(obj) and (after is None or _list_key(obj) > after)]
        if limit and len(items) > limit:
            items = items[:limit]
            return items, revision, _encode_continue(revision, _list_key(items[-1]))
        return items, revision, None

    def create(self, rtype: ResourceType, namespace: str | None, body: dict) -> dict:
        """Create *body* (this type's representation); return the stored object."""
        obj = self._incoming(rtype, namespace, body, None)
        metadata = obj["metadata"]
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:5]
        if not metadata.get("name"):
            raise invalid(rtype.kind, "", rtype.group, "metadata.name",
                          "Required value: name or generateName is required")
        if rtype.namespaced:
            self.get(self.lookup("", "v1", "namespaces"), None, namespace)
        if self.store.get(rtype.storage, namespace or "", metadata["name"]) is not None:
            name = metadata["name"]
            raise ApiError(409, "AlreadyExists", f'{self._resource(rtype)} "{name}" already exists',
                           {"name": name, "group": rtype.group, "kind": rtype.plural})
        metadata.update(uid=str(uuid.uuid4()), creationTimestamp=_now())
        metadata.pop("resourceVersion", None)
        if rtype.generation:
            metadata["generation"] = 1
        if rtype.status_subresource:
            obj.pop("status", None)
        if rtype.defaults:
            rtype.defaults(obj, None, self)
        stored = self.store.put(rtype.storage, obj)
        if rtype.plural == "customresourcedefinitions":
            self._serve(self.custom_type(stored))
        return stored

    def replace(self, rtype: ResourceType, namespace: str | None, name: str, body: dict,
                subresource: str | None = None) -> dict:
        """PUT: replace the object (or only its status, for ``subresource="status"``); 409 if stale."""
        old = self.get(rtype, namespace, name)
        new = self._incoming(rtype, namespace, body, name)
        wanted = new["metadata"].get("resourceVersion")
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {self._resource(rtype)} "{name}": '
                           "the object has been modified; please apply your changes to the latest version "
                           "and try again", {"name": name, "group": rtype.group, "kind": rtype.plural})
        self.check_subresource(rtype, subresource)
        if subresource == "status":
            new = {**_without(old, "status"), **({"status": new["status"]} if "status" in new else {})}
        elif rtype.status_subresource:
            new = {**_without(new, "status"), **({"status": old["status"]} if "status" in old else {})}
        metadata = new["metadata"] = {**new["metadata"], **{key: old["metadata"][key] for key in
                                                            ("uid", "creationTimestamp") if key in old["metadata"]}}
        if rtype.generation:
            ignored = ("metadata", "status") if rtype.status_subresource else ("metadata",)
            changed = _without(new, *ignored) != _without(old, *ignored)
            metadata["generation"] = old["metadata"].get("generation", 1) + (1 if changed else 0)
        if rtype.defaults and subresource is None:
            rtype.defaults(new, old, self)
        metadata["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return old  # a no-op write does not bump the resourceVersion, as on a real server
        stored = self.store.put(rtype.storage, new)
        if rtype.plural == "customresourcedefinitions":
            self._unserve(self.custom_type(old).storage)
            self._serve(self.custom_type(stored))
        return stored

    def patch(self, rtype: ResourceType, namespace: str | None, name: str, content_type: str, patch,
              subresource: str | None = None) -> dict:
        """PATCH with a merge, strategic-merge (as merge) or JSON patch; then as :meth:`replace`."""
        current = rtype.view(self.get(rtype, namespace, name), rtype.versions[0])
        try:
            patched = apply_patch(content_type, current, patch, strategic_allowed="crd" not in rtype.extra,
                                  merge_keys=rtype.extra.get("merge_keys"))
        except UnsupportedMediaType as error:
            raise ApiError(415, "UnsupportedMediaType", str(error)) from None
        except PatchError as error:
            raise ApiError(422, "Invalid", f"the patch could not be applied: {error}") from None
        if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
            raise ApiError(422, "Invalid", "the patched object has no metadata")
        if isinstance(patch, dict) and "resourceVersion" not in (patch.get("metadata") or {}):
            patched["metadata"].pop("resourceVersion", None)  # only a patch that names a version is conditional
        return self.replace(rtype, namespace, name, patched, subresource)

    def delete(self, rtype: ResourceType, namespace: str | None, name: str) -> dict:
        """Delete the object (a namespace takes its objects with it, a CRD its custom objects); return it."""
        self.get(rtype, namespace, name)
        if rtype.plural == "namespaces":
            for storage in {resource.storage for resource in self._types.values() if resource.namespaced}:
                for obj in self.store.items(storage, name):
                    self.store.remove(storage, name, obj["metadata"]["name"])
        if rtype.plural == "customresourcedefinitions":
            custom = self.custom_type(self.get(rtype, namespace, name))
            for obj in self.store.items(custom.storage):
                self.store.remove(custom.storage, obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
            self._unserve(custom.storage)
        return self.store.remove(rtype.storage, namespace or "", name)

    # -- helpers ------------------------------------------------------------------------------------------------

    @staticmethod
    def _resource(rtype: ResourceType) -> str:
        return f"{rtype.plural}.{rtype.group}" if rtype.group else rtype.plural

    @staticmethod
    def check_subresource(rtype: ResourceType, subresource: str | None) -> None:
        """404 unless *subresource* is None or a ``status`` the type has."""
        if subresource is not None and not (subresource == "status" and rtype.status_subresource):
            raise ApiError(404, "NotFound", "the server could not find the requested resource",
                           {"group": rtype.group, "kind": f"{rtype.plural}/{subresource}"})

    def _incoming(self, rtype: ResourceType, namespace: str | None, body, name: str | None) -> dict:
        """A request body checked against the URL and converted to storage form."""
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest",
                           f"the body must be a JSON object ({rtype.kind}), not {type(body).__name__}")
        api_version = body.get("apiVersion")
        if api_version and api_version not in {rtype.api_version(version) for version in rtype.versions}:
            raise ApiError(400, "BadRequest", f"the API version in the data ({api_version}) does not match the "
                           f"expected API version ({rtype.api_version(rtype.versions[0])})")
        if body.get("kind") and body["kind"] != rtype.kind:
            raise ApiError(400, "BadRequest", f"the kind in the data ({body['kind']}) does not match the expected "
                           f"kind ({rtype.kind}) of {self._resource(rtype)}")
        obj = copy.deepcopy(_without(body, "kind", "apiVersion"))
        obj = rtype.from_view(obj) if rtype.from_view else obj
        metadata = obj["metadata"] = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ApiError(400, "BadRequest", f"metadata must be a JSON object, not {type(metadata).__name__}")
        if name is not None and metadata.get("name", name) != name:
            raise ApiError(400, "BadRequest", f"the name of the object ({metadata['name']}) does not match the "
                           f"name on the URL ({name})")
        if name is not None:
            metadata["name"] = name
        if rtype.namespaced:
            if metadata.get("namespace", namespace) != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                               "namespace sent on the request")
            metadata["namespace"] = namespace
        else:
            metadata.pop("namespace", None)
        return obj

    def custom_type(self, crd: dict) -> ResourceType:
        """The resource type a CustomResourceDefinition serves."""
        spec = crd["spec"]
        versions = spec["versions"]
        return ResourceType(
            spec["group"], tuple(version["name"] for version in versions if version.get("served", True)),
            spec["names"]["plural"], spec["names"]["kind"], namespaced=spec["scope"] == "Namespaced",
            status_subresource=any("status" in (version.get("subresources") or {}) for version in versions),
            generation=True, returns_deleted=True, list_kind=spec["names"].get("listKind", ""),
            extra={"crd": crd["metadata"]["name"]})
