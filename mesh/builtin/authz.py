"""Built-in authorization: Istio's AuthorizationPolicy evaluation, DENY before ALLOW."""

from mesh import hookimpl
from mesh.config.security_tables import NO_ALLOW_MATCHED


@hookimpl
def mesh_authorize(ctx, peer, policies):
    """Evaluate the workload's compiled :class:`~mesh.config.security_tables.AuthzPolicies`.

    Deny (``(False, name)``) when a DENY policy matches.  Otherwise allow when
    no ALLOW policy applies (``(True, None)``) or one matches (``(True, name)``),
    and deny with :data:`~mesh.config.security_tables.NO_ALLOW_MATCHED` when
    ALLOW policies apply and none matches.  None when no policy applies.
    """
    if not policies:
        return None
    for policy in policies.deny:
        for rule in policy.rules:
            if rule(ctx, peer):
                return False, policy.name
    allow = policies.allow
    if not allow:
        return True, None
    for policy in allow:
        for rule in policy.rules:
            if rule(ctx, peer):
                return True, policy.name
    return False, NO_ALLOW_MATCHED
