"""The SNI reader of TLS ports (mesh.proxy.tcp_sni): real ClientHellos, pieces of them, and hostile bytes."""

from __future__ import annotations

import os
import ssl
import struct

import pytest

from mesh.proxy.tcp_sni import MAX_CLIENT_HELLO, ClientHello, read_client_hello, read_server_name


def client_hello(server_name: str | None, alpn=None) -> bytes:
    """The first flight of a real TLS client (OpenSSL through the ssl module), with SNI ``server_name``
    and the ALPN protocols ``alpn`` (a list of str; None: no ALPN extension)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        connection.do_handshake()
    return outgoing.read()


def split_records(hello: bytes, size: int) -> bytes:
    """The same handshake message in records of at most ``size`` bytes each (clients may fragment it)."""
    kind, version = hello[0], hello[1:3]
    message = hello[5:5 + struct.unpack("!H", hello[3:5])[0]]
    return b"".join(bytes([kind]) + version + struct.pack("!H", len(part)) + part
                    for part in (message[i:i + size] for i in range(0, len(message), size)))


@pytest.mark.parametrize("name, expected", [("api.example.com", "api.example.com"),
                                            ("API.Example.COM", "api.example.com"),
                                            (None, None)])
def test_real_client_hellos(name, expected):
    assert read_server_name(client_hello(name)) == (True, expected)


def test_every_prefix_asks_for_more_and_the_whole_answers():
    hello = client_hello("a.example.com")
    for end in range(len(hello)):
        assert read_server_name(hello[:end]) == (False, None), end
    assert read_server_name(hello + b"application bytes after it") == (True, "a.example.com")


def test_a_client_hello_in_several_records():
    fragmented = split_records(client_hello("b.example.com"), 50)
    assert read_server_name(fragmented[:-1]) == (False, None)
    assert read_server_name(fragmented) == (True, "b.example.com")


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"\x00", b"SSH-2.0-OpenSSH\r\n",
                                  b"\x16\x02\x00\x00\x01\x00",  # not version 3.x
                                  b"\x16\x03\x01\x00\x00",  # an empty record
                                  b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello
                                  b"\x17\x03\x03\x00\x01\x00"])  # application data
def test_what_is_no_client_hello_has_no_name_at_once(data):
    assert read_server_name(data) == (True, None)


def test_a_client_hello_longer_than_the_limit_has_no_name():
    length = MAX_CLIENT_HELLO  # the message would need more than the limit, with its headers
    header = b"\x16\x03\x01" + struct.pack("!H", 1 << 14) + b"\x01" + length.to_bytes(3, "big")
    assert read_server_name(header) == (True, None)
    records = b"".join(b"\x16\x03\x01" + struct.pack("!H", 1 << 14) + b"\x01" * (1 << 14) for _ in range(5))
    assert read_server_name(records[:MAX_CLIENT_HELLO + 10]) == (True, None)


def test_names_that_are_not_printable_ascii_are_no_names():
    hello = client_hello("abc.example.com")
    assert read_server_name(hello.replace(b"abc.example.com", b"a\x00c.example.com")) == (True, None)
    assert read_server_name(hello.replace(b"abc.example.com", b"abc.example.co.")) == (True, "abc.example.co")


def test_random_and_truncated_bytes_never_raise():
    hello = client_hello("fuzz.example.com")
    rng = os.urandom
    for length in range(0, 600, 7):
        read_server_name(rng(length))
        read_server_name(b"\x16\x03\x01" + rng(length))
        mutated = bytearray(hello)
        for position in rng(8):
            mutated[position * len(hello) // 256] ^= 0xFF
        done, name = read_server_name(bytes(mutated[:length + 5]))
        assert name is None or isinstance(name, str)


@pytest.mark.parametrize("alpn", [None, ["http/1.1"], ["h2", "http/1.1", "txmesh"]])
def test_the_alpn_of_real_client_hellos(alpn):
    expected = tuple(name.encode() for name in alpn or ())
    assert read_client_hello(client_hello("c.example.com", alpn)) == (True, ClientHello("c.example.com", expected))
    fragmented = split_records(client_hello(None, alpn), 40)
    assert read_client_hello(fragmented[:-1]) == (False, None)
    assert read_client_hello(fragmented) == (True, ClientHello(None, expected))


def test_what_is_no_client_hello_has_no_alpn():
    assert read_client_hello(b"GET / HTTP/1.1\r\n") == (True, None)
    assert read_client_hello(b"\x16\x03\x01\x00") == (False, None)


@pytest.mark.parametrize("broken", [b"\x00\x07\x02h2\x08http/1.", b"\x00\x06\x02h2\x08http/1.1",
                                    b"\x00\x03\x00h2", b"\x00\x00", b"\x00"])
def test_a_malformed_alpn_list_is_no_alpn_and_keeps_the_name(broken):
    """A ProtocolNameList whose lengths disagree, with an empty name, or empty reads as no ALPN."""
    hello = client_hello("d.example.com", ["h2", "http/1.1"])
    good = b"\x00\x10\x00\x0e\x00\x0c\x02h2\x08http/1.1"
    assert good in hello
    bad = b"\x00\x10" + struct.pack("!H", len(broken)) + broken
    # keep every length around it right: the extension block, the message and the record shrink alike
    delta = len(bad) - len(good)
    start = hello.index(good)
    body = hello[:start] + bad + hello[start + len(good):]
    record, message = struct.unpack("!H", body[3:5])[0] + delta, int.from_bytes(body[6:9], "big") + delta
    extensions_at = _extensions_offset(hello)
    total = struct.unpack("!H", body[extensions_at:extensions_at + 2])[0] + delta
    body = (body[:3] + struct.pack("!H", record) + body[5:6] + message.to_bytes(3, "big") + body[9:extensions_at]
            + struct.pack("!H", total) + body[extensions_at + 2:])
    assert read_client_hello(body) == (True, ClientHello("d.example.com", ()))


def _extensions_offset(hello: bytes) -> int:
    """Where the extensions' length is in a one-record ClientHello."""
    position = 5 + 4 + 2 + 32
    position += 1 + hello[position]
    position += 2 + struct.unpack("!H", hello[position:position + 2])[0]
    return position + 1 + hello[position]


def test_random_alpn_bytes_never_raise():
    hello = client_hello("e.example.com", ["h2", "http/1.1"])
    start = hello.index(b"\x02h2\x08http/1.1")
    for _ in range(200):
        mutated = hello[:start] + os.urandom(11) + hello[start + 11:]
        done, parsed = read_client_hello(mutated)
        assert done and (parsed is None or all(isinstance(name, bytes) and name for name in parsed.alpn))
