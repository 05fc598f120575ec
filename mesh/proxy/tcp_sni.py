"""The server name (SNI) and ALPN of a TLS ClientHello, read without terminating TLS (Envoy's tls_inspector).

:func:`read_client_hello` (and :func:`read_server_name`, for routing by SNI) looks at the first
bytes a client sent on a connection to a TLS or HTTPS port and answers once it can: the ClientHello
may come in pieces, and may span several TLS records.  It is bounded: it reads at most
:data:`MAX_CLIENT_HELLO` bytes, and every length it follows is checked against the bytes it has, so
hostile input costs nothing more than its size and never raises.

Only what routing needs is checked (RFC 8446 section 4.1.2, RFC 6066 section 3, RFC 7301):
handshake records (type 22, version 3.x), a ClientHello, its extensions, the ``host_name`` entry of
a ``server_name`` extension and the protocol names of an ``application_layer_protocol_negotiation``
extension.  The name is returned lower-case, without a trailing dot; anything else (no extension, a
malformed message, a name that is not printable ASCII) reads as "no server name" (and a malformed
ALPN extension as "no ALPN"), and TLS itself is left to the upstream.
"""

from __future__ import annotations

from typing import NamedTuple

#: How many bytes the ClientHello may take, records included (Envoy's tls_inspector allows 64 KiB).
MAX_CLIENT_HELLO = 64 * 1024

_HANDSHAKE_RECORD = 22
_CLIENT_HELLO = 1
_SERVER_NAME_EXTENSION = 0
_ALPN_EXTENSION = 16
_HOST_NAME = 0
_RECORD_HEADER = 5
_MAX_RECORD = (1 << 14) + 256  # a plaintext record's fragment, with room for what some clients send


class ClientHello(NamedTuple):
    """What a ClientHello asks for: its server name (or None) and its ALPN protocol names (bytes)."""

    server_name: str | None
    alpn: tuple[bytes, ...]


def read_client_hello(data: bytes) -> tuple[bool, ClientHello | None]:
    """``(done, hello)`` for the first bytes of a connection.

    ``done`` False: the ClientHello is not complete yet (send more bytes).  ``done`` True:
    ``hello`` is the :class:`ClientHello`, or None when the bytes are not a TLS ClientHello (or
    not one within :data:`MAX_CLIENT_HELLO` bytes).
    """
    message, complete = _handshake_message(data)
    if not complete:
        return False, None
    if message is None or len(message) < 4 or message[0] != _CLIENT_HELLO:
        return True, None
    extensions = _extensions(memoryview(message)[4:])
    server_name = extensions.get(_SERVER_NAME_EXTENSION)
    alpn = extensions.get(_ALPN_EXTENSION)
    return True, ClientHello(None if server_name is None else _host_name(server_name),
                             () if alpn is None else _protocol_names(alpn))


def read_server_name(data: bytes) -> tuple[bool, str | None]:
    """``(done, server_name)`` for the first bytes of a connection (see :func:`read_client_hello`);
    ``server_name`` is None when there is none or the bytes are not a TLS ClientHello."""
    done, hello = read_client_hello(data)
    return done, None if hello is None else hello.server_name


def _handshake_message(data: bytes) -> tuple[bytes | None, bool]:
    """``(first handshake message or None, complete)``, gathered from the records of ``data``.

    A byte that cannot belong to a handshake record, or a message that could not fit in
    :data:`MAX_CLIENT_HELLO`, answers at once; otherwise more bytes are needed until it is whole.
    """
    body = bytearray()
    offset = 0
    limit = min(len(data), MAX_CLIENT_HELLO)
    while True:
        if offset < limit and data[offset] != _HANDSHAKE_RECORD or offset + 1 < limit and data[offset + 1] != 3:
            return None, True
        if offset + _RECORD_HEADER > limit:
            return None, len(data) >= MAX_CLIENT_HELLO
        length = int.from_bytes(data[offset + 3:offset + 5], "big")
        if length == 0 or length > _MAX_RECORD:
            return None, True
        start = offset + _RECORD_HEADER
        body += data[start:min(start + length, limit)]
        if len(body) >= 4:
            needed = 4 + int.from_bytes(body[1:4], "big")
            if needed > MAX_CLIENT_HELLO:
                return None, True
            if len(body) >= needed:
                return bytes(body[:needed]), True
        if start + length > limit:
            return None, start + length > MAX_CLIENT_HELLO
        offset = start + length


def _extensions(hello: memoryview) -> dict:
    """The bodies of the ``server_name`` and ALPN extensions of a ClientHello body, by type.

    Empty when the extensions cannot be reached; what comes before a malformed extension is kept.
    """
    found = {}
    position = 2 + 32  # legacy_version, random
    position = _skip(hello, position, 1)  # legacy_session_id
    position = _skip(hello, position, 2)  # cipher_suites
    position = _skip(hello, position, 1)  # legacy_compression_methods
    if position is None or position + 2 > len(hello):
        return found
    end = position + 2 + int.from_bytes(hello[position:position + 2], "big")
    if end > len(hello):
        return found
    position += 2
    while position + 4 <= end:
        kind = int.from_bytes(hello[position:position + 2], "big")
        length = int.from_bytes(hello[position + 2:position + 4], "big")
        position += 4
        if position + length > end:
            return found
        if kind in (_SERVER_NAME_EXTENSION, _ALPN_EXTENSION) and kind not in found:
            found[kind] = hello[position:position + length]
        position += length
    return found


def _skip(data: memoryview, position, size_bytes):
    """The position after a vector with a ``size_bytes`` length prefix at ``position`` (None: truncated)."""
    if position is None or position + size_bytes > len(data):
        return None
    position += size_bytes + int.from_bytes(data[position:position + size_bytes], "big")
    return position if position <= len(data) else None


def _host_name(extension: memoryview) -> str | None:
    """The ``host_name`` of a ``server_name`` extension's ServerNameList."""
    if len(extension) < 2 or 2 + int.from_bytes(extension[0:2], "big") != len(extension):
        return None
    position = 2
    while position + 3 <= len(extension):
        kind = extension[position]
        length = int.from_bytes(extension[position + 1:position + 3], "big")
        position += 3
        if position + length > len(extension):
            return None
        if kind == _HOST_NAME:
            return _printable_name(bytes(extension[position:position + length]))
        position += length
    return None


def _protocol_names(extension: memoryview) -> tuple[bytes, ...]:
    """The protocol names of an ALPN extension's ProtocolNameList; () when it is malformed."""
    if len(extension) < 2 or 2 + int.from_bytes(extension[0:2], "big") != len(extension):
        return ()
    names = []
    position = 2
    while position < len(extension):
        length = extension[position]
        position += 1
        if length == 0 or position + length > len(extension):
            return ()
        names.append(bytes(extension[position:position + length]))
        position += length
    return tuple(names)


def _printable_name(raw: bytes) -> str | None:
    if not raw or len(raw) > 255 or any(byte <= 0x20 or byte >= 0x7f for byte in raw):
        return None
    name = raw.decode("ascii").lower()
    return name[:-1] if name.endswith(".") else name
