"""Serialising HTTP/1.1 heads: requests to upstreams, responses to clients.

Hop-by-hop headers (RFC 9110 section 7.6.1) are never forwarded: the fixed
set below plus every header named in a ``Connection`` header, except the
:data:`FRAMING` ones.  Body framing is re-decided at each hop.
"""

from __future__ import annotations

from http import HTTPStatus

#: Lower-case hop-by-hop header names.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})

#: Lower-case names of the headers that frame a message.  A ``Connection``
#: header naming them does not remove them: dropping Content-Length would leave
#: a body unframed, which the next hop would read as another request.  (Envoy,
#: too, frames what it forwards from what it parsed, whatever Connection says.)
FRAMING = frozenset({b"content-length", b"transfer-encoding", b"host"})

REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}

_NO_BODY_STATUS = frozenset({204, 304})

#: Lower-case ``Connection`` values that name no header beyond :data:`HOP_BY_HOP`.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"upgrade"})


def connection_tokens(value: bytes) -> frozenset:
    """Header names listed in a ``Connection`` header, lower-case."""
    return frozenset(token.strip().lower() for token in value.split(b",") if token.strip())


def _apply_ops(lines: list, ops) -> list:
    """Apply Istio ``headers`` set/add/remove to ``[(name, value)]``."""
    drop = set(ops.remove) | {name for name, _ in ops.set}
    kept = [(name, value) for name, value in lines if name.lower() not in drop]
    return kept + list(ops.set) + list(ops.add)


def request_head(ctx, action, framing, content_length, upgrade, extra=()) -> bytes:
    """The head sent upstream for one request (built once, reused by retries).

    ``ctx.raw_headers`` arrive without hop-by-hop headers, Host, Expect and
    x-forwarded-for (the codec strips them); ``extra`` are listener-specific
    ``(name, value)`` pairs such as x-forwarded-client-cert.
    """
    path = ctx.path.encode("latin-1")
    strip = action.rewrite_strip
    if action.rewrite_prefix is not None:
        path = action.rewrite_prefix + path[strip:]
    authority = action.rewrite_authority or ctx.authority
    headers = ctx.raw_headers
    if action.request_headers is not None:
        headers = _apply_ops(headers, action.request_headers)
    xff = ctx.headers.get("x-forwarded-for")
    client = ctx.source_address.encode()
    out = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (ctx.method.encode(), path, authority)]
    for name, value in headers:
        out.append(b"%s: %s\r\n" % (name, value))
    for name, value in extra:
        out.append(b"%s: %s\r\n" % (name, value))
    out.append(b"x-forwarded-for: %s\r\n" % (xff.encode("latin-1") + b", " + client if xff else client))
    if "x-request-id" not in ctx.headers:
        out.append(b"x-request-id: %s\r\n" % ctx.request_id.encode())
    if framing == "length":
        out.append(b"content-length: %d\r\n" % content_length)
    elif framing == "chunked":
        out.append(b"transfer-encoding: chunked\r\n")
    if upgrade:
        out.append(b"connection: upgrade\r\nupgrade: %s\r\n" % ctx.headers["upgrade"].encode("latin-1"))
    out.append(b"\r\n")
    return b"".join(out)


def response_head(status, reason, headers, exchange, upgrade=False) -> bytes:
    """The head sent downstream for an upstream response.

    Decides the downstream framing and records it on the exchange
    (``response_chunked``; ``response_close`` for close-delimited bodies).
    """
    kept = []
    has_length = False
    connection = None
    for pair in headers:
        lname = pair[0].lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                connection = pair[1]  # as before, only the last Connection header is read
            if not (upgrade and (lname == b"upgrade" or lname == b"connection")):
                continue
        elif lname == b"content-length":
            has_length = True
        kept.append(pair)
    if connection is not None and connection.lower() not in _PLAIN_CONNECTION:
        # Rare: the Connection header names more hop-by-hop headers; strip them too.
        listed = connection_tokens(connection) - HOP_BY_HOP - FRAMING
        if listed:
            kept = [pair for pair in kept if pair[0].lower() not in listed]
    action = exchange.action
    if action is not None and action.response_headers is not None:
        kept = _apply_ops(kept, action.response_headers)
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, b"Unknown"))]
    for pair in kept:
        out.append(b"%s: %s\r\n" % pair)
    if not upgrade:
        body_allowed = not (exchange.head_only or status in _NO_BODY_STATUS)
        if body_allowed and not has_length:
            if exchange.ctx.http_version == "1.1":
                out.append(b"transfer-encoding: chunked\r\n")
                exchange.response_chunked = True
            else:
                exchange.response_close = True
        out.append(_connection_header(exchange))
    out.append(b"\r\n")
    return b"".join(out)


def _connection_header(exchange) -> bytes:
    if exchange.response_close or not exchange.keep_alive:
        return b"connection: close\r\n"
    if exchange.ctx.http_version == "1.0":
        return b"connection: keep-alive\r\n"
    return b""


def local_response(status, flags, body, exchange) -> bytes:
    """A complete proxy-generated response (error page) with its body."""
    return simple_response(status, flags, body, exchange.head_only,
                           close=exchange.response_close or not exchange.keep_alive,
                           request_id=exchange.ctx.request_id)


def simple_response(status, flags, body, head_only=False, close=True, request_id=None) -> bytes:
    """A complete plain-text response; used before and during exchanges."""
    out = [b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
           % (status, REASONS.get(status, b"Unknown"), len(body))]
    if flags:
        out.append(b"x-mesh-flags: %s\r\n" % flags.encode())
    if request_id:
        out.append(b"x-request-id: %s\r\n" % request_id.encode())
    if close:
        out.append(b"connection: close\r\n")
    out.append(b"\r\n")
    if not head_only:
        out.append(body)
    return b"".join(out)
