"""x-forwarded-for and x-forwarded-proto as Envoy's ``mutateRequestHeaders`` sets them on Istio's sidecars
(``use_remote_address: false``) and gateways (``true``, no trusted hops):
:func:`mesh.proxy.exchange._forwarded_headers`."""

from __future__ import annotations

from types import SimpleNamespace

from mesh.config.tables import HeaderOps
from mesh.proxy.exchange import _forwarded_headers

XFCC = ((b"x-forwarded-client-cert", b"By=a"),)
HTTP, HTTPS = (b"x-forwarded-proto", b"http"), (b"x-forwarded-proto", b"https")
SIDECAR = SimpleNamespace(forwarded_proto=None)
PLAIN_ROUTE = SimpleNamespace(request_headers=None)


def ctx(proto=None, xff=None, peer=None):
    """A request as the codecs leave it: x-forwarded-for in ``headers`` only, x-forwarded-proto in both."""
    raw = [(b"x-a", b"1")] + ([(b"X-Forwarded-Proto", proto.encode())] if proto else [])
    headers = {"x-a": "1", **({"x-forwarded-proto": proto} if proto else {}),
               **({"x-forwarded-for": xff} if xff else {})}
    return SimpleNamespace(headers=headers, raw_headers=raw, peer=peer, source_address="10.0.0.9")


def gateway(scheme):
    return SimpleNamespace(forwarded_proto=scheme)


def test_a_sidecar_adds_the_connections_scheme_only_when_absent():
    assert _forwarded_headers(ctx(), SIDECAR, PLAIN_ROUTE, ()) == (HTTP,)
    over_mtls = _forwarded_headers(ctx(peer="spiffe://cluster.local/ns/a/sa/b"), SIDECAR, PLAIN_ROUTE, XFCC)
    assert over_mtls == XFCC + (HTTPS,)
    kept = ctx("https")
    assert _forwarded_headers(kept, SIDECAR, PLAIN_ROUTE, XFCC) is XFCC
    assert kept.raw_headers == [(b"x-a", b"1"), (b"X-Forwarded-Proto", b"https")]


def test_a_sidecar_forwards_x_forwarded_for_as_received_and_appends_nothing():
    assert _forwarded_headers(ctx(xff="9.9.9.9, 10.1.1.1"), SIDECAR, PLAIN_ROUTE, XFCC) == \
        XFCC + ((b"x-forwarded-for", b"9.9.9.9, 10.1.1.1"), HTTP)
    assert all(name != b"x-forwarded-for" for name, _ in _forwarded_headers(ctx(), SIDECAR, PLAIN_ROUTE, ()))


def test_a_gateway_appends_the_clients_address_and_replaces_its_scheme():
    for scheme in (b"http", b"https"):
        request = ctx("ftp", xff="9.9.9.9")
        added = _forwarded_headers(request, gateway(scheme), PLAIN_ROUTE, ())
        assert added == ((b"x-forwarded-for", b"9.9.9.9, 10.0.0.9"), (b"x-forwarded-proto", scheme))
        assert request.raw_headers == [(b"x-a", b"1")]
    assert _forwarded_headers(ctx(), gateway(b"https"), PLAIN_ROUTE, ()) == ((b"x-forwarded-for", b"10.0.0.9"), HTTPS)


def test_a_route_that_sets_or_removes_x_forwarded_proto_has_the_last_word():
    for ops in (HeaderOps(set=((b"x-forwarded-proto", b"wss"),)), HeaderOps(remove=(b"x-forwarded-proto",))):
        route = SimpleNamespace(request_headers=ops)
        assert _forwarded_headers(ctx(), SIDECAR, route, ()) == ()
        assert _forwarded_headers(ctx("x"), gateway(b"https"), route, ()) == ((b"x-forwarded-for", b"10.0.0.9"),)
    other = SimpleNamespace(request_headers=HeaderOps(set=((b"x-b", b"2"),)))
    assert _forwarded_headers(ctx(), SIDECAR, other, ()) == (HTTP,)
