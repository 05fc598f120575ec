"""The original destination of a connection that iptables redirected to a listener.

``meshctl iptables`` REDIRECTs a pod's TCP traffic to the sidecar's outbound
(15001) and inbound (15006) listeners.  REDIRECT is a destination NAT, so the
accepted socket's local address is the listener's; the address the client
really dialled is kept by conntrack and read back with the ``SO_ORIGINAL_DST``
socket option (``getsockopt(SOL_IP, 80)``, a ``sockaddr_in``; IPv6:
``IP6T_SO_ORIGINAL_DST``, also 80, at ``SOL_IPV6``, a ``sockaddr_in6``).

:func:`original_dst` is called once per accepted connection (in
``connectionMade``), never per request.  It returns ``None`` when the
connection was not redirected: no conntrack entry (``ENOENT``), not a
TCP/IP socket, or an original destination equal to the listener's own
address (the app called the sidecar explicitly).
"""

from __future__ import annotations

import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


def socket_of(transport):
    """The OS socket under a Twisted transport, through TLS (TLSMemoryBIOProtocol) wrappers; or None."""
    for _ in range(4):
        if transport is None:
            return None
        sock = getattr(transport, "socket", None)
        if isinstance(sock, socket.socket):
            return sock
        transport = getattr(transport, "transport", None)
    return None


def read_original_dst(sock):
    """``(ip, port)`` from ``SO_ORIGINAL_DST`` of ``sock``; None when the kernel has none."""
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, 16)
            port, = struct.unpack_from("!H", raw, 2)
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port, = struct.unpack_from("!H", raw, 2)
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    except (OSError, struct.error, ValueError):
        return None
    return None


def original_dst(transport):
    """``(ip, port)`` the client dialled before a REDIRECT, or None if the connection was not redirected."""
    sock = socket_of(transport)
    if sock is None:
        return None
    dst = read_original_dst(sock)
    if dst is None:
        return None
    try:
        local = sock.getsockname()
    except OSError:
        return dst
    if dst[1] == local[1] and dst[0] == local[0]:
        return None  # dialled the listener itself: not captured
    return dst
