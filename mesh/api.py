"""What plugins may rely on: the types the hooks of :mod:`mesh.hookspecs` pass and return.

Everything here is part of plugin API :data:`mesh.hookspecs.API_VERSION`.
A plugin imports only :mod:`mesh.api` and :mod:`mesh.hookspecs` (and
``mesh.hookimpl``); the classes behind these views are internal and change
without notice.
"""

from __future__ import annotations

from typing import Optional, Protocol, Tuple


class ConnectionView(Protocol):
    """One downstream connection, as :func:`mesh.hookspecs.mesh_connection_open` and
    :func:`mesh.hookspecs.mesh_connection_complete` see it.  Read-only.

    ``direction`` is ``"inbound"`` or ``"outbound"``; ``protocol`` is
    ``"http/1.1"`` or ``"tcp"`` (a passthrough tunnel).  ``source_address`` is
    the client's IP; ``destination`` the original destination ``(ip, port)``
    of a transparently captured connection, else None; ``upstream`` the
    ``(host, port)`` a TCP tunnel connected to, else None.  ``peer`` is the
    client's verified SPIFFE id over mTLS, else None.  ``start`` is when it
    was accepted (``reactor.seconds()``) and ``duration`` the seconds it
    lasted (0.0 until it ends).  ``bytes_received`` counts client -> proxy
    bytes and ``bytes_sent`` proxy -> client bytes (after TLS), ``requests``
    the HTTP requests it carried.
    """

    direction: str
    protocol: str
    source_address: str
    destination: Optional[Tuple[str, int]]
    upstream: Optional[Tuple[str, int]]
    peer: Optional[str]
    start: float
    duration: float
    bytes_received: int
    bytes_sent: int
    requests: int
