"""Fuzz target of the config stream's frame decoder (mesh/protocol.py), as hypothesis properties.

- valid frames of every message type, concatenated and cut into arbitrary chunks, decode to exactly the
  messages sent, and the decoder never holds more than one unfinished frame;
- arbitrary bytes, and valid frames mutated (bytes flipped, inserted, deleted, duplicated, length prefixes
  rewritten), fed in arbitrary chunks to a real stream, never raise: a bad frame is refused (ERROR frame,
  stream closed, buffer released), whatever the input;
- the nesting check agrees with the real depth of any JSON value, deep ones included.

CI runs a bounded number of examples (well under 15 s in all). A longer run::

    MESH_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/unit/test_protocol_fuzz.py -q
"""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mesh import protocol as proto

EXAMPLES = int(os.environ.get("MESH_FUZZ_EXAMPLES", "150"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize="MESH_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CONTROL_RECEIVES = (proto.HELLO, proto.ACK, proto.NACK, proto.PING, proto.PONG, proto.DRAIN, proto.ERROR)
CONTROL_MAX = max(proto.FRAME_LIMITS[kind] for kind in CONTROL_RECEIVES)

text = st.text(max_size=40)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | text,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                           max_leaves=20)
_FIELD_VALUES = {str: text, dict: st.dictionaries(text, text, max_size=5), list: st.lists(json_values, max_size=5)}


@st.composite
def messages(draw):
    """A valid message of any type: its required fields, plus a few extra ones if it stays within its limit."""
    kind = draw(st.sampled_from(proto.TYPES))
    fields = {name: draw(_FIELD_VALUES[kind_of]) for name, kind_of in proto.FIELDS[kind].items()}
    extra = draw(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in ("type", "v")),
                                 json_values, max_size=2))
    message = proto.message(kind, **{**extra, **fields})
    if len(json.dumps(message, separators=(",", ":")).encode()) > proto.FRAME_LIMITS[kind]:
        return proto.message(kind, **fields)  # the extras made it too large to be valid
    return message


def chunked(data: bytes, cuts) -> list:
    """``data`` cut at the (sorted, deduplicated) positions ``cuts``."""
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[start:end] for start, end in zip([0, *points], [*points, len(data)])]


class Recorder(proto.MessageStream):
    """A stream receiving what the control plane receives, recording every message."""

    receives = CONTROL_RECEIVES

    def __init__(self, budget=None):
        super().__init__(Clock(), budget)
        self.got = []

    def record(self, msg):
        self.got.append(msg)

    msg_HELLO = msg_ACK = msg_NACK = msg_DRAIN = record


@fuzz
@given(st.lists(messages(), min_size=1, max_size=6), st.lists(st.integers(min_value=0), max_size=12))
def test_valid_frames_round_trip_in_any_chunking(sent, cuts):
    decoder = proto.FrameDecoder(proto.MAX_FRAME)
    received = []
    for chunk in chunked(b"".join(proto.encode(message) for message in sent), cuts):
        received += [proto.decode(body) for body in decoder.feed(chunk)]
        assert decoder.pending <= 3 + decoder.max_frame
    assert received == [json.loads(json.dumps(message)) for message in sent]
    assert decoder.pending == 0


def feed(stream: Recorder, chunks) -> None:
    """Feed ``chunks`` to a connected stream: it must never raise, nor hold more than one unfinished frame."""
    transport = StringTransport()
    stream.makeConnection(transport)
    for chunk in chunks:
        stream.dataReceived(chunk)
        assert stream.decoder.pending <= 3 + CONTROL_MAX
    if stream.closed_reason is None:
        return
    # closed: nothing kept, and unless the peer itself sent ERROR, the peer was told why
    assert transport.disconnecting and stream.decoder.pending == 0 and stream.budget.total == 0
    if not stream.closed_reason.startswith("peer refused the stream"):
        written = proto.FrameDecoder(proto.MAX_FRAME).feed(transport.value())
        assert proto.decode(written[-1])["type"] == proto.ERROR


@fuzz
@given(st.binary(max_size=2048), st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes_are_refused_or_decoded_never_raised(data, cuts):
    feed(Recorder(proto.PendingBudget(proto.MAX_PENDING_TOTAL)), chunked(data, cuts))


_MUTATIONS = st.sampled_from(["flip", "insert", "delete", "duplicate", "length", "brackets"])


def mutate(data: bytearray, how: str, position: int, value: bytes) -> bytes:
    """One mutation of ``data`` at ``position`` (modulo its length)."""
    at = position % (len(data) + 1)
    if how == "flip" and data:
        data[at % len(data)] ^= value[0] if value else 0xFF
    elif how == "insert":
        data[at:at] = value
    elif how == "delete":
        del data[at:at + len(value) + 1]
    elif how == "duplicate":
        data[at:at] = data[at:at + 64]
    elif how == "length":  # a frame length prefix rewritten: anything from 0 to 2**32 - 1
        data[at:at + 4] = (int.from_bytes(value[:4].ljust(4, b"\0"), "big")).to_bytes(4, "big")
    elif how == "brackets":  # deep nesting spliced in
        data[at:at] = b"[" * (len(value) * 8) + b"]" * (len(value) * 4)
    return bytes(data)


@fuzz
@given(st.lists(messages(), min_size=1, max_size=4),
       st.lists(st.tuples(_MUTATIONS, st.integers(min_value=0), st.binary(max_size=16)), min_size=1, max_size=4),
       st.lists(st.integers(min_value=0), max_size=8))
def test_mutated_frames_are_refused_or_decoded_never_raised(sent, mutations, cuts):
    data = b"".join(proto.encode(message) for message in sent)
    for how, position, value in mutations:
        data = mutate(bytearray(data), how, position, value)
    feed(Recorder(proto.PendingBudget(proto.MAX_PENDING_TOTAL)), chunked(data, cuts))


def depth_of(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


@st.composite
def deep_values(draw):
    """A JSON value nested up to 130 deep: wrappers (lists, objects, with a sibling or not) around a value."""
    value = draw(json_values)
    levels = draw(st.integers(min_value=0, max_value=130))
    wrappers = draw(st.lists(st.sampled_from(["list", "list+sibling", "object", "object+sibling"]),
                             min_size=levels, max_size=levels))
    sibling = draw(st.sampled_from([1, "[{", [], {}, [[1]], {"a": {"b": []}}]))
    for wrapper in wrappers:
        if wrapper.startswith("list"):
            value = [sibling, value] if wrapper.endswith("sibling") else [value]
        else:
            value = {"s": sibling, "v": value} if wrapper.endswith("sibling") else {"v": value}
    return value


@fuzz
@given(deep_values())
def test_the_nesting_check_agrees_with_the_real_depth(value):
    body = json.dumps(value).encode()
    assert proto.nesting_exceeds(body) == (depth_of(value) > proto.MAX_DEPTH)
