"""Built-in routing: first matching route of the host's VirtualService."""

from mesh import hookimpl


@hookimpl
def mesh_route(ctx, table):
    """Look the host up, then return the action of the first route that matches."""
    vhost = table.exact.get(ctx.host)  # table.lookup's first step, inline: the common case
    if vhost is None:
        vhost = table.lookup(ctx.host)
        if vhost is None:
            return None
    for route in vhost.routes:
        match = route.match
        if match is None or match(ctx):
            return route.action
    return None
