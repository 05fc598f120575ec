"""Small socket helpers shared by the listeners and the upstream pools."""

from __future__ import annotations


def set_nodelay(transport) -> None:
    """Disable Nagle's algorithm: a proxy must not sit on small writes.

    TLS transports wrap a TCP transport; walk down to the one that has the
    socket option.
    """
    while transport is not None:
        setter = getattr(transport, "setTcpNoDelay", None)
        if setter is not None:
            setter(True)
            return
        transport = getattr(transport, "transport", None)
