"""Built-in routing: first matching route of the host's VirtualService (for the request's port, when
the routes differ by port: :class:`mesh.config.tables.VirtualHost`)."""

from mesh import hookimpl


@hookimpl
def mesh_route(ctx, table):
    """Look the host up, then return the action of the first route that matches."""
    vhost = table.exact.get(ctx.host)  # table.lookup's first step, inline: the common case
    if vhost is None:
        vhost = table.lookup(ctx.host)
        if vhost is None:
            return None
    routes = vhost.routes
    if vhost.ports is not None:
        routes = vhost.ports.get(ctx.request_port(), routes)
    for route in routes:
        match = route.match
        if match is None or match(ctx):
            return route.action
    return None
