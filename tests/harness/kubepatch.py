"""PATCH bodies of the test Kubernetes API server: JSON merge patch (RFC 7386) and JSON patch (RFC 6902).

Strategic merge patch is applied as a JSON merge patch, except that the top-level lists a type names
in its merge keys (a MutatingWebhookConfiguration's ``webhooks``, by ``name``) merge element by element,
as on a real server (``$patch: delete`` in an element removes it); for the objects txmesh patches the result
is the same. Custom resources refuse strategic merge patch, as on a real server.
"""

from __future__ import annotations

import copy

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class PatchError(ValueError):
    """A patch that cannot be applied; the message says which operation and why."""


class UnsupportedMediaType(ValueError):
    """A PATCH content type this resource does not accept; the message lists the accepted ones."""


def merge_patch(target, patch):
    """RFC 7386: objects merge key by key, ``null`` removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"path {path!r} is not a JSON pointer: it must start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(document, parts: list[str], path: str):
    node = document
    for part in parts[:-1]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise PatchError(f"path {path!r} does not exist in the object") from None
    return node


def _index(container: list, part: str, path: str, allow_end: bool) -> int:
    if allow_end and part == "-":
        return len(container)
    try:
        index = int(part)
    except ValueError:
        raise PatchError(f"path {path!r}: {part!r} is not an array index") from None
    if not 0 <= index <= len(container) - (0 if allow_end else 1):
        raise PatchError(f"path {path!r}: index {index} is out of range")
    return index


def _get(document, path: str):
    parts = _pointer(path)
    if not parts:
        return document
    parent = _parent(document, parts, path)
    try:
        return parent[_index(parent, parts[-1], path, False)] if isinstance(parent, list) else parent[parts[-1]]
    except (KeyError, TypeError):
        raise PatchError(f"path {path!r} does not exist in the object") from None


def _remove(document, path: str):
    parts = _pointer(path)
    parent = _parent(document, parts, path)
    if isinstance(parent, list):
        return parent.pop(_index(parent, parts[-1], path, False))
    if not isinstance(parent, dict) or parts[-1] not in parent:
        raise PatchError(f"path {path!r} does not exist in the object")
    return parent.pop(parts[-1])


def _add(document, path: str, value):
    parts = _pointer(path)
    if not parts:
        return value
    parent = _parent(document, parts, path)
    if isinstance(parent, list):
        parent.insert(_index(parent, parts[-1], path, True), value)
    elif isinstance(parent, dict):
        parent[parts[-1]] = value
    else:
        raise PatchError(f"path {path!r}: the parent is neither an object nor an array")
    return document


def json_patch(target, operations):
    """RFC 6902 (add, remove, replace, move, copy, test) applied to a copy of *target*."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    document = copy.deepcopy(target)
    for operation in operations:
        op, path = operation.get("op"), operation.get("path", "")
        if op == "add":
            document = _add(document, path, copy.deepcopy(operation["value"]))
        elif op == "remove":
            _remove(document, path)
        elif op == "replace":
            _remove(document, path)
            document = _add(document, path, copy.deepcopy(operation["value"]))
        elif op == "move":
            document = _add(document, path, _remove(document, operation["from"]))
        elif op == "copy":
            document = _add(document, path, copy.deepcopy(_get(document, operation["from"])))
        elif op == "test":
            if _get(document, path) != operation.get("value"):
                raise PatchError(f"test operation failed: the value at {path!r} is not {operation.get('value')!r}")
        else:
            raise PatchError(f"unknown JSON patch operation {op!r}: use add, remove, replace, move, copy or test")
    return document


def _merge_keyed(target: list, patch: list, key: str, path: str) -> list:
    """Strategic merge of a list of objects keyed by *key*: same key merges, a new key is appended."""
    result = copy.deepcopy(target if isinstance(target, list) else [])
    for element in patch:
        if not isinstance(element, dict) or key not in element:
            raise PatchError(f"{path}: every element of a strategic merge patch of this list needs its merge key "
                             f"{key!r}")
        index = next((i for i, item in enumerate(result) if isinstance(item, dict) and item.get(key) == element[key]),
                     None)
        if element.get("$patch") == "delete":
            if index is not None:
                result.pop(index)
        elif index is None:
            result.append(copy.deepcopy(element))
        else:
            result[index] = merge_patch(result[index], element)
    return result


def apply_patch(content_type: str, target: dict, patch, *, strategic_allowed: bool, merge_keys: dict | None = None):
    """Apply a PATCH body of *content_type* to *target*; raise :class:`PatchError` or
    :class:`UnsupportedMediaType`. *merge_keys* (top-level list field -> key) is used by strategic merge."""
    media = content_type.split(";")[0].strip().lower()
    accepted = [JSON_PATCH, MERGE] + ([STRATEGIC] if strategic_allowed else [])
    if media not in accepted:
        raise UnsupportedMediaType(f"the body of the request was in an unknown format - accepted media types include: "
                          f"{', '.join(accepted)}")
    if media == JSON_PATCH:
        return json_patch(target, patch)
    if not isinstance(patch, dict):
        raise PatchError("a merge patch must be a JSON object")
    keyed = {field: key for field, key in (merge_keys or {}).items()
             if media == STRATEGIC and isinstance(patch.get(field), list)}
    merged = merge_patch(target, {field: value for field, value in patch.items() if field not in keyed})
    for field, key in keyed.items():
        merged[field] = _merge_keyed(target.get(field), patch[field], key, field)
    return merged
