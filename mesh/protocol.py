"""The config stream between mesh-control and mesh-proxy: framing, messages, limits, heartbeat.

docs/protocol.md is the reference.  In short: after the TLS handshake on
:15012 the proxy writes the 4-byte magic ``TXM1``; from then on both sides
exchange frames, each a 4-byte big-endian length followed by that many bytes
of UTF-8 JSON, an object ``{"type": ..., "v": 1, ...}``.

Every message type has a size limit (:data:`FRAME_LIMITS`); a side buffers at
most one unfinished frame of the largest type it receives (:class:`FrameDecoder`),
and the control plane also bounds the unparsed bytes of all its streams
together (:class:`PendingBudget`).  JSON nested deeper than :data:`MAX_DEPTH`
is refused before it is parsed.  A side that refuses a frame tells the peer
why (an ERROR frame), logs it once and closes the stream.

:class:`MessageStream` is the shared base of both ends: it decodes frames,
checks the envelope, dispatches ``msg_<TYPE>`` methods, answers PING with PONG
and drops a peer that stays silent for :data:`MISSED_PINGS` heartbeats.
"""

from __future__ import annotations

import json
import re

from twisted.internet import protocol
from twisted.logger import Logger

log = Logger()

MAGIC = b"TXM1"
VERSION = 1
HEARTBEAT = 10.0
MISSED_PINGS = 3
KIB = 1024
MIB = 1024 * KIB

HELLO = "HELLO"
SNAPSHOT = "SNAPSHOT"
ACK = "ACK"
NACK = "NACK"
PING = "PING"
PONG = "PONG"
DRAIN = "DRAIN"
ERROR = "ERROR"
TYPES = (HELLO, SNAPSHOT, ACK, NACK, PING, PONG, DRAIN, ERROR)

#: required fields (and their JSON types) of every message type, besides type and v
FIELDS = {
    HELLO: {"node": str, "workload": str, "namespace": str, "labels": dict},
    SNAPSHOT: {"version": str, "resources": list, "trust_bundle": str},
    ACK: {"version": str},
    NACK: {"version": str, "reason": str},
    PING: {},
    PONG: {},
    DRAIN: {},
    ERROR: {"reason": str},
}

#: the largest body (bytes) of each message type; a larger frame is refused.  Only SNAPSHOT, the whole
#: config of a proxy, is large; what the control plane receives is small, so it buffers little per stream.
FRAME_LIMITS = {
    HELLO: 64 * KIB,
    SNAPSHOT: 16 * MIB,
    ACK: 1 * KIB,
    NACK: 64 * KIB,
    PING: 1 * KIB,
    PONG: 1 * KIB,
    DRAIN: 1 * KIB,
    ERROR: 16 * KIB,
}
MAX_FRAME = max(FRAME_LIMITS.values())  #: the largest frame of any type (a SNAPSHOT)
#: JSON arrays and objects nested deeper than this are refused (a snapshot nests about 12 deep)
MAX_DEPTH = 64
#: a NACK or ERROR reason longer than this many UTF-8 bytes is sent and stored truncated
REASON_LIMIT = 1 * KIB
#: the control plane's ceiling on the unparsed bytes of all config streams together
MAX_PENDING_TOTAL = 16 * MIB


#: the version of a SNAPSHOT's optional ``credentials`` field (a gateway's Secrets); a proxy NACKs another
CREDENTIALS_VERSION = 1
#: the file names a credential may hold (a mounted ``kubernetes.io/tls`` Secret's)
CREDENTIAL_FILES = ("tls.crt", "tls.key", "ca.crt")
#: a credential's name: a Kubernetes Secret name (it becomes a directory name on the gateway)
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def credentials_field(secrets: dict) -> dict:
    """The SNAPSHOT ``credentials`` field of ``secrets`` (``{name: {file name: PEM}}``)."""
    return {"v": CREDENTIALS_VERSION, "secrets": secrets}


def credentials_of(snapshot: dict) -> dict:
    """The Secrets of a SNAPSHOT's ``credentials`` field, ``{name: {file name: PEM}}`` (none when absent).

    Raises :class:`ValueError` saying what is wrong when the field is malformed or of another version.
    """
    field = snapshot.get("credentials")
    if field is None:
        return {}
    if not isinstance(field, dict) or field.get("v") != CREDENTIALS_VERSION:
        raise ValueError(f"credentials field of version {field.get('v') if isinstance(field, dict) else None!r}; "
                         f"this proxy reads version {CREDENTIALS_VERSION}: run a proxy as new as the control plane")
    secrets = field.get("secrets")
    if not isinstance(secrets, dict):
        raise ValueError("credentials: secrets is not an object")
    for name, files in secrets.items():
        if not _SECRET_NAME.fullmatch(name) or ".." in name:
            raise ValueError(f"credentials: {name[:64]!r} is not a Secret name")
        if not isinstance(files, dict) or not all(key in CREDENTIAL_FILES and isinstance(text, str)
                                                  for key, text in files.items()):
            raise ValueError(f"credentials: {name} must map {', '.join(CREDENTIAL_FILES)} to PEM text")
    return secrets


class ProtocolError(Exception):
    """The peer broke the protocol; the stream is closed with this reason.

    ``details`` are extra fields of the structured log event (e.g. the node and identities).
    """

    def __init__(self, reason: str, **details):
        super().__init__(reason)
        self.details = details


def truncate(text: str, limit: int = REASON_LIMIT) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, and then marked as truncated."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return f"{data[:limit].decode('utf-8', 'ignore')}... [truncated: {len(data)} bytes in all]"


_BRACKETS = bytes.maketrans(b"{}", b"[]")  # for depth, objects and arrays count alike
_NOT_STRUCTURE = bytes(byte for byte in range(256) if byte not in b'[]{}"')
_QUOTED = re.compile(rb'"[^"]*"')


def nesting_exceeds(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text ``body`` nests arrays and objects deeper than ``limit`` (found without recursion).

    Fewer than ``limit`` brackets cannot nest deeper.  Otherwise, with escapes and strings removed and
    only brackets kept, innermost pairs are removed ``limit + 1`` times, each time one level: if that
    still removed something, the text is deeper.  Brackets left unmatched (invalid JSON) count as open
    levels, since a parser descends into them before it finds the error.  Every step is a C-speed
    bytes operation (a 10 MB snapshot takes about 0.1 s, a sixth of parsing it).
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(_BRACKETS, _NOT_STRUCTURE)
    text = text.replace(b'""', b"")  # most strings hold no bracket; removing a pair keeps every parity
    if b'"' in text:
        text = _QUOTED.sub(b"", text)
    for levels in range(limit + 1):
        shallower = text.replace(b"[]", b"")
        if len(shallower) == len(text):
            return shallower.count(b"[") + levels > limit
        text = shallower
    return True


def encode(message: dict) -> bytes:
    """One frame: length prefix and compact JSON (values JSON cannot hold become strings).

    Raises :class:`ProtocolError` if the body exceeds the limit of its type (the peer would refuse it).
    """
    body = json.dumps(message, separators=(",", ":"), sort_keys=True, default=str).encode("utf-8")
    limit = FRAME_LIMITS[message["type"]]
    if len(body) > limit:
        raise ProtocolError(f"{message['type']} message of {len(body)} bytes exceeds the {limit} byte limit")
    return len(body).to_bytes(4, "big") + body


def message(kind: str, **fields) -> dict:
    """A message of type ``kind`` (a member of :data:`TYPES`) with the protocol version and ``fields``."""
    return {"type": kind, "v": VERSION, **fields}


def decode(body: bytes, allowed=TYPES) -> dict:
    """Parse and check one frame body; raises :class:`ProtocolError`."""
    if nesting_exceeds(body):
        raise ProtocolError(f"frame is JSON nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ProtocolError(f"frame is not UTF-8 JSON: {error}") from None
    if not isinstance(value, dict):
        raise ProtocolError("frame is not a JSON object")
    kind = value.get("type")
    if value.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {value.get('v')!r} (this side speaks v{VERSION})")
    if kind not in allowed:
        raise ProtocolError(f"unexpected message type {kind!r} (expected one of: {', '.join(allowed)})")
    if len(body) > FRAME_LIMITS[kind]:
        raise ProtocolError(f"{kind} frame of {len(body)} bytes exceeds the {FRAME_LIMITS[kind]} byte limit "
                            f"of {kind}")
    for name, kind_of in FIELDS[kind].items():
        if not isinstance(value.get(name), kind_of):
            raise ProtocolError(f"{kind}: field {name!r} is missing or not a {kind_of.__name__}")
    return value


class FrameDecoder:
    """Splits a byte stream into frame bodies, buffering at most one unfinished frame.

    A length prefix above ``max_frame`` raises :class:`ProtocolError` before any of
    that frame's body is kept, so between calls :attr:`pending` is at most
    ``3 + max_frame``.
    """

    def __init__(self, max_frame: int):
        self.max_frame = max_frame
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received and not yet returned as a frame body."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list:
        """The bodies (bytes) of the frames that ``data`` completes, in order; raises :class:`ProtocolError`."""
        buffer = self._buffer
        buffer += data
        bodies, start = [], 0
        with memoryview(buffer) as view:
            while len(buffer) - start >= 4:
                size = int.from_bytes(view[start:start + 4], "big")
                if size > self.max_frame:
                    raise ProtocolError(f"frame of {size} bytes exceeds the {self.max_frame} byte limit of the "
                                        "largest message this side receives")
                end = start + 4 + size
                if len(buffer) < end:
                    break
                bodies.append(view[start + 4:end].tobytes())
                start = end
        del buffer[:start]
        return bodies

    def clear(self) -> None:
        """Drop what is buffered (the stream is closed)."""
        self._buffer = bytearray()


class PendingBudget:
    """The unparsed bytes of many streams together, against a ceiling (``limit``)."""

    def __init__(self, limit: int = MAX_PENDING_TOTAL):
        self.limit = limit
        self.total = 0

    def change(self, delta: int) -> bool:
        """Account ``delta`` more (or fewer) bytes; whether the total is still within the limit."""
        self.total += delta
        return self.total <= self.limit


class MessageStream(protocol.Protocol):
    """Framed JSON messages with a heartbeat.  Subclasses define ``receives`` and ``msg_<TYPE>``.

    :param budget: a :class:`PendingBudget` shared with other streams, or None.
    """

    receives = TYPES
    heartbeat = HEARTBEAT
    peer_name = "peer"

    def __init__(self, reactor=None, budget: PendingBudget | None = None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.budget = budget
        self.decoder = FrameDecoder(max(FRAME_LIMITS[kind] for kind in self.receives))
        self._accounted = 0  # bytes of this stream counted in the budget
        self.last_seen = None
        self._ticker = None
        self.closed_reason = None

    # -- connection ----------------------------------------------------------------------
    def connectionMade(self):
        self.last_seen = self.reactor.seconds()
        self._ticker = self.reactor.callLater(self.heartbeat, self._tick)

    def connectionLost(self, reason=protocol.connectionDone):
        if self._ticker is not None and self._ticker.active():
            self._ticker.cancel()
        self._ticker = None
        self._release()

    def _tick(self):
        self._ticker = None
        silent = self.reactor.seconds() - self.last_seen
        if silent > self.heartbeat * MISSED_PINGS:
            self.close(f"{self.peer_name} silent for {silent:.0f}s ({MISSED_PINGS} heartbeats missed)")
            return
        self.send(PING)
        self._ticker = self.reactor.callLater(self.heartbeat, self._tick)

    def close(self, reason: str, **details) -> None:
        """Close the stream, logging why (once); ``details`` are extra fields of the log event."""
        if self.closed_reason is None:
            self.closed_reason = reason
            log.warn("config stream with {peer} closed: {reason}", peer=self.describe_peer(), reason=reason,
                     **details)
        self._release()
        if self.transport is not None:
            self.transport.loseConnection()

    def refuse(self, reason: str, **details) -> None:
        """Tell the peer why (an ERROR frame), then :meth:`close`."""
        self.send(ERROR, reason=truncate(reason))
        self.close(reason, **details)

    def describe_peer(self) -> str:
        return self.peer_name

    def _release(self) -> None:
        self.decoder.clear()
        if self.budget is not None:
            self.budget.change(-self._accounted)
        self._accounted = 0

    # -- frames ----------------------------------------------------------------------------
    def send(self, kind: str, **fields) -> None:
        """Write one message (raises :class:`ProtocolError` if it is over its type's limit)."""
        if self.transport is not None and self.closed_reason is None:
            self.transport.write(encode(message(kind, **fields)))

    def dataReceived(self, data):
        if self.closed_reason is not None:
            return
        try:
            bodies = self.decoder.feed(data)
            self._account()
        except ProtocolError as error:
            self.refuse(str(error), **error.details)
            return
        for body in bodies:
            if self.closed_reason is not None:
                return
            self.stringReceived(body)

    def _account(self) -> None:
        if self.budget is None:
            return
        pending = self.decoder.pending
        within = self.budget.change(pending - self._accounted)
        self._accounted = pending
        if not within:
            raise ProtocolError(f"unfinished frames of all config streams exceed {self.budget.limit} bytes; "
                                f"closing this stream, which holds {pending} of them")

    def stringReceived(self, body):
        """One frame body: decode it and dispatch the message."""
        if self.closed_reason is not None:
            return
        self.last_seen = self.reactor.seconds()
        try:
            msg = decode(body, self.receives)
            if msg["type"] == PING:
                self.send(PONG)
            elif msg["type"] != PONG:
                getattr(self, "msg_" + msg["type"])(msg)
        except ProtocolError as error:
            self.refuse(str(error), **error.details)

    def msg_ERROR(self, msg):
        """The peer refused the stream and says why."""
        self.close(f"{self.peer_name} refused the stream: {truncate(msg['reason'])!r}")
