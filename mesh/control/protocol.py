"""The config stream between mesh-control and mesh-proxy: framing, messages, heartbeat.

docs/protocol.md is the reference.  In short: after the TLS handshake on
:15012 the proxy writes the 4-byte magic ``TXM1``; from then on both sides
exchange frames, each a 4-byte big-endian length followed by that many bytes
of UTF-8 JSON, an object ``{"type": ..., "v": 1, ...}``.  Frames larger than
:data:`MAX_FRAME` close the stream.

:class:`MessageStream` is the shared base of both ends: it decodes frames,
checks the envelope, dispatches ``msg_<TYPE>`` methods, answers PING with PONG
and drops a peer that stays silent for :data:`MISSED_PINGS` heartbeats.
"""

from __future__ import annotations

import json

from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

log = Logger()

MAGIC = b"TXM1"
VERSION = 1
MAX_FRAME = 16 * 1024 * 1024
HEARTBEAT = 10.0
MISSED_PINGS = 3

HELLO = "HELLO"
SNAPSHOT = "SNAPSHOT"
ACK = "ACK"
NACK = "NACK"
PING = "PING"
PONG = "PONG"
DRAIN = "DRAIN"
TYPES = (HELLO, SNAPSHOT, ACK, NACK, PING, PONG, DRAIN)

#: required fields (and their JSON types) of every message type, besides type and v
FIELDS = {
    HELLO: {"node": str, "workload": str, "namespace": str, "labels": dict},
    SNAPSHOT: {"version": str, "resources": list, "trust_bundle": str},
    ACK: {"version": str},
    NACK: {"version": str, "reason": str},
    PING: {},
    PONG: {},
    DRAIN: {},
}


class ProtocolError(Exception):
    """The peer broke the protocol; the stream is closed with this reason."""


def encode(message: dict) -> bytes:
    """One frame: length prefix and compact JSON (values JSON cannot hold become strings)."""
    body = json.dumps(message, separators=(",", ":"), sort_keys=True, default=str).encode("utf-8")
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"{message.get('type')} message of {len(body)} bytes exceeds the {MAX_FRAME} byte limit")
    return len(body).to_bytes(4, "big") + body


def message(kind: str, **fields) -> dict:
    return {"type": kind, "v": VERSION, **fields}


def decode(body: bytes, allowed=TYPES) -> dict:
    """Parse and check one frame body; raises :class:`ProtocolError`."""
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
    for name, kind_of in FIELDS[kind].items():
        if not isinstance(value.get(name), kind_of):
            raise ProtocolError(f"{kind}: field {name!r} is missing or not a {kind_of.__name__}")
    return value


class MessageStream(Int32StringReceiver):
    """Framed JSON messages with a heartbeat.  Subclasses define ``receives`` and ``msg_<TYPE>``."""

    MAX_LENGTH = MAX_FRAME
    receives = TYPES
    heartbeat = HEARTBEAT
    peer_name = "peer"

    def __init__(self, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
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

    def _tick(self):
        self._ticker = None
        silent = self.reactor.seconds() - self.last_seen
        if silent > self.heartbeat * MISSED_PINGS:
            self.close(f"{self.peer_name} silent for {silent:.0f}s ({MISSED_PINGS} heartbeats missed)")
            return
        self.send(PING)
        self._ticker = self.reactor.callLater(self.heartbeat, self._tick)

    def close(self, reason: str) -> None:
        """Close the stream, logging why (once)."""
        if self.closed_reason is None:
            self.closed_reason = reason
            log.warn("config stream with {peer} closed: {reason}", peer=self.describe_peer(), reason=reason)
        if self.transport is not None:
            self.transport.loseConnection()

    def describe_peer(self) -> str:
        return self.peer_name

    # -- frames ----------------------------------------------------------------------------
    def send(self, kind: str, **fields) -> None:
        if self.transport is not None and self.closed_reason is None:
            self.transport.write(encode(message(kind, **fields)))

    def lengthLimitExceeded(self, length):
        self.close(f"frame of {length} bytes exceeds the {MAX_FRAME} byte limit")

    def stringReceived(self, body):
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
            self.close(str(error))
