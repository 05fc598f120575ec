"""JSON Patch (RFC 6902) from a before/after pair of JSON documents.

The admission webhook answers with the patch that turns the pod it was sent
into the injected pod.  :func:`diff` walks both documents: keys that appear
become ``add``, keys that vanish ``remove``, changed scalars ``replace``.  In
lists, elements that were inserted (the injected init containers and volumes)
become ``add`` at their index, so that the patch does not rewrite the user's
own containers; a list that cannot be explained by insertions is replaced whole.
Operations are meant to be applied in order.
"""

from __future__ import annotations


def pointer(parts) -> str:
    """An RFC 6901 JSON Pointer (``~`` -> ``~0``, ``/`` -> ``~1``)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def diff(before, after, path=()) -> list[dict]:
    if type(before) is not type(after):
        return [{"op": "replace", "path": pointer(path), "value": after}]
    if isinstance(before, dict):
        ops = []
        for key in before:
            if key not in after:
                ops.append({"op": "remove", "path": pointer(path + (key,))})
        for key, value in after.items():
            if key not in before:
                ops.append({"op": "add", "path": pointer(path + (key,)), "value": value})
            else:
                ops.extend(diff(before[key], value, path + (key,)))
        return ops
    if isinstance(before, list):
        return _diff_list(before, after, path)
    if before != after:
        return [{"op": "replace", "path": pointer(path), "value": after}]
    return []


def _same(a, b) -> bool:
    """Whether list elements are "the same item": equal, or dicts with the same ``name``."""
    if a == b:
        return True
    return isinstance(a, dict) and isinstance(b, dict) and "name" in a and a.get("name") == b.get("name")


def _diff_list(before: list, after: list, path) -> list[dict]:
    ops, i = [], 0
    for j, item in enumerate(after):
        if i < len(before) and _same(before[i], item):
            ops.extend(diff(before[i], item, path + (j,)))
            i += 1
        else:
            ops.append({"op": "add", "path": pointer(path + (j,)), "value": item})
    if i < len(before):  # not explained by insertions alone
        return [{"op": "replace", "path": pointer(path), "value": after}]
    return ops
