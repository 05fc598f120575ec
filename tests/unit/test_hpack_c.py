"""HPACK in C (mesh.proxy.codec.hpack_c): the same round trips and failures as the pure-Python hpack.

Every case runs on both implementations (``codec``), and blocks cross over: what one encodes, the
other decodes, block after block (their dynamic tables stay in step).
"""

import hpack
import pytest
from h2.connection import H2Connection
from hpack import (
    HeaderTuple,
    HPACKDecodingError,
    InvalidTableSizeError,
    NeverIndexedHeaderTuple,
    OversizedHeaderListError,
)
from twisted.logger import Logger

from mesh.proxy.codec import h2_client, h2_server, hpack_c, http2_engine
from mesh.proxy.listener import Limits

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"api.default.svc"), (b":path", b"/v1/x"),
           (b"user-agent", b"curl/8.5"), (b"accept", b"*/*"), (b"x-request-id", b"0f9c")]


def _python():
    return hpack.Encoder(), hpack.Decoder()


def _nghttp2():
    library = hpack_c._library()
    return hpack_c.Encoder(*library), hpack_c.Decoder(*library)


@pytest.fixture(params=[_python, _nghttp2], ids=["python", "nghttp2"])
def codec(request):
    """A new (encoder, decoder) of one implementation."""
    return request.param


@pytest.fixture
def other(codec):
    """A new (encoder, decoder) of the other implementation."""
    return _nghttp2 if codec is _python else _python


def test_the_library_is_there():
    assert hpack_c._library() is not None, "libnghttp2.so.14 cannot be loaded: the other tests test hpack twice"


def test_round_trips_block_after_block_across_implementations(codec, other):
    encoder, decoder = codec()
    other_decoder = other()[1]
    other_encoder, decoder_of_other = other()[0], codec()[1]
    for n in range(4):
        headers = [*REQUEST, (b"x-n", b"%d" % n), (b"x-long", b"v" * (300 * n))]
        block = encoder.encode(headers)
        assert decoder.decode(block, raw=True) == headers and other_decoder.decode(block, raw=True) == headers
        assert decoder_of_other.decode(other_encoder.encode(headers), raw=True) == headers
    assert all(type(header) is HeaderTuple for header in decoder.decode(encoder.encode(REQUEST), raw=True))


def test_str_and_bytes_as_hpack_takes_and_gives_them(codec):
    encoder, decoder = codec()
    block = encoder.encode([(":status", "200"), (b"x-b", "é"), ("x-n", 7)])
    assert decoder.decode(block) == [(":status", "200"), ("x-b", "é"), ("x-n", "7")]
    assert decoder.decode(encoder.encode([("x-b", "é")]), raw=True) == [(b"x-b", "é".encode())]
    with pytest.raises(HPACKDecodingError):
        decoder.decode(encoder.encode([(b"x-bad", b"\xff")]))


@pytest.mark.parametrize("credential", [NeverIndexedHeaderTuple(b"authorization", b"Bearer abc"),
                                        (b"authorization", b"Bearer abc", True)], ids=["tuple-class", "triple"])
def test_never_indexed_headers_stay_out_of_the_tables(codec, other, credential):
    encoder, decoder = codec()
    first = encoder.encode([credential])
    second = encoder.encode([credential])
    # never added to the table: a decoder that missed the first block still reads the credential
    assert other()[1].decode(second, raw=True) == [(b"authorization", b"Bearer abc")]
    assert type(other()[1].decode(second, raw=True)[0]) is NeverIndexedHeaderTuple
    assert type(decoder.decode(first, raw=True)[-1]) is NeverIndexedHeaderTuple
    assert type(decoder.decode(second)[-1]) is NeverIndexedHeaderTuple


@pytest.mark.parametrize("block", [b"\xbe", b"\x82\xff\xff\xff\xff\xff\xff\x0f"], ids=["empty-dynamic-table", "huge"])
def test_a_bad_index_is_a_decoding_error(codec, block):
    with pytest.raises(HPACKDecodingError):
        codec()[1].decode(block)


def test_a_truncated_block_is_a_decoding_error(codec):
    encoder, decoder = codec()
    block = encoder.encode([(b"x-long", b"v" * 100)])
    with pytest.raises(HPACKDecodingError):
        decoder.decode(block[:-1])


def test_decoding_stops_once_the_header_list_passes_its_limit(codec):
    encoder, decoder = codec()
    decoder.max_header_list_size = 1000
    assert len(decoder.decode(encoder.encode([(b"x-a", b"v" * 900)]), raw=True)) == 1
    with pytest.raises(OversizedHeaderListError):
        decoder.decode(encoder.encode([(b"x-b", b"v" * 500), (b"x-c", b"v" * 500)]))


def test_an_hpack_bomb_is_stopped(codec):
    """A 4000-byte entry, then 16000 one-byte references to it: 64 MB if decoded to the end (the entry is
    added by hpack's encoder, as an attacker's would: nghttp2's keeps entries that large out of its table)."""
    decoder = codec()[1]
    decoder.max_header_list_size = 64 * 1024
    decoder.decode(hpack.Encoder().encode([(b"x-bomb", b"a" * 4000)]))
    with pytest.raises(OversizedHeaderListError):
        decoder.decode(b"\xbe" * 16000)


def test_a_table_size_update_beyond_the_allowed_is_refused(codec):
    decoder = codec()[1]
    assert decoder.decode(b"\x3f\xe1\x1f\x82", raw=True) == [(b":method", b"GET")]  # 4096: allowed
    with pytest.raises(InvalidTableSizeError):
        decoder.decode(b"\x3f\xe1\x3f\x82")  # 8192


def test_a_smaller_allowed_table_must_be_applied_by_the_next_block(codec):
    decoder = codec()[1]
    decoder.max_allowed_table_size = 1024
    with pytest.raises(InvalidTableSizeError):
        decoder.decode(b"\x82")
    decoder = codec()[1]
    decoder.max_allowed_table_size = 1024
    assert decoder.decode(b"\x3f\xe1\x07\x82", raw=True) == [(b":method", b"GET")]  # an update to 1024
    assert decoder.header_table_size == 1024 and decoder.decode(b"\x82", raw=True) == [(b":method", b"GET")]


def test_the_peers_table_size_goes_out_as_an_update(codec, other):
    encoder, decoder = codec()
    other_decoder = other()[1]
    assert other_decoder.decode(encoder.encode(REQUEST), raw=True) == REQUEST
    encoder.header_table_size = 0
    block = encoder.encode(REQUEST)
    assert block[0] & 0xE0 == 0x20 and encoder.header_table_size == 0
    assert other_decoder.decode(block, raw=True) == REQUEST and other_decoder.header_table_size == 0


def test_the_codecs_use_hpack_in_c_with_their_limits(monkeypatch):
    monkeypatch.setattr(http2_engine, "_engine", "h2")  # HPACK in C is for the h2 engine (nghttp2 has its own)
    server = h2_server._new_connection(Limits())
    client = h2_client.H2UpstreamConnection(pool=None)
    assert type(server.encoder) is hpack_c.Encoder and type(client.h2.encoder) is hpack_c.Encoder
    assert type(server.decoder) is hpack_c.Decoder
    assert server.decoder.max_header_list_size == 2 * Limits().max_header_bytes
    assert client.h2.decoder.max_header_list_size == H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE


@pytest.fixture
def no_library(monkeypatch):
    """hpack_c with a library name that does not exist, and what it logs."""
    events = []
    monkeypatch.setattr(hpack_c, "LIBRARY", "libnghttp2-missing.so.0")
    monkeypatch.setattr(hpack_c, "log", Logger(observer=events.append))
    hpack_c._library.cache_clear()
    yield events
    hpack_c._library.cache_clear()


def test_without_the_library_hpack_stays_in_python_and_says_why_once(no_library):
    conns = [H2Connection(), H2Connection()]
    hpack_c.install(conns[0])
    hpack_c.install(conns[1], huffman=False)
    assert type(conns[0].encoder) is hpack.Encoder and type(conns[1].encoder) is hpack_c._PlainEncoder
    assert all(type(conn.decoder) is hpack.Decoder for conn in conns)
    assert conns[0].decoder.max_header_list_size == H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE
    assert [event["library"] for event in no_library] == ["libnghttp2-missing.so.0"]
    # the plain encoder skips Huffman coding (a literal's length byte has its top bit clear)
    assert conns[1].encoder.encode([(b"x-a", b"aaaaaaaa")]) == b"\x40\x03x-a\x08aaaaaaaa"


def test_the_decoders_struct_is_laid_out_as_c_lays_it_out():
    """The lengths, nv flags and inflater flags the decoder reads in one call are where C puts them."""
    ffi, _ = hpack_c._library()
    assert hpack_c._INFLATE_OUT.size == ffi.offsetof("inflate_out", "flags") + ffi.sizeof("int")
    out = ffi.new("inflate_out *")
    out.nv.namelen, out.nv.valuelen, out.nv.flags, out.flags = 11, 22, 1, 3
    assert hpack_c._INFLATE_OUT.unpack_from(ffi.buffer(out)) == (11, 22, 1, 3)
