"""Transparent capture in the proxy: SO_ORIGINAL_DST reading and routing by original destination."""

import socket

import pytest

from mesh.proxy import original_dst as od
from mesh.proxy.outcome import LocalReply
from tests.unit.original_dst_support import RedirectedSocket
from tests.unit.routing_support import captured_request, compile_yaml, outbound_router


class _Transport:
    def __init__(self, sock=None, inner=None):
        if sock is not None:
            self.socket = sock
        self.transport = inner


@pytest.fixture
def sock():
    s = RedirectedSocket(socket.AF_INET, socket.SOCK_STREAM)
    yield s
    s.close()


def test_socket_is_found_under_tls_wrappers(sock):
    assert od.socket_of(_Transport(sock)) is sock
    assert od.socket_of(_Transport(inner=_Transport(inner=_Transport(sock)))) is sock
    assert od.socket_of(_Transport()) is None
    assert od.socket_of(None) is None


def test_redirected_connection_gives_the_dialled_address(sock):
    sock.answer = ("10.99.0.2", 8080)
    assert od.original_dst(_Transport(sock)) == ("10.99.0.2", 8080)


def test_not_redirected_gives_none(sock):
    sock.answer = ("127.0.0.1", 15001)  # conntrack entry without NAT: the listener itself
    assert od.original_dst(_Transport(sock)) is None
    sock.answer = None  # no conntrack entry at all
    assert od.original_dst(_Transport(sock)) is None


def test_real_loopback_connection_is_not_redirected():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        assert od.original_dst(_Transport(accepted)) is None
    finally:
        for s in (client, accepted, server):
            s.close()




@pytest.fixture(scope="module")
def router(tmp_path_factory):
    return outbound_router(compile_yaml(tmp_path_factory.mktemp("od")))


def test_host_header_wins(router):
    action, cluster = router.route(captured_request("server", ("10.5.5.5", 80)))
    assert cluster == "outbound|80||server.default.svc.cluster.local"


@pytest.mark.parametrize("dst", [("10.96.0.10", 80), ("10.99.0.2", 8080), ("10.99.0.3", 8080)])
def test_unknown_host_routes_by_original_destination(router, dst):
    ctx = captured_request("some-name-the-mesh-does-not-know", dst)
    action, cluster = router.route(ctx)
    assert cluster == "outbound|80||server.default.svc.cluster.local"
    assert ctx.host == "some-name-the-mesh-does-not-know"  # restored, for logs


@pytest.mark.parametrize("dst", [None, ("10.5.5.5", 80), ("10.99.0.2", 9999)])
def test_no_match_is_still_404_nr(router, dst):
    with pytest.raises(LocalReply) as raised:
        router.route(captured_request("unknown", dst))
    assert raised.value.status == 404
