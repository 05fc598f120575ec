"""Reading Istio YAML files into :class:`Resource` objects that know their lines.

Each file may hold several documents (``---``).  Documents are composed into
YAML nodes first, so the line of every mapping key and sequence item is known;
plain Python values are then constructed from the same nodes.  A document
becomes a :class:`Resource` once its ``apiVersion``, ``kind`` and ``metadata``
are valid; its ``spec`` is checked later by :mod:`mesh.config.validate`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from mesh.config.errors import ConfigError, LineMap, format_path, unknown_field

# txmesh's own API groups (deploy/base/crds) carry Istio's kinds with Istio's schemas
_NETWORKING = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3",
               "networking.txmesh.io/v1")
_SECURITY = ("security.istio.io/v1", "security.istio.io/v1beta1", "security.txmesh.io/v1")

#: Kind -> the apiVersions accepted for it.
API_VERSIONS = {
    "ServiceEntry": _NETWORKING,
    "WorkloadEntry": _NETWORKING,
    "DestinationRule": _NETWORKING,
    "VirtualService": _NETWORKING,
    "Gateway": _NETWORKING,
    "Sidecar": _NETWORKING,
    "AuthorizationPolicy": _SECURITY,
    "PeerAuthentication": _SECURITY,
    "RequestAuthentication": _SECURITY,
}

_TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec", "status"}
_NOT_A_MAPPING = "a document must be a mapping with apiVersion, kind, metadata and spec"

#: Kubernetes ObjectMeta fields that may appear (e.g. in ``kubectl get -o yaml``
#: output); only name and namespace mean something to txmesh.
_METADATA = {"name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
             "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields",
             "ownerReferences", "finalizers", "selfLink"}
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True, eq=False)
class Resource:
    """One Istio resource as written: metadata checked, ``spec`` still raw.

    ``line`` is the line where the document starts; ``lines`` finds the line of
    any field path such as ``("spec", "http", 0, "route")``.
    """

    kind: str
    api_version: str
    name: str
    namespace: str
    spec: dict
    file: str
    line: int
    lines: LineMap = field(repr=False)
    metadata: dict = field(default_factory=dict, repr=False)

    @property
    def key(self) -> tuple:
        """``(kind, namespace, name)``: unique within a configuration."""
        return (self.kind, self.namespace, self.name)

    def line_of(self, path: tuple) -> int:
        return self.lines.line_of(path)

    def error(self, path: tuple, reason: str, cls=ConfigError) -> ConfigError:
        """A :class:`ConfigError` (or ``cls``) about the field at ``path``."""
        return cls(file=self.file, line=self.line_of(path), reason=reason, kind=self.kind,
                   namespace=self.namespace, name=self.name, field=format_path(path))


@dataclass
class LoadResult:
    """What a load found: the resources that could be read, and every problem."""

    resources: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    files: tuple = ()


def load_dir(path) -> LoadResult:
    """Load every ``*.yaml``/``*.yml`` file of a directory, in name order.

    Raises :class:`FileNotFoundError`/:class:`NotADirectoryError` when ``path``
    is not a directory; problems inside the files are returned, not raised.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"config directory {path} does not exist")
        raise NotADirectoryError(f"{path} is not a directory; pass the directory that holds the YAML files")
    names = sorted(name for name in os.listdir(path) if name.endswith((".yaml", ".yml")))
    return load_files(os.path.join(path, name) for name in names)


def load_files(paths: Iterable) -> LoadResult:
    """Load the given YAML files, in order; duplicate resources are errors."""
    result = LoadResult()
    files = []
    first_seen = {}
    for path in paths:
        path = os.fspath(path)
        files.append(path)
        for resource in _load_file(path, result.errors):
            previous = first_seen.setdefault(resource.key, resource)
            if previous is resource:
                result.resources.append(resource)
            else:
                result.errors.append(resource.error(
                    ("metadata", "name"),
                    f"duplicate {resource.kind} {resource.namespace}/{resource.name}: also defined at "
                    f"{previous.file}:{previous.line}; names must be unique per kind and namespace"))
    result.files = tuple(files)
    return result


def _load_file(path: str, errors: list) -> list:
    import yaml  # here, not at module level: a sidecar fed by mesh-control reads no YAML (about 0.9 MiB of RSS)

    try:
        with open(path, "rb") as stream:
            text = stream.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        errors.append(ConfigError(file=path, line=1, reason=f"cannot read file: {error}"))
        return []
    resources = []
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # SafeLoader: PyYAML built without libyaml
    try:
        while loader.check_node():
            node = loader.get_node()
            resource = _document(path, loader, node, errors)
            if resource is not None:
                resources.append(resource)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        reason = " ".join(part for part in (error.context, error.problem) if part)
        errors.append(ConfigError(file=path, line=mark.line + 1 if mark else 1, reason=reason))
    except yaml.YAMLError as error:
        errors.append(ConfigError(file=path, line=1, reason=str(error)))
    finally:
        loader.dispose()
    return resources


def _document(path, loader, node, errors):
    """Turn one composed document into a Resource (None if empty or invalid)."""
    line = node.start_mark.line + 1
    lines, duplicates = {}, []
    if not _walk(node, (), lines, duplicates, loader, set()):
        errors.append(ConfigError(file=path, line=line, reason="recursive YAML alias; expand it"))
        return None
    value = loader.construct_document(node)
    if value is None:
        return None
    if not isinstance(value, dict):
        errors.append(ConfigError(file=path, line=line, reason=_NOT_A_MAPPING))
        return None
    resource, problems = _resource(value, path, line, LineMap(lines, line), duplicates)
    if problems:
        errors.extend(resource.error(path_, reason) for path_, reason in problems)
        return None
    return resource


def _resource(value: dict, file: str, line: int, line_map: LineMap, duplicates=()) -> tuple:
    """The Resource of one document mapping, and its problems as ``(path, reason)`` pairs.

    The problems: unknown top-level fields, the ``duplicates`` key paths found
    while parsing, and those of the header (:func:`_check_header`).
    """
    kind = value.get("kind")
    meta = value.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("name") if isinstance(meta.get("name"), str) else "<unnamed>"
    namespace = meta.get("namespace") if isinstance(meta.get("namespace"), str) else "default"
    problems = [((key,), unknown_field(key, _TOP_LEVEL)) for key in value if key not in _TOP_LEVEL]
    problems += [(path_, f"duplicate key '{path_[-1]}'; remove one of them") for path_ in duplicates]
    problems += _check_header(kind, value.get("apiVersion"), value.get("metadata"), value.get("spec"))
    spec = value.get("spec")
    resource = Resource(kind=str(kind), api_version=str(value.get("apiVersion")), name=name,
                        namespace=namespace, spec=spec if spec is not None else {}, file=file,
                        line=line, lines=line_map, metadata=meta)
    return resource, problems


def _check_header(kind, api_version, metadata, spec) -> list:
    """Problems of apiVersion, kind, metadata and the type of spec."""
    if not isinstance(kind, str) or not kind:
        return [(("kind",), f"kind is required; one of: {', '.join(sorted(API_VERSIONS))}")]
    if kind not in API_VERSIONS:
        return [(("kind",), f"unknown kind '{kind}'; txmesh supports: {', '.join(sorted(API_VERSIONS))}")]
    problems = []
    accepted = API_VERSIONS[kind]
    if api_version not in accepted:
        problems.append((("apiVersion",), f"apiVersion '{api_version}' is not valid for {kind}; "
                                          f"use one of: {', '.join(accepted)}"))
    if not isinstance(metadata, dict):
        problems.append((("metadata",), "metadata with a name is required"))
    else:
        problems += _check_metadata(metadata)
    if spec is not None and not isinstance(spec, dict):
        problems.append((("spec",), "spec must be a mapping"))
    return problems


def _check_metadata(metadata: dict) -> list:
    problems = []
    for key in metadata:
        if key == "generateName":
            problems.append((("metadata", key), "not supported by txmesh; set metadata.name instead"))
        elif key not in _METADATA:
            problems.append((("metadata", key), unknown_field(key, _METADATA)))
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        problems.append((("metadata", "name"), "metadata.name is required"))
    elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        problems.append((("metadata", "name"), f"invalid name '{name}': use lower-case letters, digits, "
                                               "'-' and '.', starting and ending with a letter or digit"))
    namespace = metadata.get("namespace", "default")
    if not isinstance(namespace, str) or len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        problems.append((("metadata", "namespace"), f"invalid namespace {namespace!r}: use lower-case "
                                                    "letters, digits and '-' (a DNS label)"))
    for key in ("labels", "annotations"):
        value = metadata.get(key)
        if value is not None and not (isinstance(value, dict)
                                      and all(isinstance(v, str) for v in value.values())):
            problems.append((("metadata", key), f"metadata.{key} must map names to strings (quote numbers "
                                                 'and booleans: "true")'))
    return problems


def _walk(node, path, lines, duplicates, loader, stack, walked=None) -> bool:
    """Record the line of every key/item under ``node``; False on a recursive alias.

    Nodes reached again through an alias are not walked twice: their fields
    fall back to the line of the key that holds the alias.
    """
    walked = set() if walked is None else walked
    if id(node) in stack:
        return False
    if id(node) in walked or node.id not in ("mapping", "sequence"):  # yaml.Node.id; scalars have no lines
        return True
    walked.add(id(node))
    stack.add(id(node))
    ok = True
    if node.id == "sequence":
        for index, item in enumerate(node.value):
            lines[path + (index,)] = item.start_mark.line + 1
            ok = ok and _walk(item, path + (index,), lines, duplicates, loader, stack, walked)
    else:
        seen = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int)):
                key = str(key)
            child = path + (key,)
            if key in seen:
                duplicates.append(child)
            seen.add(key)
            lines[child] = key_node.start_mark.line + 1
            ok = ok and _walk(value_node, child, lines, duplicates, loader, stack, walked)
    stack.discard(id(node))
    return ok


def load_documents(documents: Iterable, origin: str, names=None) -> LoadResult:
    """Resources from already-parsed documents (dicts), e.g. a snapshot received from the control plane.

    The same checks as for files apply (header, metadata, duplicates); there are
    no line numbers, so every problem names ``origin`` and the document's
    position (``ORIGIN[i]``) instead of ``FILE:LINE`` -- or ``names[i]`` when
    given (e.g. the Kubernetes object a document was read from).
    """
    result = LoadResult(files=(origin,))
    first_seen = {}
    for index, value in enumerate(documents):
        where = names[index] if names is not None else f"{origin}[{index}]"
        if not isinstance(value, dict):
            result.errors.append(ConfigError(file=where, line=0, reason=_NOT_A_MAPPING))
            continue
        resource, problems = _resource(value, where, 0, LineMap({}, 0))
        if problems:
            result.errors.extend(resource.error(path_, reason) for path_, reason in problems)
            continue
        previous = first_seen.setdefault(resource.key, resource)
        if previous is resource:
            result.resources.append(resource)
        else:
            result.errors.append(resource.error(
                ("metadata", "name"), f"duplicate {resource.kind} {resource.namespace}/{resource.name}: "
                                      f"also at {previous.file}"))
    return result


def resource_document(resource: Resource) -> dict:
    """A Resource as a plain document again (what a snapshot carries): apiVersion, kind, metadata, spec."""
    metadata = {"name": resource.name, "namespace": resource.namespace}
    for key in ("labels", "annotations"):
        if resource.metadata.get(key):
            metadata[key] = dict(resource.metadata[key])
    return {"apiVersion": resource.api_version, "kind": resource.kind, "metadata": metadata,
            "spec": resource.spec}
