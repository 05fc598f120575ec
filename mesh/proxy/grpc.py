"""gRPC on the request path: what the exchange does differently for a gRPC request.

A request is gRPC when its ``content-type`` is ``application/grpc``, alone or
followed by ``+`` or ``;`` (``application/grpc+proto``), as Envoy's
``Grpc::Common::hasGrpcContentType`` decides; gRPC-Web
(``application/grpc-web``) is not.  Such a request gets a :class:`GrpcCall`
(``RequestContext.grpc``); every other request pays one dictionary lookup for
it (:func:`call_for` runs only when the content type starts with
``application/grpc``).

What changes for a gRPC request (docs/protocols.md, "gRPC"):

- **Deadline** (:meth:`GrpcCall.deadline`): the ``grpc-timeout`` header is the
  request's deadline, bounded by the route's ``timeout``: the smaller wins, as
  Istio configures Envoy (``max_grpc_timeout`` set to the route's timeout).
  Each try sends the time *remaining* upstream, in ``grpc-timeout``, bounded by
  the per-try timeout (:meth:`GrpcCall.forwarded_headers`).
- **Outlier detection** counts the gRPC status of a Trailers-Only response as
  the HTTP status it stands for (:func:`outlier_status`), as Envoy's router
  reports it: an endpoint that keeps answering UNAVAILABLE is ejected.
- **Retries** on the gRPC status of a Trailers-Only response (``grpc-status``
  in the response headers, :meth:`GrpcCall.head_status`): the ``retryOn``
  conditions ``cancelled``, ``deadline-exceeded``, ``internal``,
  ``resource-exhausted`` and ``unavailable``.
- **Local replies** are gRPC: HTTP 200 with ``grpc-status`` and
  ``grpc-message`` in one HEADERS frame (Trailers-Only), the status mapped from
  the HTTP status as Envoy maps it (:func:`local_reply_headers`).
- **Telemetry**: the final status (:meth:`GrpcCall.complete`) and the number of
  length-prefixed messages each way (:class:`MessageCounter`).
"""

from __future__ import annotations

#: gRPC status codes used here (https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
UNKNOWN, DEADLINE_EXCEEDED, PERMISSION_DENIED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, UNAUTHENTICATED = \
    2, 4, 7, 12, 13, 14, 16

#: Envoy's ``Grpc::Utility::httpToGrpcStatus`` (gRPC's own HTTP to gRPC status mapping); any other
#: HTTP status is UNKNOWN.
_FROM_HTTP = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED,
              429: UNAVAILABLE, 502: UNAVAILABLE, 503: UNAVAILABLE, 504: UNAVAILABLE}

#: Envoy's ``Grpc::Utility::grpcToHttpStatus``: the HTTP status each gRPC status stands for (OK 200,
#: CANCELLED 499, UNKNOWN 500, ... UNAUTHENTICATED 401), by status code; any other status is 500.
_TO_HTTP = (200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401)

#: Seconds per unit of a ``grpc-timeout`` value (gRPC over HTTP/2: ``TimeoutUnit``).
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
#: A ``grpc-timeout`` value has at most 8 digits.
_MAX_DIGITS = 8
_MAX_VALUE = 10 ** _MAX_DIGITS - 1
#: Bytes of a message's prefix: a compressed flag, then a 4-byte big-endian length.
_PREFIX = 5
#: Characters of a ``grpc-message`` sent as they are (gRPC's percent-encoding keeps printable ASCII but %).
_PLAIN = frozenset(range(0x20, 0x7F)) - {ord("%")}


def call_for(content_type: str) -> GrpcCall | None:
    """A :class:`GrpcCall` when ``content_type`` (which starts with ``application/grpc``) is gRPC's."""
    rest = content_type[16:]
    if not rest or rest[0] in "+;":
        return GrpcCall()
    return None


def parse_timeout(value: str) -> float | None:
    """Seconds of a ``grpc-timeout`` value (1 to 8 ASCII digits and a unit: ``H M S m u n``).

    None when it is malformed: Envoy then ignores the header, and so does the sidecar.
    """
    digits = value[:-1]
    scale = _UNITS.get(value[-1:])
    if scale is None or not 1 <= len(digits) <= _MAX_DIGITS or not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits) * scale


def format_timeout(seconds: float) -> bytes:
    """A ``grpc-timeout`` value for ``seconds``: milliseconds, as Envoy writes it, at least 1 ms;
    seconds, minutes or hours when milliseconds would need more than 8 digits."""
    value = max(1, int(seconds * 1000))
    unit = b"m"
    for larger, factor in ((b"S", 1000), (b"M", 60), (b"H", 60)):
        if value <= _MAX_VALUE:
            break
        value, unit = value // factor, larger
    return b"%d%s" % (min(value, _MAX_VALUE), unit)


def local_reply_headers(http_status: int, timeout: bool, message: str, grpc_status: int | None = None) -> tuple:
    """The headers of a local reply to a gRPC request, in place of the ``http_status`` reply.

    The reply is HTTP 200 with ``content-type: application/grpc``, ``grpc-status`` and
    ``grpc-message`` (percent-encoded), and no body: a Trailers-Only response.  The status is
    Envoy's mapping of the HTTP status (:data:`_FROM_HTTP`), except that a timeout is
    DEADLINE_EXCEEDED, as Envoy's router answers since envoyproxy/envoy#44479; ``grpc_status``, if
    given, is the status instead (a fault's ``abort.grpcStatus``).
    """
    if grpc_status is None:
        grpc_status = local_status(http_status, timeout)
    return ((b"content-type", b"application/grpc"),
            (b"grpc-status", b"%d" % grpc_status),
            (b"grpc-message", encode_message(message)))


def local_status(http_status: int, timeout: bool) -> int:
    """The gRPC status of a local reply that HTTP would answer with ``http_status``."""
    return DEADLINE_EXCEEDED if timeout else _FROM_HTTP.get(http_status, UNKNOWN)


def outlier_status(grpc_status: int) -> int:
    """The HTTP status outlier detection counts for a response head carrying ``grpc_status``.

    Envoy's router reports a Trailers-Only response to outlier detection as
    ``grpcToHttpStatus`` of its ``grpc-status`` (UNAVAILABLE as 503, INTERNAL as
    500, DEADLINE_EXCEEDED as 504, ...); a status in the trailers is not reported.
    """
    return _TO_HTTP[grpc_status] if grpc_status < len(_TO_HTTP) else 500


def encode_message(message: str) -> bytes:
    """``message`` as a ``grpc-message`` value: UTF-8, percent-encoded outside printable ASCII (and ``%``)."""
    data = message.encode("utf-8", "replace")
    return b"".join(bytes((byte,)) if byte in _PLAIN else b"%%%02X" % byte for byte in data)


def status_of(headers) -> int | None:
    """The ``grpc-status`` among ``headers`` (``(name, value)`` byte pairs, names lower-case), or None."""
    for name, value in headers:
        if name == b"grpc-status":
            return int(value) if value.isdigit() else UNKNOWN
    return None


class MessageCounter:
    """Counts the length-prefixed messages of one direction of a gRPC stream, as the body goes by.

    Nothing is buffered: :meth:`feed` reads only the 5-byte prefix of each
    message (keeping at most 4 bytes of one split between two chunks) and skips
    its payload, so its work is one step per message, not per byte.
    """

    __slots__ = ("count", "_skip", "_partial")

    def __init__(self):
        self.count = 0
        self._skip = 0  # bytes of the current message's payload still to come
        self._partial = b""  # the start of a prefix cut by the end of a chunk

    def feed(self, data: bytes) -> None:
        """The next bytes of the stream."""
        size = len(data)
        position = self._skip
        if self._partial:  # position is 0: finish the prefix first
            taken = _PREFIX - len(self._partial)
            prefix = self._partial + data[:taken]
            if len(prefix) < _PREFIX:
                self._partial = prefix
                return
            self._partial = b""
            self.count += 1
            position = taken + int.from_bytes(prefix[1:], "big")
        while position + _PREFIX <= size:
            self.count += 1
            position += _PREFIX + int.from_bytes(data[position + 1:position + _PREFIX], "big")
        if position < size:
            self._partial = data[position:]
            self._skip = 0
        else:
            self._skip = position - size


class GrpcCall:
    """The gRPC side of one request (``RequestContext.grpc``; None for a request that is not gRPC).

    ``status`` is the gRPC status once known: from a Trailers-Only response
    head, the response trailers, a local reply, or (:meth:`complete`) inferred
    from the HTTP status as Envoy infers it; None when the request ended
    without any response.  ``requests`` and ``responses`` are the
    :class:`MessageCounter` of each direction.  ``due`` is the absolute time of
    the request's deadline (None: no deadline), ``client_timeout`` the
    ``grpc-timeout`` the client sent when it is what set the deadline.
    """

    __slots__ = ("status", "requests", "responses", "due", "client_timeout", "_extra")

    def __init__(self):
        self.status = None
        self.requests = MessageCounter()
        self.responses = MessageCounter()
        self.due = None
        self.client_timeout = None
        self._extra = ()

    @property
    def request_messages(self) -> int:
        """Messages the client sent (Istio's ``istio_request_messages_total``)."""
        return self.requests.count

    @property
    def response_messages(self) -> int:
        """Messages the server sent (Istio's ``istio_response_messages_total``)."""
        return self.responses.count

    def deadline(self, ctx, route_timeout, now: float, extra: tuple):
        """Seconds until the request's deadline (None: none).

        The client's ``grpc-timeout`` and the route's timeout: the smaller wins.  A
        ``grpc-timeout`` that is malformed or 0 is ignored, as Envoy ignores it.  With a
        deadline, the client's ``grpc-timeout`` is not forwarded as it came: each try adds
        what remains to ``extra``, the exchange's added headers (:meth:`forwarded_headers`).
        """
        header = ctx.headers.get("grpc-timeout")
        seconds = parse_timeout(header) if header is not None else None
        if seconds and (not route_timeout or seconds < route_timeout):
            self.client_timeout = header
            timeout = seconds
        else:
            timeout = route_timeout
        if not timeout:
            return None
        self.due = now + timeout
        self._extra = extra
        if header is not None:
            ctx.raw_headers = [pair for pair in ctx.raw_headers if pair[0].lower() != b"grpc-timeout"]
        return timeout

    def forwarded_headers(self, now: float, per_try_timeout) -> tuple:
        """The exchange's added headers with the ``grpc-timeout`` of a try starting ``now``: the time
        left until the deadline, or the per-try timeout if that is shorter."""
        left = self.due - now
        if per_try_timeout and per_try_timeout < left:
            left = per_try_timeout
        return (*self._extra, (b"grpc-timeout", format_timeout(left)))

    def deadline_message(self) -> str:
        """What a client whose own deadline passed is told."""
        return (f"deadline exceeded: the client's grpc-timeout ({self.client_timeout}) passed before the "
                "upstream answered; raise the client's deadline if this is expected")

    def head_status(self, headers) -> int | None:
        """The status of a Trailers-Only response (``grpc-status`` among the response ``headers``), kept as
        :attr:`status`; None when the head carries none (the status comes in the trailers)."""
        status = status_of(headers)
        if status is not None:
            self.status = status
        return status

    def trailers(self, headers) -> None:
        """The response's trailers: their ``grpc-status`` is the call's."""
        status = status_of(headers)
        if status is not None:
            self.status = status

    def complete(self, http_status: int) -> None:
        """The request is over: a call whose response carried no ``grpc-status`` gets the status its HTTP
        status maps to (none when there was no response), as Envoy's ``Grpc::Common::getGrpcStatus``."""
        if self.status is None and http_status:
            self.status = _FROM_HTTP.get(http_status, UNKNOWN)
