"""The HTTP/2 frame guard (mesh.proxy.codec.h2_server.FrameGuard): limits checked from frame headers alone."""

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, SettingsFrame

from mesh.proxy.codec.h2_server import MAX_OWED_ACKS, Abuse, FrameGuard
from mesh.proxy.detect import H2_PREFACE


def guard():
    return FrameGuard(max_frame_size=16384, max_header_block=40000)


def feed(target, data, step=None):
    """Feed ``data`` at once, or ``step`` bytes at a time (frame headers cut anywhere)."""
    step = step or len(data)
    for start in range(0, len(data), step):
        target.feed(data[start:start + step])


@pytest.mark.parametrize("step", [None, 1, 7])
def test_ordinary_traffic_passes_whatever_the_reads(step):
    g = guard()
    data = H2_PREFACE + SettingsFrame(0).serialize()
    data += HeadersFrame(1, data=b"x" * 100, flags=["END_HEADERS"]).serialize()
    data += DataFrame(1, data=b"y" * 16384, flags=["END_STREAM"]).serialize()
    data += HeadersFrame(3, data=b"x" * 16000).serialize() + ContinuationFrame(3, data=b"z" * 16000).serialize()
    feed(g, data, step)
    assert g.in_block and g.streams == 2
    feed(g, ContinuationFrame(3, data=b"z" * 10, flags=["END_HEADERS"]).serialize(), step)
    assert not g.in_block


def test_a_wrong_preface_is_a_protocol_error():
    with pytest.raises(Abuse) as caught:
        guard().feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert caught.value.code == ErrorCodes.PROTOCOL_ERROR


def test_an_overlong_frame_is_refused_from_its_header():
    g = guard()
    g.feed(H2_PREFACE)
    with pytest.raises(Abuse) as caught:
        g.feed(b"\x01\x00\x00\x00\x00\x00\x00\x00\x01")  # 65536 bytes announced, none sent yet
    assert caught.value.code == ErrorCodes.FRAME_SIZE_ERROR


def test_the_header_block_is_bounded_across_continuation_frames():
    g = guard()
    g.feed(H2_PREFACE + HeadersFrame(1, data=b"x" * 16000).serialize())
    g.feed(ContinuationFrame(1, data=b"x" * 16000).serialize())
    with pytest.raises(Abuse, match="header block over 40000"):
        g.feed(ContinuationFrame(1, data=b"x" * 16000).serialize())


def test_pings_and_settings_are_counted_per_second():
    g = guard()
    g.feed(H2_PREFACE + PingFrame(0, opaque_data=b"12345678").serialize() * (MAX_OWED_ACKS - 1))
    g.feed(SettingsFrame(0).serialize() + SettingsFrame(0, flags=["ACK"]).serialize() * 5)  # ACKs are owed nothing
    g.new_second()
    g.feed(PingFrame(0, opaque_data=b"12345678").serialize() * MAX_OWED_ACKS)
    with pytest.raises(Abuse, match="PING or SETTINGS"):
        g.feed(PingFrame(0, opaque_data=b"12345678").serialize())


def test_two_empty_frames_in_a_row_are_a_flood_but_one_is_not():
    g = guard()
    g.feed(H2_PREFACE + HeadersFrame(1, data=b"x", flags=["END_HEADERS"]).serialize())
    g.feed(DataFrame(1).serialize() + DataFrame(1, data=b"y").serialize() + DataFrame(1).serialize())
    g.feed(DataFrame(1, flags=["END_STREAM"]).serialize())  # an empty frame that ends the stream is fine
    with pytest.raises(Abuse, match="empty frames"):
        g.feed(DataFrame(3).serialize() + DataFrame(3).serialize())
