"""h2's connection as both HTTP/2 codecs use it: cheaper where h2 spends for nothing.

h2's ``H2Connection._receive_frame`` starts with
``self.config.logger.trace("Received frame: %s", repr(frame))``: the ``repr`` runs whatever the
logger does with it, and h2's default logger (``DummyLogger``, the codecs' one) does nothing.
That ``repr`` was about 72 k instructions per request in ``bench.h2floor``.  And h2 normalizes and
validates a received header block through a chain of eight generators, one per rule; its streams here
do the same in one loop (:func:`received_headers`).  A header block the codecs send, already bytes,
is not copied into bytes again (:meth:`MeshH2Stream.send_headers`).
"""

from __future__ import annotations

import re

from h2.config import DummyLogger
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError, StreamIDTooLowError
from h2.stream import H2Stream, StreamInputs
from h2.utilities import (
    _ALLOWED_PSEUDO_HEADER_FIELDS,
    CONNECTION_HEADERS,
    _check_pseudo_header_field_acceptability,
    authority_from_headers,
    extract_method_header,
    is_informational_response,
)
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import HeadersFrame, RstStreamFrame


class MeshH2Connection(H2Connection):
    """An ``H2Connection`` whose received frames are formatted only for a logger that writes them.

    :meth:`_receive_frame` is h2 4.x's, statement for statement (the dispatch and the handling of
    frames for closed and reset streams), minus the trace line's ``repr`` when the configuration's
    logger is h2's ``DummyLogger``; with any other logger it is h2's own.  Its streams are
    :class:`MeshH2Stream`.
    """

    def _begin_new_stream(self, stream_id, allowed_ids):
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = MeshH2Stream  # h2 builds an H2Stream; the subclass adds no state
        return stream

    def _receive_frame(self, frame):
        if type(self.config.logger) is not DummyLogger:
            return super()._receive_frame(frame)
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as e:
            # Closed by RST_STREAM: a stream error, answered with RST_STREAM; otherwise a connection error.
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except StreamIDTooLowError as e:
            # A closed (and maybe forgotten) stream: after RST_STREAM a stream error, after END_STREAM a
            # connection error (STREAM_CLOSED), closed implicitly a connection error (PROTOCOL_ERROR).
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events


class MeshH2Stream(H2Stream):
    """h2's stream, whose received header blocks are normalized and validated in one pass.

    With the codecs' configuration (inbound normalization and validation on, no header
    decoding) :meth:`_process_received_headers` is :func:`received_headers`; otherwise h2's own.
    A header block sent as a list of bytes pairs goes to HPACK as it is (:meth:`send_headers`).
    """

    def send_headers(self, headers, encoder, end_stream=False):
        """h2's ``H2Stream.send_headers``, statement for statement, for a block h2 would send unchanged
        (:func:`_sendable_as_is`), minus its copy into bytes (``utf8_encode_headers``), the validation
        flags that only outbound normalization and validation use (both off) and its debug line."""
        if not _sendable_as_is(headers, self.config):
            return super().send_headers(headers, encoder, end_stream)
        input_ = StreamInputs.SEND_HEADERS
        if (not self.state_machine.client) and is_informational_response(headers):
            if end_stream:
                msg = "Cannot set END_STREAM on informational responses."
                raise ProtocolError(msg)
            input_ = StreamInputs.SEND_INFORMATIONAL_HEADERS
        self.state_machine.process_input(input_)
        hf = HeadersFrame(self.stream_id)
        frames = self._build_headers_frames(headers, encoder, hf, None)
        if end_stream:
            self.state_machine.process_input(StreamInputs.SEND_END_STREAM)
            frames[0].flags.add("END_STREAM")
        if self.state_machine.trailers_sent and not end_stream:
            msg = "Trailers must have END_STREAM set."
            raise ProtocolError(msg)
        if self.state_machine.client and self._authority is None:
            self._authority = authority_from_headers(headers)
        self.request_method = extract_method_header(headers)
        return frames

    def _process_received_headers(self, headers, header_validation_flags, header_encoding):
        config = self.config
        if config.validate_inbound_headers and config.normalize_inbound_headers and not header_encoding:
            return received_headers(headers, header_validation_flags)
        return super()._process_received_headers(headers, header_validation_flags, header_encoding)


def _sendable_as_is(headers, config) -> bool:
    """Whether h2's ``send_headers`` would hand ``headers`` to HPACK unchanged: a list of ``(name, value)``
    pairs (tuples or :class:`hpack.HeaderTuple`) of bytes, outbound normalization and validation off
    (the codecs' configuration), and h2's ``DummyLogger`` (its debug line prints nothing)."""
    if (headers.__class__ is not list or config.normalize_outbound_headers or config.validate_outbound_headers
            or type(config.logger) is not DummyLogger):
        return False
    for header in headers:
        if header[0].__class__ is not bytes or header[1].__class__ is not bytes or len(header) != 2:
            return False
    return True


#: Bytes that are not allowed in a field name: 0x00-0x20, upper case (0x41-0x5a), 0x7f-0xff.
_NAME_BAD = re.compile(rb"[^\x21-\x40\x5b-\x7e]")
#: Bytes that are not allowed in a field value: NUL, LF, CR (to name the first one in the error).
_VALUE_BAD = re.compile(rb"[\x00\n\r]")


#: Regular field names seen valid (the name rules of :func:`received_headers`), other than ``te``,
#: ``host`` (whose checks depend on the value or on the block) and ``cookie`` (joined before the
#: checks): later fields with one of these names skip the name rules.  At most
#: :data:`_PLAIN_NAMES_BOUND` names (a peer sending ever new names fills it once; later names are
#: checked every time).
_PLAIN_NAMES: set[bytes] = set()
_PLAIN_NAMES_BOUND = 512
_NOT_PLAIN = frozenset((b"te", b"host", b"cookie"))
#: The pseudo-header fields of a request other than CONNECT, and of a response: h2 accepts these sets.
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path"))
_RESPONSE_PSEUDO = frozenset((b":status",))
_SPACE_OR_TAB = (b" ", b"\t")


#: What the caller of :func:`received_headers` knows of a block (the HTTP/2 engine's C callbacks tell):
#: nothing; every value passes h2's value rules and none is a cookie; or every rule passes (BLOCK_CHECKED:
#: the C callbacks' conservative subset of the rules, for the usual request and response heads).
UNCHECKED, VALUES_CHECKED, BLOCK_CHECKED = 0, 1, 2


def received_headers(headers, flags, checked: int = UNCHECKED) -> list:
    """A received header block as h2's ``normalize_inbound_headers`` and ``validate_headers`` leave it.

    Cookie fields are joined into one never-indexed ``cookie``, last; then every rule of h2's
    seven validation stages is checked, in their order (h2 chains a generator per stage: about
    3.5 us per field): names (no upper case, no byte 0x00-0x20 or 0x7f-0xff, no colon after the
    first byte, not empty), values (no NUL, CR or LF, no surrounding space or tab), ``te`` only
    ``trailers``, no connection-specific fields, pseudo-header fields (known, once each, first, the
    right ones for a request, a response or trailers: h2's own check), and for a request
    ``:authority`` or ``host`` (matching, one ``host``) and a non-empty ``:path``.  Raises h2's
    ``ProtocolError`` with h2's messages, for the first field that breaks a rule.

    The usual block (no cookie, every value clean) takes a fast way: the values are checked at
    once, joined, by a few scans in C; the loop over the fields checks only the names; and a regular
    name seen valid before (:data:`_PLAIN_NAMES`) skips the name rules, which it would pass again,
    as does a pseudo-header field h2 knows (``:method``, ``:path``, ...), which passes them by its
    spelling.  Any other block is checked field by field (:func:`_checked` with ``fast`` false), so
    errors come in h2's order.  A list without cookies is returned as it is.

    ``checked``: :data:`VALUES_CHECKED`, the caller has checked every value by these rules and found
    no cookie (the HTTP/2 engine's C callbacks do, as the fields arrive), so the values are not
    scanned again; :data:`BLOCK_CHECKED`, the caller has checked every rule (the C callbacks do for
    a block whose names are all lower-case token characters, none ``te``, ``host``, ``cookie`` or
    connection-specific, and whose pseudo-header fields come first, once each, and are exactly those
    of a request other than CONNECT with a non-empty ``:path``, or a response's ``:status``), so the
    block is returned as it is.
    """
    if checked == BLOCK_CHECKED:
        return headers
    if headers.__class__ is not list:  # an iterable, read twice below
        headers = list(headers)
    if checked == VALUES_CHECKED or _values_pass(headers):
        passed = _checked(headers, flags, True)
        if passed is not None:
            return passed
    out = []
    cookies = None
    for header in headers:
        if header[0] == b"cookie":
            if cookies is None:
                cookies = []
            cookies.append(header[1])
        else:
            out.append(header)
    if cookies is not None:
        out.append(NeverIndexedHeaderTuple(b"cookie", b"; ".join(cookies)))
    return _checked(out, flags, False)


def _values_pass(headers) -> bool:
    """Whether every value of ``headers`` passes h2's value rules, checked at once on the values joined."""
    values = b"\x01".join([header[1] for header in headers])  # 0x01: neither space, tab, NUL, CR nor LF
    return not (0 in values or 10 in values or 13 in values or values.find(b"\x01 ") != -1
                or values.find(b" \x01") != -1 or values.find(b"\x01\t") != -1 or values.find(b"\t\x01") != -1
                or values[:1] in _SPACE_OR_TAB or values[-1:] in _SPACE_OR_TAB)


def _checked(headers, flags, fast: bool):
    """``headers``, checked by the rules of :func:`received_headers` in h2's order.

    ``fast``: the values are known to pass their rules (not checked again) and the cookies are not
    joined yet: at the first ``cookie`` field, None is returned (the caller joins them and checks the
    block again, field by field).
    """
    request = not (flags.is_response_header or flags.is_trailer)
    pseudo = set()
    regular = False
    method = authority = host = None
    plain_names = _PLAIN_NAMES
    for header in headers:
        name = header[0]
        if name in plain_names:
            if not fast:
                _check_value(header[1])
            regular = True  # its name passed every rule below before, and none of them looks at its value
            continue
        value = header[1]
        if name not in _ALLOWED_PSEUDO_HEADER_FIELDS:
            if _NAME_BAD.search(name) is not None:
                _reject_name(name)
            if name.find(b":", 1) != -1:
                raise ProtocolError(f"Illegal character ':' in header name: {name!r}")
            if not fast:
                _check_value(value)
            elif name == b"cookie":
                return None
        else:  # passes the name rules, and is no te or connection field
            if not fast:
                _check_value(value)
            if name in pseudo:
                raise ProtocolError(f"Received duplicate pseudo-header field {name!r}")
            pseudo.add(name)
            if regular:
                raise ProtocolError(f"Received pseudo-header field out of sequence: {name!r}")
            if name == b":method":
                method = value
            elif request:
                if name == b":authority":
                    authority = value
                elif name == b":path" and not value:
                    raise ProtocolError("An empty :path header is forbidden")
            continue
        if not name:
            raise ProtocolError("Received header name with zero length.")
        if name == b"te" and value.lower() != b"trailers":
            raise ProtocolError(f"Invalid value for TE header: {value!r}")
        if name in CONNECTION_HEADERS:
            raise ProtocolError(f"Connection-specific header field present: {name!r}.")
        if name[0] == 58:  # b":": not one h2 knows
            if name in pseudo:
                raise ProtocolError(f"Received duplicate pseudo-header field {name!r}")
            pseudo.add(name)
            if regular:
                raise ProtocolError(f"Received pseudo-header field out of sequence: {name!r}")
            raise ProtocolError(f"Received custom pseudo-header field {name!r}")
        regular = True
        if name == b"host":
            if request:
                if host is not None:
                    raise ProtocolError("Request header block has multiple Host headers.")
                host = value
        elif name not in _NOT_PLAIN and len(plain_names) < _PLAIN_NAMES_BOUND:
            plain_names.add(name)
    # h2's check of the set of pseudo-header fields, skipped for the two sets it always accepts
    if request:
        if method == b"CONNECT" or pseudo != _REQUEST_PSEUDO:
            _check_pseudo_header_field_acceptability(pseudo, method, flags)
    elif flags.is_trailer or pseudo != _RESPONSE_PSEUDO:
        _check_pseudo_header_field_acceptability(pseudo, method, flags)
    if request:
        if authority is None and host is None:
            raise ProtocolError("Request header block does not have an :authority or Host header.")
        if authority is not None and host is not None and authority != host:
            raise ProtocolError("Request header block has mismatched :authority and "
                                f"Host headers: {authority!r} / {host!r}")
    return headers


def _check_value(value: bytes) -> None:
    """h2's rules for a field value: no NUL, CR or LF, and no space or tab at either end."""
    if value:
        if 0 in value or 10 in value or 13 in value:  # NUL, LF, CR (ints: ``b"\n" in`` first tries an int)
            bad = _VALUE_BAD.search(value)
            raise ProtocolError(f"Illegal character '{chr(value[bad.start()])}' in header value: {value!r}")
        if value[0] == 0x20 or value[0] == 0x09 or value[-1] == 0x20 or value[-1] == 0x09:
            raise ProtocolError(f"Received header value surrounded by whitespace {value!r}")


def _reject_name(name: bytes) -> None:
    """Raise h2's error for the first byte of ``name`` that a field name cannot have."""
    for c in name:
        if 0x41 <= c <= 0x5a:
            raise ProtocolError(f"Received uppercase header name {name!r}.")
        if c <= 0x20 or c >= 0x7f:
            raise ProtocolError(f"Illegal character '{chr(c)}' in header name: {name!r}")
