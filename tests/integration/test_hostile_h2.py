"""Hostile HTTP/2 clients: the attacks Envoy and other proxies fixed, each while other clients are served.

Every attack runs against a sidecar on each HTTP/2 engine (``--http2-engine nghttp2``, ``nghttp2-cffi``
and ``h2``).

The attacker is :class:`~tests.integration.test_h2_support.RawH2` (frames written with hyperframe and
hpack, exactly as given) on a real socket to one sidecar; for each attack a victim (curl, over HTTP/2 and
over HTTP/1.1) asks for a slow response meanwhile and must get its 200.

- rapid reset (CVE-2023-44487): Envoy's premature-reset rule ends the connection
- CONTINUATION flood (CVE-2024-27316): the header block is bounded across CONTINUATION frames, and
  a block that never ends meets the header timeout
- HPACK bomb: decoding stops at twice SETTINGS_MAX_HEADER_LIST_SIZE
- too many concurrent streams: the extra stream is refused (REFUSED_STREAM), the others are served
- header lists over the limits: 431, the connection goes on
- flow-control abuse: window overflows (FLOW_CONTROL_ERROR), and a client that never opens its window
  holds a bounded amount of the proxy's memory and is reset after the idle timeout
- floods of PING, SETTINGS, PRIORITY, WINDOW_UPDATE and empty frames (Envoy's limits)
- malformed header fields (CR/LF in a value, an upper-case name, surrounding whitespace, a
  connection-specific header): never forwarded; the connection ends with PROTOCOL_ERROR
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager

import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.integration.test_h2_support import H2Client, RawH2
from tests.integration.test_proxy_support import endpoint, service_entry, write_config

HEADER_TIMEOUT, IDLE_TIMEOUT = 2, 3


@pytest.fixture(scope="module")
def config(tmp_path_factory, backend_factory):
    """The config of a sidecar in front of the demo app (host ``victim``)."""
    app = backend_factory("victim")
    return write_config(tmp_path_factory.mktemp("hostile-h2"), service_entry("victim", [endpoint(app)]))


@pytest.fixture(scope="module", params=["nghttp2", "nghttp2-cffi", "h2"])
def proxy(request, config, proxy_factory):
    """One sidecar with short header and idle timeouts, on each HTTP/2 engine (``--http2-engine``)."""
    return proxy_factory(config, f"guard-{request.param}", extra_args=[
        "--header-timeout", str(HEADER_TIMEOUT), "--idle-timeout", str(IDLE_TIMEOUT),
        "--http2-engine", request.param])


@contextmanager
def others_served(proxy):
    """Victims ask for a slow response (HTTP/2 and HTTP/1.1) while the block runs; both must get a 200."""
    victims = [subprocess.Popen(["curl", "-sS", "-o", os.devnull, "-w", "%{http_code}", "--max-time", "10", *flags,
                                 "-H", "Host: victim", f"{proxy.outbound_url}/delay/300"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for flags in (["--http2-prior-knowledge"], [])]
    try:
        yield
    finally:
        results = [victim.communicate(timeout=15)[0] for victim in victims]
    assert results == ["200", "200"], f"the victims got {results} during the attack"


@contextmanager
def attacker(proxy, settings=None):
    raw = RawH2(proxy.outbound_port, settings=settings)
    try:
        yield raw
    finally:
        raw.close()


def test_rapid_reset_ends_the_connection(proxy):
    with attacker(proxy) as raw, others_served(proxy):
        block = raw.block("/delay/2000")
        raw.send(b"".join(raw.headers(stream, block) + RstStreamFrame(stream, error_code=ErrorCodes.CANCEL).serialize()
                          for stream in range(1, 1400, 2)))
        goaway = raw.goaway(timeout=15)
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM and b"rapid reset" in goaway.additional_data


def test_continuation_flood_is_bounded(proxy):
    """30 CONTINUATION frames of 16000 bytes (fewer than h2's own backlog of 64): cut at twice
    --max-header-bytes (120 KiB)."""
    with attacker(proxy) as raw, others_served(proxy):
        flood = [raw.headers(1, raw.block("/"), flags=["END_STREAM"])]
        flood += [ContinuationFrame(1, data=b"\x00" * 16000).serialize() for _ in range(30)]
        raw.send(b"".join(flood))
        goaway = raw.goaway()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM and b"header block over" in goaway.additional_data


def test_a_header_block_that_never_ends_meets_the_header_timeout(proxy):
    with attacker(proxy) as raw:
        raw.send(raw.headers(1, raw.block("/"), flags=["END_STREAM"]) + ContinuationFrame(1, data=b"").serialize())
        goaway = raw.goaway(timeout=HEADER_TIMEOUT + 3)
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert b"request headers not received within" in goaway.additional_data


def test_hpack_bomb_is_stopped_while_it_expands(proxy):
    """A 4 KB header in the dynamic table, then a block of 16000 one-byte references to it (64 MB decoded)."""
    with attacker(proxy) as raw, others_served(proxy):
        fill = raw.block("/", extra=[(b"x-bomb", b"a" * 4000)])
        bomb = raw.block("/") + b"\xbe" * 16000  # 0xbe: the dynamic table's newest entry, x-bomb
        raw.send(raw.headers(1, fill) + raw.headers(3, bomb))
        goaway = raw.goaway()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_streams_over_the_limit_are_refused(proxy):
    """101 streams at once (SETTINGS_MAX_CONCURRENT_STREAMS is 100): the last is refused, the others served."""
    with attacker(proxy) as raw, others_served(proxy):
        block = raw.block("/delay/300")
        raw.send(b"".join(raw.headers(stream, block) for stream in range(1, 203, 2)))
        answered, refused = set(), []
        for frame in raw.frames(timeout=10):
            assert frame.__class__.__name__ != "GoAwayFrame", f"the connection was ended: {frame}"
            if isinstance(frame, RstStreamFrame):
                refused.append((frame.stream_id, frame.error_code))
            elif isinstance(frame, HeadersFrame):
                answered.add(frame.stream_id)
            if len(answered) == 100:
                break
    assert refused == [(201, ErrorCodes.REFUSED_STREAM)] and answered == set(range(1, 201, 2))


@pytest.mark.parametrize("headers, what", [
    ([(f"x-h{n}", "v") for n in range(101)], "101 headers (--max-headers 100)"),
    ([(f"x-big{n}", "v" * 7000) for n in range(10)], "70 KB of headers (--max-header-bytes 60k)"),
])
def test_header_lists_over_the_limits_get_431(proxy, headers, what):
    client = H2Client(proxy.outbound_port)
    try:
        big = client.request("/", "victim", headers=headers)
        client.wait(lambda: client.done(big), what=what)
        assert client.responses[big].status == 431, (what, client.responses[big])
        after = client.request("/", "victim")  # the connection goes on
        client.wait(lambda: client.done(after))
        assert client.responses[after].status == 200 and client.terminated is None
    finally:
        client.close()


@pytest.mark.parametrize("field", [
    (b"x-smuggle", b"1\r\ntransfer-encoding: chunked"), (b"X-Upper", b"1"), (b"x-padded", b" 1"),
    (b"connection", b"close"), (b"te", b"gzip"),
], ids=["crlf-in-value", "upper-case-name", "whitespace", "connection", "te-not-trailers"])
def test_malformed_header_fields_are_never_forwarded(proxy, field):
    """RFC 9113 section 8.2: a malformed request (h2's validation, which the codec keeps on) is not
    forwarded to the HTTP/1.1 app, where a CR/LF would smuggle a header; the connection ends."""
    with attacker(proxy) as raw:
        raw.send(raw.headers(1, raw.block("/", extra=[field])))
        seen = []
        for frame in raw.frames(timeout=10):
            seen.append(frame)
            if frame.__class__.__name__ == "GoAwayFrame":
                break
        assert not any(isinstance(frame, HeadersFrame) for frame in seen), f"answered: {seen}"
        assert seen and seen[-1].error_code == ErrorCodes.PROTOCOL_ERROR, seen


def test_window_overflows_are_flow_control_errors(proxy):
    """A stream's window pushed over 2^31-1 resets that stream; the connection's ends the connection."""
    with attacker(proxy) as raw:
        raw.send(raw.headers(1, raw.block("/delay/500")) + WindowUpdateFrame(1, window_increment=2**31 - 1).serialize())
        reset = raw.first(RstStreamFrame)
        assert (reset.stream_id, reset.error_code) == (1, ErrorCodes.FLOW_CONTROL_ERROR)
        raw.send(raw.headers(3, raw.block("/")))
        assert raw.first(HeadersFrame).stream_id == 3  # the connection goes on
        raw.send(WindowUpdateFrame(0, window_increment=2**31 - 1).serialize())
        assert raw.goaway().error_code == ErrorCodes.FLOW_CONTROL_ERROR


def test_a_window_never_opened_pins_bounded_memory_then_is_reset(proxy):
    """A client with a zero window asks for 40 MB: the proxy holds a bounded part (the upstream is paused),
    keeps serving others, and resets the stream once it has not moved for the idle timeout."""
    before = proxy.status_kib("VmRSS")
    client = H2Client(proxy.outbound_port, settings={SettingCodes.INITIAL_WINDOW_SIZE: 0}, auto_ack=False)
    try:
        with others_served(proxy):
            stuck = client.request("/bytes/40000000", "victim")
            client.wait(lambda: client.responses[stuck].status == 200, what="the response head")
        grown = proxy.status_kib("VmRSS") - before
        assert grown < 16 * 1024, f"the proxy grew by {grown} KiB for a client that reads nothing"
        client.wait(lambda: client.done(stuck), timeout=IDLE_TIMEOUT + 4, what="the stream's reset")
        assert client.responses[stuck].reset == ErrorCodes.CANCEL and client.responses[stuck].body == b""
    finally:
        client.close()


@pytest.mark.parametrize("name, frames", [
    ("PING", lambda raw: b"".join(PingFrame(0, opaque_data=b"%08d" % n).serialize() for n in range(3000))),
    ("SETTINGS", lambda raw: SettingsFrame(0, settings={SettingCodes.HEADER_TABLE_SIZE: 4096}).serialize() * 3000),
    ("PRIORITY", lambda raw: b"".join(PriorityFrame(n, depends_on=0, stream_weight=1).serialize()
                                      for n in range(1, 1000, 2))),
    ("WINDOW_UPDATE", lambda raw: WindowUpdateFrame(0, window_increment=1).serialize() * 100),
    ("empty", lambda raw: raw.headers(1, raw.block("/"), flags=["END_HEADERS"]) + DataFrame(1).serialize() * 10),
])
def test_floods_of_frames_end_the_connection(proxy, name, frames):
    with attacker(proxy) as raw, others_served(proxy):
        raw.send(frames(raw))
        goaway = raw.goaway()
    reason = goaway.additional_data.decode()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM and reason.startswith("a flood of") and name in reason
