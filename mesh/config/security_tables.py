"""Compiled security tables of one proxy: authorization policies (enforced and dry-run), inbound mTLS mode.

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

    Dry-run policies (``istio.io/dry-run: "true"``) are kept apart, as
    Envoy's RBAC ``shadow_rules``: ``shadow_deny`` is the :class:`ShadowEngine`
    of the DENY ones and ``shadow_allow`` that of the ALLOW ones, each None
    when there are none, so that a workload without dry-run policies pays an
    attribute test per request for them.  They never change the decision.
    """

    deny: tuple = ()
    allow: tuple = ()
    shadow_deny: ShadowEngine | None = None
    shadow_allow: ShadowEngine | None = None

    @property
    def enforced(self) -> bool:
        """Whether any policy is enforced (dry-run policies alone decide nothing)."""
        return bool(self.deny or self.allow)


@dataclass(frozen=True, slots=True)
class ShadowEngine:
    """The dry-run policies of one action, evaluated as Envoy evaluates RBAC ``shadow_rules``.

    The engine's result is ``denied`` or ``allowed`` as if its policies were
    the only ones of their action: a DENY engine denies when one of its
    policies matches, an ALLOW engine allows when one matches (and denies
    otherwise).  :meth:`evaluate` returns one of the prebuilt result tuples
    ``(action, result, policy name or None)`` -- Istio's
    ``authz_dry_run_action`` (``allow``/``deny``), ``authz_dry_run_result``
    (``allowed``/``denied``) and ``shadow_effective_policy_id`` -- so that
    nothing is built per request.
    """

    action: str
    policies: tuple
    hits: tuple
    miss: tuple

    @classmethod
    def build(cls, action: str, policies: tuple) -> ShadowEngine:
        """The engine of ``policies`` (:class:`AuthzPolicy`), ``action`` ``"ALLOW"`` or ``"DENY"``."""
        label = action.lower()
        matched, unmatched = ("denied", "allowed") if action == "DENY" else ("allowed", "denied")
        return cls(label, policies, tuple((label, matched, policy.name) for policy in policies),
                   (label, unmatched, None))

    def evaluate(self, ctx, peer) -> tuple:
        """The result tuple of the first policy that matches the request, or :attr:`miss`."""
        for policy, hit in zip(self.policies, self.hits):
            for rule in policy.rules:
                if rule(ctx, peer):
                    return hit
        return self.miss


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
