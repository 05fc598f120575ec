"""The SNI reader of TLS ports (mesh.proxy.tcp_sni): real ClientHellos, pieces of them, and hostile bytes."""

from __future__ import annotations

import os
import ssl
import struct

import pytest

from mesh.proxy.tcp_sni import MAX_CLIENT_HELLO, read_server_name


def client_hello(server_name: str | None) -> bytes:
    """The first flight of a real TLS client (OpenSSL through the ssl module), with SNI ``server_name``."""
    context = ssl.create_default_context()
    context.check_hostname = False
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
