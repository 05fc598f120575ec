"""The request view of a TCP connection (mesh.proxy.tcp_proxy.TcpContext), as plugins see it."""

from __future__ import annotations

from mesh.api import RequestView
from mesh.proxy.tcp_proxy import TcpContext


def test_a_tcp_connection_is_a_request_view_with_empty_http_fields():
    ctx = TcpContext("inbound", "10.0.0.5", "spiffe://cluster.local/ns/shop/sa/client", 12.5, 9000, "a.example")
    assert isinstance(ctx, RequestView)
    assert (ctx.protocol, ctx.method, ctx.path, ctx.uri_path, ctx.host, ctx.authority) == ("tcp", "", "", "", "", b"")
    assert dict(ctx.headers) == {} and ctx.raw_headers == () and ctx.response_code == 0
    assert (ctx.port, ctx.server_name, ctx.source_address) == (9000, "a.example", "10.0.0.5")
    assert ctx.get_extra("k") is None
    ctx.extra["k"] = 1
    assert ctx.get_extra("k") == 1
