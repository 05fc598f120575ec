"""Trace context on the wire: parse and format W3C Trace Context and B3 headers.

Pure functions, no I/O, no state; :mod:`mesh.telemetry.tracing` calls them
once per request.  The formats (see docs/tracing.md):

- W3C ``traceparent: 00-<trace-id 32 hex>-<parent-id 16 hex>-<flags 2 hex>``,
  lower-case hex, ids not all zero, version ``ff`` invalid; a higher version
  is read by its first four fields.  ``tracestate`` is forwarded untouched
  (dropped when the ``traceparent`` beside it is invalid, as the spec says).
- B3 single ``b3: <trace-id 16|32 hex>-<span-id 16 hex>[-<1|0|d>[-<parent 16 hex>]]``,
  or only a sampling state ``b3: 0|1|d``.
- B3 multi ``x-b3-traceid``, ``x-b3-spanid``, ``x-b3-parentspanid``,
  ``x-b3-sampled`` (``1``/``0``, also ``true``/``false``), ``x-b3-flags``
  (``1`` = debug, which implies sampled).

When several are present, the first valid one wins in the order W3C, B3
single, B3 multi; every format that came in is written back out.
"""

from __future__ import annotations

import random
import re

#: Bits of :attr:`Incoming.formats` (and of the ``formats`` argument of :func:`inject`).
W3C = 1
B3_SINGLE = 2
B3_MULTI = 4

_HEX16 = re.compile(r"[0-9a-f]{16}")
_TRACE_ID = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_B3_SINGLE = re.compile(r"([0-9a-f]{16}|[0-9a-f]{32})-([0-9a-f]{16})(?:-([01d])(?:-([0-9a-f]{16}))?)?")
_ZERO16 = "0" * 16
_ZERO32 = "0" * 32
_B3_STATE = {"1": True, "0": False, "d": True}  # b3 single: sampling state
_B3_SAMPLED = {"1": True, "0": False, "true": True, "false": False}  # x-b3-sampled

_rng = random.Random()  # seeded from os.urandom; ids need to be unique, not secret
_bits = _rng.getrandbits


def new_trace_id() -> str:
    """A random 128-bit trace id: 32 lower-case hex digits, never all zeros."""
    value = _bits(128)
    while not value:
        value = _bits(128)
    return "%032x" % value


def new_span_id() -> str:
    """A random 64-bit span id: 16 lower-case hex digits, never all zeros."""
    value = _bits(64)
    while not value:
        value = _bits(64)
    return "%016x" % value


class Incoming:
    """The trace context a request arrived with.

    - ``trace_id``: 32 (or 16, from B3) hex digits, or None when no valid
      context came (a sampling decision alone may still have come)
    - ``parent_id``: the caller's span id (16 hex), or None
    - ``sampled``: True, False, or None when the caller made no decision
    - ``debug``: B3 debug (``d`` / ``x-b3-flags: 1``); implies sampled
    - ``formats``: :data:`W3C` | :data:`B3_SINGLE` | :data:`B3_MULTI`, the
      formats present (valid or not) and to be written back out
    - ``w3c_flags``: the received trace-flags byte (other bits are kept)
    - ``drop_tracestate``: a ``traceparent`` came but was invalid
    """

    __slots__ = ("trace_id", "parent_id", "sampled", "debug", "formats", "w3c_flags", "drop_tracestate")

    def __init__(self, trace_id=None, parent_id=None, sampled=None, debug=False, formats=0,
                 w3c_flags=0, drop_tracestate=False):
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.debug = debug
        self.formats = formats
        self.w3c_flags = w3c_flags
        self.drop_tracestate = drop_tracestate

    def __repr__(self):
        return (f"Incoming(trace_id={self.trace_id!r}, parent_id={self.parent_id!r}, sampled={self.sampled!r}, "
                f"debug={self.debug!r}, formats={self.formats!r}, w3c_flags={self.w3c_flags!r})")


def parse_traceparent(value: str):
    """``(trace_id, parent_id, flags)`` from a W3C ``traceparent`` value, or None if invalid."""
    value = value.strip()
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if version == "ff":
        return None
    if version == "00":
        if len(value) != 55:
            return None
    elif len(value) > 55 and value[55] != "-":
        return None  # a future version may append fields, always after a dash
    if trace_id == _ZERO32 or parent_id == _ZERO16:
        return None
    return trace_id, parent_id, int(flags, 16)


def parse_b3_single(value: str):
    """``(trace_id, span_id, sampled, debug, parent_id)`` from a ``b3`` header, or None if invalid.

    A sampling-only value (``0``, ``1``, ``d``) gives ``(None, None, sampled, debug, None)``.
    """
    value = value.strip().lower()
    if len(value) == 1:
        sampled = _B3_STATE.get(value)
        return None if sampled is None else (None, None, sampled, value == "d", None)
    match = _B3_SINGLE.fullmatch(value)
    if match is None:
        return None
    trace_id, span_id, state, parent_id = match.groups()
    if _is_zero(trace_id) or span_id == _ZERO16 or parent_id == _ZERO16:
        return None
    sampled = None if state is None else state != "0"
    return trace_id, span_id, sampled, state == "d", parent_id


def parse_b3_multi(headers: dict):
    """``(trace_id, span_id, sampled, debug)`` from the ``x-b3-*`` headers, or None if invalid.

    Without ids, a lone ``x-b3-sampled`` / ``x-b3-flags`` still gives a
    sampling decision: ``(None, None, sampled, debug)``.
    """
    debug = headers.get("x-b3-flags", "").strip() == "1"
    sampled_text = headers.get("x-b3-sampled")
    sampled = None
    if sampled_text is not None:
        sampled = _B3_SAMPLED.get(sampled_text.strip().lower())  # unknown value: no decision
    if debug:
        sampled = True
    trace_id = headers.get("x-b3-traceid")
    span_id = headers.get("x-b3-spanid")
    if trace_id is None and span_id is None:
        if sampled is None:
            return None
        return None, None, sampled, debug
    if trace_id is None or span_id is None:
        return None
    trace_id = trace_id.strip().lower()
    span_id = span_id.strip().lower()
    if (_TRACE_ID.fullmatch(trace_id) is None or _HEX16.fullmatch(span_id) is None
            or _is_zero(trace_id) or span_id == _ZERO16):
        return None
    return trace_id, span_id, sampled, debug


def _is_zero(hex_id: str) -> bool:
    return hex_id == _ZERO32 or hex_id == _ZERO16


def extract(headers: dict) -> Incoming | None:
    """The trace context of a request, from its lower-case ``headers`` dict; None if none came.

    Cheap when no trace header is present: four dict lookups.
    """
    traceparent = headers.get("traceparent")
    b3 = headers.get("b3")
    multi = "x-b3-traceid" in headers or "x-b3-sampled" in headers or "x-b3-flags" in headers
    if traceparent is None and b3 is None and not multi:
        return None
    incoming = Incoming()
    if traceparent is not None:
        incoming.formats = W3C
        parsed = parse_traceparent(traceparent)
        if parsed is None:
            incoming.drop_tracestate = True
        else:
            incoming.trace_id, incoming.parent_id, flags = parsed
            incoming.w3c_flags = flags
            incoming.sampled = bool(flags & 1)
    if b3 is not None:
        incoming.formats |= B3_SINGLE
        if incoming.trace_id is None:
            parsed = parse_b3_single(b3)
            if parsed is not None:
                incoming.trace_id, incoming.parent_id, incoming.sampled, incoming.debug, _ = parsed
    if multi:
        incoming.formats |= B3_MULTI
        if incoming.trace_id is None:
            parsed = parse_b3_multi(headers)
            if parsed is not None:
                incoming.trace_id, incoming.parent_id, sampled, incoming.debug = parsed
                if sampled is not None or incoming.sampled is None:
                    incoming.sampled = sampled
    if incoming.debug:
        incoming.sampled = True
    return incoming


def format_traceparent(trace_id: str, span_id: str, sampled: bool, flags: int = 0) -> str:
    """A version-00 ``traceparent``; a 64-bit trace id is left-padded to 128 bits."""
    if len(trace_id) == 16:
        trace_id = _ZERO16 + trace_id
    flags = (flags & 0xFE) | (1 if sampled else 0)
    return "00-%s-%s-%02x" % (trace_id, span_id, flags)


def format_b3_single(trace_id: str, span_id: str, sampled: bool, debug: bool = False,
                     parent_id: str | None = None) -> str:
    """A ``b3`` single-header value: ``trace-span-state[-parent]``."""
    state = "d" if debug else ("1" if sampled else "0")
    if parent_id:
        return "%s-%s-%s-%s" % (trace_id, span_id, state, parent_id)
    return "%s-%s-%s" % (trace_id, span_id, state)


_W3C_ONLY = W3C


def inject(trace_id: str, span_id: str, parent_id, sampled: bool, incoming: Incoming | None) -> list:
    """Header pairs (lower-case bytes names) that forward this hop's context downstream.

    ``span_id`` is this hop's span (the downstream's parent); ``parent_id``
    is its own parent.  Writes the formats that came in (W3C when none did);
    a value of None means "remove this header".
    """
    if incoming is None:
        return [(b"traceparent", format_traceparent(trace_id, span_id, sampled).encode())]
    formats = incoming.formats or _W3C_ONLY
    out = []
    if formats & W3C:
        out.append((b"traceparent",
                    format_traceparent(trace_id, span_id, sampled, incoming.w3c_flags).encode()))
        if incoming.drop_tracestate:
            out.append((b"tracestate", None))
    if formats & B3_SINGLE:
        out.append((b"b3", format_b3_single(trace_id, span_id, sampled, incoming.debug, parent_id).encode()))
    if formats & B3_MULTI:
        out.append((b"x-b3-traceid", trace_id.encode()))
        out.append((b"x-b3-spanid", span_id.encode()))
        out.append((b"x-b3-parentspanid", parent_id.encode() if parent_id else None))
        if not incoming.debug:
            out.append((b"x-b3-sampled", b"1" if sampled else b"0"))
    return out
