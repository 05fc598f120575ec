"""Which resources select which workload: the one implementation of label selectors.

A selector is a tuple of sorted ``(label, value)`` pairs (what the validators
make of ``selector.matchLabels`` and ``workloadSelector.labels``) or None,
which selects every workload in scope.  It selects a workload when the
workload has every one of its labels with that value (Kubernetes
``matchLabels``).

Three readers share :func:`selects`:

- the compiler (:func:`mesh.config.security_compile.applicable`): which
  policies apply to a proxy;
- the control plane (``/proxies``, ``meshctl proxy-status``) and ``meshctl
  analyze --control-admin``: which resources select each proxy, with
  :func:`selected_by`;
- the warning for a proxy that no selector of its namespace's policies
  matches (:func:`unselected_warning`), which the proxy logs: a sidecar
  started without the ``--label`` a policy's selector needs would otherwise
  run without that policy and say nothing.
"""

from __future__ import annotations

from mesh.config.errors import ConfigWarning
from mesh.config.request_authn import RequestAuthentication
from mesh.config.resources import ServiceEntry
from mesh.config.security import AuthorizationPolicy, PeerAuthentication

#: The kinds whose selector decides whether a security policy applies to a workload.
POLICY_KINDS = (AuthorizationPolicy, PeerAuthentication, RequestAuthentication)


def selects(selector: tuple | None, labels: dict) -> bool:
    """Whether ``selector`` (sorted label pairs, or None for "every workload") selects ``labels``."""
    if selector is None:
        return True
    for name, value in selector:
        if labels.get(name) != value:
            return False
    return True


def format_labels(pairs) -> str:
    """``app=reviews, version=v1`` (or ``no labels``) for messages, from pairs or a dict."""
    items = sorted(pairs.items() if isinstance(pairs, dict) else pairs)
    return ", ".join(f"{name}={value}" for name, value in items) or "no labels"


def selector_of(obj) -> tuple | None:
    """The workload selector of a policy or ServiceEntry (None: none, or not a selecting kind)."""
    if isinstance(obj, ServiceEntry):
        return obj.workload_selector
    return getattr(obj, "selector", None)


def selected_by(objects, workload, root_namespace: str) -> list:
    """What selects ``workload`` (a :class:`mesh.config.compile.Workload`), as JSON-ready rows.

    Security policies (AuthorizationPolicy, PeerAuthentication, RequestAuthentication) of its
    namespace and of the root namespace, by selector or namespace-/mesh-wide,
    and ServiceEntries of its namespace whose ``workloadSelector`` makes it an
    endpoint.  Each row: ``kind``, ``namespace``, ``name``, ``scope``
    (``workload``, ``namespace`` or ``mesh``) and ``selector`` (text or None);
    sorted by kind, namespace and name.
    """
    rows = []
    for obj in objects:
        if isinstance(obj, POLICY_KINDS):
            if obj.namespace not in (workload.namespace, root_namespace):
                continue
        elif not (isinstance(obj, ServiceEntry) and obj.workload_selector is not None
                  and obj.namespace == workload.namespace):
            continue
        selector = selector_of(obj)
        if not selects(selector, workload.labels):
            continue
        if selector is not None:
            scope = "workload"
        else:
            scope = "mesh" if obj.namespace == root_namespace else "namespace"
        rows.append({"kind": type(obj).__name__, "namespace": obj.namespace, "name": obj.name, "scope": scope,
                     "selector": format_labels(selector) if selector is not None else None})
    return sorted(rows, key=lambda row: (row["kind"], row["namespace"], row["name"]))


def unselected_warning(objects, workload, describe: str = "") -> ConfigWarning | None:
    """A warning when policies of ``workload``'s namespace use selectors and none of them selects it.

    None when the namespace's AuthorizationPolicies, PeerAuthentications and RequestAuthentications
    have no selector, or when one of those selectors matches the workload's
    labels.  The warning is attached to the first such policy (by kind and
    name) and names all of them, the workload's labels and the fix.
    ``describe`` names the workload in the message (default: ``workload
    NAMESPACE/NAME``).
    """
    namespace = workload.namespace
    candidates = sorted((obj for obj in objects if isinstance(obj, POLICY_KINDS) and obj.namespace == namespace
                         and obj.selector is not None), key=lambda obj: (type(obj).__name__, obj.name))
    if not candidates or any(selects(obj.selector, workload.labels) for obj in candidates):
        return None
    listed = "; ".join(f"{type(obj).__name__} {obj.namespace}/{obj.name} ({format_labels(obj.selector)})"
                       for obj in candidates)
    example = " ".join(f"--label {name}={value}" for name, value in candidates[0].selector)
    who = describe or f"workload {namespace}/{workload.name}"
    reason = (f"{who} ({format_labels(workload.labels)}) matches no selector of namespace {namespace}'s "
              f"policies: {listed}; none of them applies to it. If one should, start its sidecar with the "
              f"labels of that selector (for example mesh-proxy {example}) or fix the selector")
    return candidates[0].source.error(("spec", "selector"), reason, cls=ConfigWarning)


def describe_selection(objects, workload, root_namespace: str) -> dict:
    """What the control plane's ``/proxies`` adds to a proxy's row (``workload``'s point of view).

    ``selected_by``: :func:`selected_by`'s rows; ``selection_warning``: the
    text of :func:`unselected_warning`, or None.
    """
    warning = unselected_warning(objects, workload)
    return {"selected_by": selected_by(objects, workload, root_namespace),
            "selection_warning": None if warning is None else str(warning)}
