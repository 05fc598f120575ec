"""Compiled security tables of one proxy: authorization policies and the inbound mTLS mode.

Both are immutable and built by :mod:`mesh.config.security_compile`; they are
the ``authz`` and ``peer_authentication`` fields of
:class:`mesh.config.tables.ProxyConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The policy name of a denial because ALLOW policies apply and none matched.
NO_ALLOW_MATCHED = "allow-nothing-matched"


@dataclass(frozen=True, slots=True)
class AuthzPolicy:
    """One compiled AuthorizationPolicy: ``name`` is ``namespace/name``.

    ``rules`` holds one predicate ``(ctx, peer) -> bool`` per rule that can
    match; the policy matches when any of them does (no rules: never).
    """

    name: str
    rules: tuple


@dataclass(frozen=True, slots=True)
class AuthzPolicies:
    """The AuthorizationPolicies that apply to one workload, by action.

    Istio's evaluation (done by ``mesh_authorize``): deny if any ``deny``
    policy matches; otherwise allow if ``allow`` is empty or any of its
    policies matches; otherwise deny (:data:`NO_ALLOW_MATCHED`).
    """

    deny: tuple = ()
    allow: tuple = ()

    def __len__(self) -> int:
        return len(self.deny) + len(self.allow)


@dataclass(frozen=True, slots=True)
class PeerAuthn:
    """The effective PeerAuthentication of a workload.

    ``mode`` is STRICT, PERMISSIVE or DISABLE (never UNSET: inheritance is
    resolved); ``port_modes`` holds sorted ``(port, mode)`` pairs that override
    it for those workload ports.
    """

    mode: str = "PERMISSIVE"
    port_modes: tuple = ()

    def mode_for_port(self, port: int) -> str:
        """The mode of the inbound connections to workload (app) port ``port``."""
        for number, mode in self.port_modes:
            if number == port:
                return mode
        return self.mode
