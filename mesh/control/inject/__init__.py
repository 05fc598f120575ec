"""Sidecar injection, shared by ``meshctl inject`` and the admission webhook (docs/kubernetes.md)."""

from mesh.control.inject.sidecar import InjectError, InjectSettings, inject_object, inject_pod, is_injected, skip_reason

__all__ = ["InjectError", "InjectSettings", "inject_object", "inject_pod", "is_injected", "skip_reason"]
