"""Built-in authorization: Istio's AuthorizationPolicy evaluation, DENY before ALLOW, and dry runs."""

from mesh import hookimpl
from mesh.api import AuthzDecision
from mesh.config.security_tables import NO_ALLOW_MATCHED

#: No ALLOW policy applies and no DENY policy matched: allowed, by no policy.
ALLOWED_BY_DEFAULT = AuthzDecision(True, None)
#: ALLOW policies apply and none matched.
NO_ALLOW_MATCHED_DENIED = AuthzDecision(False, NO_ALLOW_MATCHED)


@hookimpl
def mesh_authorize(ctx, peer, policies):
    """Evaluate the workload's compiled :class:`~mesh.config.security_tables.AuthzPolicies`.

    Deny (``AuthzDecision(False, name)``) when a DENY policy matches.  Otherwise
    allow when no ALLOW policy applies (:data:`ALLOWED_BY_DEFAULT`) or one
    matches (``AuthzDecision(True, name)``),
    and deny with :data:`~mesh.config.security_tables.NO_ALLOW_MATCHED` when
    ALLOW policies apply and none matches.  None when no policy applies.

    Dry-run policies never change that answer.  As in Envoy, where Istio puts
    them in the ``shadow_rules`` of the RBAC filter of their action (the DENY
    filter first), the DENY shadow engine runs before the enforced DENY
    policies, and the ALLOW one only for a request they let through.  Their
    results go to ``ctx.authz_dry_run`` for the access log and the metrics.
    """
    if policies is None:
        return None
    shadow = policies.shadow_deny
    if shadow is not None:
        ctx.authz_dry_run = (shadow.evaluate(ctx, peer),)
    for policy in policies.deny:
        for rule in policy.rules:
            if rule(ctx, peer):
                return AuthzDecision(False, policy.name)
    shadow = policies.shadow_allow
    if shadow is not None:
        ctx.authz_dry_run = (ctx.authz_dry_run or ()) + (shadow.evaluate(ctx, peer),)
    allow = policies.allow
    if not allow:
        return ALLOWED_BY_DEFAULT
    for policy in allow:
        for rule in policy.rules:
            if rule(ctx, peer):
                return AuthzDecision(True, policy.name)
    return NO_ALLOW_MATCHED_DENIED
