"""HPACK in C for the HTTP/2 codecs: libnghttp2's deflater and inflater behind hpack's interface.

h2 compresses and decompresses header blocks through the ``encoder`` and ``decoder`` of its
connection, by default the pure-Python ``hpack`` library (about a third of h2's work per request,
docs/performance.md).  :func:`install` gives a connection an :class:`Encoder` and a :class:`Decoder`
with the interface h2 uses (``encode``, ``decode``, ``header_table_size``,
``max_header_list_size``, ``max_allowed_table_size``, hpack's exceptions) on libnghttp2's HPACK
API (``nghttp2_hd_deflate_*``, ``nghttp2_hd_inflate_*``), loaded through cffi in ABI mode: no
headers and no compiler, only Debian's ``libnghttp2.so.14``, which curl and h2load need anyway.
When it cannot be loaded, the connection keeps pure-Python HPACK (logged once, with the reason).

Kept as hpack does it: a header given as a :class:`hpack.NeverIndexedHeaderTuple` (or a
``(name, value, True)`` triple) is sent as never indexed, and a header received so comes back as
one; names and values may be ``str`` (UTF-8) or ``bytes``; ``decode(raw=True)`` gives bytes;
decoding stops with :class:`hpack.OversizedHeaderListError` as soon as the header list (name +
value + 32 per field) passes ``max_header_list_size``, which stops an HPACK bomb as it expands;
a table size update above ``max_allowed_table_size`` is an :class:`hpack.InvalidTableSizeError`;
any other malformed block is an :class:`hpack.HPACKDecodingError`.

What nghttp2 decides itself: Huffman coding (a string is Huffman-coded when that makes it
shorter; in C that costs little, so ``encode``'s ``huffman`` argument is ignored), which headers
the encoder adds to its table (never ``:path``, ``content-length``, ``etag``, ``set-cookie`` and
a few others whose values rarely repeat), an encoder table of at most 4096 bytes whatever larger
size the peer allows (as Envoy's), and a header name or value over 64 KiB is a decoding error.
"""

from __future__ import annotations

import struct
from functools import cache

import hpack
from hpack import (
    HeaderTuple,
    HPACKDecodingError,
    InvalidTableSizeError,
    NeverIndexedHeaderTuple,
    OversizedHeaderListError,
)
from twisted.logger import Logger

log = Logger()

#: The library, by its Debian soname.
LIBRARY = "libnghttp2.so.14"
#: The encoder's table size: the protocol's default, and at most what it uses whatever the peer allows.
TABLE_SIZE = 4096

# The part of nghttp2.h used here.  Names, values and the inflater's input are declared ``char *``
# (``uint8_t *`` in nghttp2.h: the same layout) so that ``ffi.unpack`` gives bytes and
# ``ffi.from_buffer`` needs no type.
_CDEF = """
typedef struct nghttp2_hd_deflater nghttp2_hd_deflater;
typedef struct nghttp2_hd_inflater nghttp2_hd_inflater;
typedef struct { char *name; char *value; size_t namelen; size_t valuelen; uint8_t flags; } nghttp2_nv;
int nghttp2_hd_deflate_new(nghttp2_hd_deflater **, size_t);
void nghttp2_hd_deflate_del(nghttp2_hd_deflater *);
int nghttp2_hd_deflate_change_table_size(nghttp2_hd_deflater *, size_t);
size_t nghttp2_hd_deflate_get_max_dynamic_table_size(nghttp2_hd_deflater *);
ssize_t nghttp2_hd_deflate_hd(nghttp2_hd_deflater *, uint8_t *, size_t, const nghttp2_nv *, size_t);
int nghttp2_hd_inflate_new(nghttp2_hd_inflater **);
void nghttp2_hd_inflate_del(nghttp2_hd_inflater *);
int nghttp2_hd_inflate_change_table_size(nghttp2_hd_inflater *, size_t);
size_t nghttp2_hd_inflate_get_max_dynamic_table_size(nghttp2_hd_inflater *);
ssize_t nghttp2_hd_inflate_hd2(nghttp2_hd_inflater *, nghttp2_nv *, int *, const char *, size_t, int);
int nghttp2_hd_inflate_end_headers(nghttp2_hd_inflater *);
typedef struct { nghttp2_nv nv; int flags; } inflate_out;
"""
_NV_FLAG_NO_INDEX = 0x1
_INFLATE_FINAL, _INFLATE_EMIT = 0x1, 0x2
#: One nghttp2_nv, packed natively: two pointers, two sizes, the flags byte (padded by the stride).
_NV = struct.Struct("@PPNNB")
#: The lengths and flags of an nghttp2_nv, after its two pointers, then the int of the inflater's flags
#: (``inflate_out``: the nv and the flags that ``nghttp2_hd_inflate_hd2`` writes, read in one call).
_INFLATE_OUT = struct.Struct(f"@{2 * struct.calcsize('P')}xNNB0Pi")  # 0P: the nv padded as C pads it
_tuple = tuple.__new__  # a HeaderTuple without its Python-level __new__


def open_library(name: str, cdef: str, probe: str, instead: str, logger: Logger):
    """``(ffi, lib)`` of the shared library ``name`` with the declarations ``cdef`` (cffi, ABI mode), or
    None when cffi, the library or its symbol ``probe`` is missing: then ``logger`` warns that the
    proxy runs on ``instead``, and why.  Looking ``probe`` up here makes a library too old for ``cdef``
    fail at load, not on the first request."""
    try:
        from cffi import FFI

        ffi = FFI()
        ffi.cdef(cdef)
        lib = ffi.dlopen(name)
        getattr(lib, probe)
    except (ImportError, OSError, AttributeError) as e:
        logger.warn("{instead}: {library} cannot be loaded ({error})", instead=instead, library=name, error=e)
        return None
    return ffi, lib


@cache
def _library():
    """``(ffi, lib)`` of :data:`LIBRARY`, or None when it cannot be loaded (logged, once)."""
    return open_library(LIBRARY, _CDEF, "nghttp2_hd_inflate_hd2", "HPACK in pure Python", log)


def install(conn, huffman: bool = True) -> None:
    """Give the h2 connection ``conn`` HPACK in C, or pure-Python HPACK when libnghttp2 is missing.

    Call it right after the connection is made, before it sends or receives a header block.
    ``huffman``: whether the pure-Python encoder Huffman-codes (nghttp2's always does when it
    saves bytes: in C it is cheap).  The decoder's ``max_header_list_size`` is h2's default,
    as on h2's own decoder.
    """
    library = _library()
    if library is None:  # h2's own pure-Python encoder and decoder stay
        if not huffman:
            conn.encoder = _PlainEncoder()
    else:
        conn.encoder = Encoder(*library)
        conn.decoder = Decoder(*library, max_header_list_size=conn.DEFAULT_MAX_HEADER_LIST_SIZE)


class _PlainEncoder(hpack.Encoder):
    """Pure-Python HPACK without Huffman coding: in Python, Huffman-coding a request's header values
    costs about three times the rest of its encoding, to save a few dozen bytes inside the mesh."""

    def encode(self, headers, huffman=True):
        return super().encode(headers, huffman=False)


def _to_bytes(value) -> bytes:
    """``value`` as bytes, as hpack takes it: bytes as they are, anything else as its UTF-8 text."""
    if type(value) is bytes:
        return value
    return (value if type(value) is str else str(value)).encode()


class HeaderArray:
    """The ``nghttp2_nv`` array of a header block, packed into buffers kept from block to block (grown as
    needed): the names and values one after the other, and the ``nghttp2_nv`` pointing into them.

    ``ffi`` declares ``nghttp2_nv`` (with ``char *`` or ``uint8_t *`` strings: the same layout).  Used
    by :class:`Encoder` and by :mod:`mesh.proxy.codec.nghttp2_session`, whose connections share one
    (nghttp2 copies the array when a block is submitted).
    """

    def __init__(self, ffi):
        self._ffi = ffi
        self._stride = ffi.sizeof("nghttp2_nv")
        self._reserve(1024, 32)

    def _reserve(self, size: int, count: int) -> None:
        """Buffers for ``count`` headers of ``size`` bytes in all."""
        ffi = self._ffi
        self.size, self.count = size, count
        self._strings = ffi.new("char[]", size)
        self._strings_bytes = ffi.buffer(self._strings)
        self._strings_at = int(ffi.cast("uintptr_t", self._strings))
        self.nva = ffi.new("nghttp2_nv[]", count)
        self._nva_bytes = ffi.buffer(self.nva)

    def build(self, headers) -> int:
        """Pack ``headers`` into :attr:`nva` and return their count: ``(name, value)`` pairs, of
        :class:`hpack.HeaderTuple` or of ``(name, value, never_indexed)`` triples, names and values
        ``bytes`` or anything else as its UTF-8 text; never-indexed ones flagged so."""
        parts = []
        fields = []  # (name length, value length, nghttp2 flags) per header
        for header in headers:
            name, value = header[0], header[1]
            if name.__class__ is not bytes:
                name = _to_bytes(name)
            if value.__class__ is not bytes:
                value = _to_bytes(value)
            kind = header.__class__
            if kind is tuple or kind is HeaderTuple:
                flags = 0
            elif kind is NeverIndexedHeaderTuple:
                flags = _NV_FLAG_NO_INDEX
            elif isinstance(header, HeaderTuple):
                flags = 0 if header.indexable else _NV_FLAG_NO_INDEX
            else:
                flags = _NV_FLAG_NO_INDEX if len(header) > 2 and header[2] else 0
            parts.append(name)
            parts.append(value)
            fields.append((len(name), len(value), flags))
        blob = b"".join(parts)
        count = len(fields)
        if count > self.count or len(blob) > self.size:
            self._reserve(max(2 * len(blob), self.size), max(2 * count, self.count))
        self._strings_bytes[:len(blob)] = blob
        nva, stride, pack = self._nva_bytes, self._stride, _NV.pack_into
        at = self._strings_at
        offset = 0
        for name_length, value_length, flags in fields:
            pack(nva, offset, at, at + name_length, name_length, value_length, flags)
            at += name_length + value_length
            offset += stride
        return count


class Encoder:
    """hpack's ``Encoder`` on an nghttp2 deflater: one per connection, for the header blocks it sends."""

    def __init__(self, ffi, lib):
        self._ffi = ffi
        self._deflate = lib.nghttp2_hd_deflate_hd
        self._lib = lib
        deflater = ffi.new("nghttp2_hd_deflater **")
        if lib.nghttp2_hd_deflate_new(deflater, TABLE_SIZE):
            raise MemoryError("nghttp2_hd_deflate_new")
        self._deflater = ffi.gc(deflater[0], lib.nghttp2_hd_deflate_del)
        self._headers = HeaderArray(ffi)
        self._out_for = None  # (size, count) of the header array that _out is sized for

    def _output(self) -> None:
        """The buffer of a header block: nghttp2_hd_deflate_bound, two table size updates, then each field
        at its longest (a literal with both lengths in at most 6 bytes each)."""
        headers = self._headers
        self._out_for = (headers.size, headers.count)
        self._out_size = 12 + 13 * headers.count + headers.size
        self._out = self._ffi.new("uint8_t[]", self._out_size)
        self._out_bytes = self._ffi.buffer(self._out)

    @property
    def header_table_size(self) -> int:
        """The size of the table; set it to the peer's SETTINGS_HEADER_TABLE_SIZE (at most :data:`TABLE_SIZE`
        is used), and the next block starts with the table size update."""
        return self._lib.nghttp2_hd_deflate_get_max_dynamic_table_size(self._deflater)

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._lib.nghttp2_hd_deflate_change_table_size(self._deflater, value)

    def encode(self, headers, huffman: bool = True) -> bytes:
        """The header block of ``headers``: an iterable of ``(name, value)`` pairs, of
        :class:`hpack.HeaderTuple` or of ``(name, value, never_indexed)`` triples, pseudo-headers first."""
        array = self._headers
        count = array.build(headers)
        if self._out_for != (array.size, array.count):
            self._output()
        written = self._deflate(self._deflater, self._out, self._out_size, array.nva, count)
        if written < 0:
            raise MemoryError(f"nghttp2_hd_deflate_hd: {written}")
        return self._out_bytes[:written]


class Decoder:
    """hpack's ``Decoder`` on an nghttp2 inflater: one per connection, for the header blocks it receives."""

    def __init__(self, ffi, lib, max_header_list_size: int = hpack.hpack.DEFAULT_MAX_HEADER_LIST_SIZE):
        self._ffi = ffi
        self._lib = lib
        inflater = ffi.new("nghttp2_hd_inflater **")
        if lib.nghttp2_hd_inflate_new(inflater):
            raise MemoryError("nghttp2_hd_inflate_new")
        self._inflater = ffi.gc(inflater[0], lib.nghttp2_hd_inflate_del)
        out = ffi.new("inflate_out *")
        self._out, self._out_bytes = out, ffi.buffer(out)
        self._nv, self._flags = ffi.addressof(out, "nv"), ffi.addressof(out, "flags")
        # ffi.unpack without its Python-level wrapper (a private name of cffi: the public one otherwise)
        self._unpack = getattr(getattr(ffi, "_backend", None), "unpack", ffi.unpack)
        #: The most a decoded header list may hold (name + value + 32 per field): decoding stops beyond it.
        self.max_header_list_size = max_header_list_size
        self._max_allowed_table_size = TABLE_SIZE
        self._shrunk = False  # the allowed size went below the table's: the next block must shrink it

    @property
    def header_table_size(self) -> int:
        """The size of the table, as the peer's last table size update set it (or the allowed size shrank it)."""
        return self._lib.nghttp2_hd_inflate_get_max_dynamic_table_size(self._inflater)

    @property
    def max_allowed_table_size(self) -> int:
        """The largest table the peer may use: the SETTINGS_HEADER_TABLE_SIZE this side sent and saw acknowledged."""
        return self._max_allowed_table_size

    @max_allowed_table_size.setter
    def max_allowed_table_size(self, value: int) -> None:
        self._shrunk = value < self.header_table_size
        self._max_allowed_table_size = value
        self._lib.nghttp2_hd_inflate_change_table_size(self._inflater, value)

    def decode(self, data: bytes, raw: bool = False) -> list:
        """The headers of the header block ``data``, as :class:`hpack.HeaderTuple` (never-indexed ones as
        :class:`hpack.NeverIndexedHeaderTuple`), of bytes with ``raw`` and of str without."""
        if data and data[0] & 0xE0 == 0x20:
            self._check_size_updates(data)
        elif self._shrunk:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        ffi, inflater, nv, flags, out = self._ffi, self._inflater, self._nv, self._flags, self._out_bytes
        inflate, unpack, read = self._lib.nghttp2_hd_inflate_hd2, self._unpack, _INFLATE_OUT.unpack_from
        limit = self.max_header_list_size
        size = 0
        headers = []
        source = ffi.from_buffer(data)
        left = len(data)
        while True:
            used = inflate(inflater, nv, flags, source, left, 1)
            if used < 0:
                raise HPACKDecodingError(f"nghttp2_hd_inflate_hd2: invalid header block ({used})")
            source += used
            left -= used
            name_length, value_length, nv_flags, emitted = read(out)
            if emitted & _INFLATE_EMIT:
                size += name_length + value_length + 32
                if size > limit:
                    self._lib.nghttp2_hd_inflate_end_headers(inflater)
                    raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
                headers.append(_tuple(NeverIndexedHeaderTuple if nv_flags & _NV_FLAG_NO_INDEX else HeaderTuple,
                                      (unpack(nv.name, name_length), unpack(nv.value, value_length))))
                if not left:  # the block ends with this field: the next call would only say FINAL
                    emitted = _INFLATE_FINAL
            if emitted & _INFLATE_FINAL:
                self._lib.nghttp2_hd_inflate_end_headers(inflater)
                break
            if not emitted and not used:  # nghttp2 ends a whole block with FINAL or an error: never here
                raise HPACKDecodingError("nghttp2_hd_inflate_hd2: no progress")
        self._shrunk = False
        if raw:
            return headers
        try:
            return [_tuple(header.__class__, (header[0].decode(), header[1].decode())) for header in headers]
        except UnicodeDecodeError as e:
            raise HPACKDecodingError("Unable to decode headers as UTF-8") from e

    def _check_size_updates(self, data: bytes) -> None:
        """Raise :class:`hpack.InvalidTableSizeError` if a table size update that starts ``data`` asks for
        more than allowed (nghttp2 would reject it too, as any malformed block)."""
        at = 0
        while at < len(data) and data[at] & 0xE0 == 0x20:
            size, used = hpack.hpack.decode_integer(memoryview(data)[at:], 5)
            if size > self._max_allowed_table_size:
                raise InvalidTableSizeError("Encoder exceeded max allowable table size")
            at += used
