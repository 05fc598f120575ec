"""Shared helpers of the Datadog plugin tests (plugins/txmesh-datadog); no tests here.

Stand-ins for the two intakes of a Datadog agent, on loopback, in this process, each on a thread.
Both check what they get as strictly as the agent documents it and keep every problem in ``errors``
(a test asserts there is none), so a malformed datagram or payload fails the test that caused it:

- :class:`DogStatsDReceiver`: DogStatsD over UDP or a Unix datagram socket.  Each datagram is at
  most the size the plugin promises (1432 bytes over UDP, 8192 over a Unix socket) and holds
  newline-separated lines ``NAME:VALUE[:VALUE...]|TYPE[|@RATE][|#TAG,...]`` (Datadog's "Datagram
  Format", protocol v1.1): names of ASCII letters, digits, ``_`` and ``.`` starting with a letter;
  decimal values (no exponent), several only for types other than ``s``; a type among
  ``c g ms h s d``; a rate in (0, 1] and only for ``c h d ms``; tags that start with a letter and
  hold only letters, digits and ``_ - : . /``, at most 200 characters each.  Anything else (an empty
  line, a trailing newline, an unknown field) is an error.
- :class:`TraceIntake`: the trace agent's ``PUT /v0.4/traces`` (TCP or a Unix socket) with a JSON body:
  an array of traces, each a non-empty array of spans sharing one ``trace_id``; every span has the
  agent's fields with their types (unsigned 64-bit ids, nanosecond ``start`` near now, ``error`` 0 or
  1, string ``meta``, numeric ``metrics``) and no others; ``X-Datadog-Trace-Count`` equals the number
  of traces.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import ThreadingMixIn, UnixStreamServer
from typing import NamedTuple

UDP_MAX_BYTES = 1432
UNIX_MAX_BYTES = 8192

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,199}")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_\-:./]{0,199}")
_TYPES = {"c", "g", "ms", "h", "s", "d"}
_SAMPLED_TYPES = {"c", "h", "d", "ms"}


class Metric(NamedTuple):
    """One parsed DogStatsD line: ``values`` are numbers, ``rate`` 1.0 when absent, ``tags`` a tuple."""

    name: str
    values: tuple
    type: str
    rate: float
    tags: tuple

    def tag_dict(self) -> dict:
        """``{key: value}`` of the ``key:value`` tags (a tag without ``:`` maps to ``""``)."""
        return dict((tag.split(":", 1) + [""])[:2] for tag in self.tags)


def parse_line(line: str) -> Metric:
    """One DogStatsD metric line, strictly (see the module docstring); ValueError says what is wrong."""
    head, *fields = line.split("|")
    name, sep, values_text = head.partition(":")
    if not sep or not _NAME.fullmatch(name):
        raise ValueError(f"bad metric name in {line!r}")
    values_list = values_text.split(":")
    if not all(_NUMBER.fullmatch(value) for value in values_list):
        raise ValueError(f"bad value(s) {values_text!r} in {line!r}")
    if not fields or fields[0] not in _TYPES:
        raise ValueError(f"bad or missing type in {line!r}")
    kind, rest = fields[0], fields[1:]
    if kind == "s" and len(values_list) > 1:
        raise ValueError(f"a SET cannot pack values: {line!r}")
    rate, tags = 1.0, ()
    if rest and rest[0].startswith("@"):
        rate = float(rest[0][1:]) if _NUMBER.fullmatch(rest[0][1:]) else -1.0
        if not 0.0 < rate <= 1.0 or kind not in _SAMPLED_TYPES:
            raise ValueError(f"bad sample rate for type {kind} in {line!r}")
        rest = rest[1:]
    if rest and rest[0].startswith("#"):
        tags = tuple(rest[0][1:].split(","))
        bad = [tag for tag in tags if not _TAG.fullmatch(tag)]
        if bad:
            raise ValueError(f"bad tag(s) {bad} in {line!r}")
        rest = rest[1:]
    if rest:
        raise ValueError(f"unexpected field(s) {rest} in {line!r}")
    values = tuple(float(value) if "." in value else int(value) for value in values_list)
    return Metric(name, values, kind, rate, tags)


def parse_datagram(data: bytes, max_bytes: int) -> list[Metric]:
    """Every line of one datagram; ValueError for an oversized datagram or any bad line."""
    if len(data) > max_bytes:
        raise ValueError(f"a datagram of {len(data)} bytes, more than {max_bytes}")
    text = data.decode("utf-8")
    return [parse_line(line) for line in text.split("\n")]


class DogStatsDReceiver:
    """A DogStatsD server on ``127.0.0.1`` UDP (``path`` None) or on the Unix datagram socket ``path``.

    ``metrics`` are the parsed lines so far, ``datagrams`` how many came, ``errors`` what was wrong.
    ``address`` is what ``--datadog-statsd`` takes.
    """

    def __init__(self, path: str | None = None):
        self.path = path
        self.max_bytes = UNIX_MAX_BYTES if path else UDP_MAX_BYTES
        if path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.bind(path)
        else:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self._lock = threading.Lock()
        self._stopped = False
        self.metrics: list[Metric] = []
        self.errors: list[str] = []
        self.datagrams = 0
        self._thread = threading.Thread(target=self._serve, name="dogstatsd", daemon=True)

    @property
    def address(self) -> str:
        return f"unix://{self.path}" if self.path else f"127.0.0.1:{self._sock.getsockname()[1]}"

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped = True
        self._thread.join(5)
        self._sock.close()
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)

    def _serve(self) -> None:
        while not self._stopped:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.datagrams += 1
                try:
                    self.metrics.extend(parse_datagram(data, self.max_bytes))
                except ValueError as error:
                    self.errors.append(str(error))

    def snapshot(self) -> list[Metric]:
        with self._lock:
            return list(self.metrics)

    def count(self, name: str, **tags) -> int:
        """The sum of the COUNT ``name`` over the lines whose tags include ``tags``."""
        return sum(sum(m.values) for m in self.snapshot()
                   if m.name == name and m.type == "c" and tags.items() <= m.tag_dict().items())

    def counts_by(self, name: str, *keys: str) -> Counter:
        """The COUNT ``name`` summed by the values of the tags ``keys`` (one tuple per combination)."""
        totals = Counter()
        for m in self.snapshot():
            if m.name == name and m.type == "c":
                tags = m.tag_dict()
                totals[tuple(tags.get(key) for key in keys)] += sum(m.values)
        return totals

    def weighted_count(self, name: str, **tags) -> float:
        """How many values the distribution ``name`` stands for: each value counts ``1/rate``."""
        return sum(len(m.values) / m.rate for m in self.snapshot()
                   if m.name == name and tags.items() <= m.tag_dict().items())


class Span(NamedTuple):
    trace_id: int
    span_id: int
    parent_id: int
    name: str
    resource: str
    service: str
    type: str
    start: int
    duration: int
    error: int
    meta: dict
    metrics: dict


_SPAN_FIELDS = {"trace_id": int, "span_id": int, "parent_id": int, "name": str, "resource": str, "service": str,
                "type": str, "start": int, "duration": int, "error": int, "meta": dict, "metrics": dict}
_REQUIRED = {"trace_id", "span_id", "name", "resource", "service", "start", "duration"}


def check_span(span) -> Span:
    """A span of a v0.4 payload, checked field by field; ValueError says what is wrong."""
    if not isinstance(span, dict):
        raise ValueError(f"a span is not an object: {span!r}")
    unknown = set(span) - set(_SPAN_FIELDS)
    missing = _REQUIRED - set(span)
    if unknown or missing:
        raise ValueError(f"span fields: unknown {sorted(unknown)}, missing {sorted(missing)}")
    for field, kind in _SPAN_FIELDS.items():
        if field in span and (type(span[field]) is not kind):
            raise ValueError(f"span field {field} is {type(span[field]).__name__}, not {kind.__name__}")
    for field in ("trace_id", "span_id", "parent_id"):
        if not 0 <= span.get(field, 0) < 2 ** 64 or (field != "parent_id" and span[field] == 0):
            raise ValueError(f"span {field} {span.get(field)} is not a non-zero unsigned 64-bit integer")
    if not all(span[field] for field in ("name", "resource", "service")):
        raise ValueError("a span's name, resource and service must not be empty")
    if abs(span["start"] / 1e9 - time.time()) > 3600 or span["duration"] < 0:
        raise ValueError(f"span start {span['start']} is not nanoseconds since the epoch of about now, "
                         f"or duration {span['duration']} < 0")
    if span.get("error", 0) not in (0, 1):
        raise ValueError(f"span error is {span['error']}, not 0 or 1")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in span.get("meta", {}).items()):
        raise ValueError("span meta must map strings to strings")
    if not all(isinstance(k, str) and type(v) in (int, float) for k, v in span.get("metrics", {}).items()):
        raise ValueError("span metrics must map strings to numbers")
    return Span(**{field: span.get(field, kind()) for field, kind in _SPAN_FIELDS.items()})


def check_payload(headers: dict, body: bytes) -> list[list[Span]]:
    """The traces of one ``/v0.4/traces`` request, checked; ValueError says what is wrong."""
    if headers.get("content-type") != "application/json":
        raise ValueError(f"content-type {headers.get('content-type')!r}, not application/json")
    traces = json.loads(body)
    if not isinstance(traces, list) or not all(isinstance(trace, list) and trace for trace in traces):
        raise ValueError("the body is not an array of non-empty arrays of spans")
    if headers.get("x-datadog-trace-count") != str(len(traces)):
        raise ValueError(f"X-Datadog-Trace-Count {headers.get('x-datadog-trace-count')!r} but {len(traces)} traces")
    checked = [[check_span(span) for span in trace] for trace in traces]
    for trace in checked:
        if len({span.trace_id for span in trace}) != 1:
            raise ValueError("the spans of one trace have different trace_id")
    return checked


class _IntakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_PUT(self):
        intake = self.server.intake
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path != "/v0.4/traces":
            intake.fail(f"{self.command} {self.path}: not the trace intake")
            return self._answer(404, b"{}")
        try:
            traces = check_payload({name.lower(): value for name, value in self.headers.items()}, body)
        except ValueError as error:
            intake.fail(str(error))
            return self._answer(400, b"{}")
        intake.record(traces)
        self._answer(200, b'{"rate_by_service":{"service:,env:":1}}')

    def do_POST(self):
        self.server.intake.fail(f"POST {self.path}: the plugin PUTs")
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self._answer(405, b"{}")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


class _UnixHTTPServer(ThreadingMixIn, UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        request, _ = super().get_request()
        return request, ("unix", 0)  # what BaseHTTPRequestHandler expects of a client address


class TraceIntake:
    """The trace agent's ``/v0.4/traces`` on ``127.0.0.1`` (or on the Unix socket ``path``): ``traces``
    accepted, ``errors`` found.  ``url`` is what ``--datadog-trace-agent`` takes."""

    def __init__(self, path: str | None = None):
        self.path = path
        self.traces: list[list[Span]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        if path:
            self._server = _UnixHTTPServer(path, _IntakeHandler)
        else:
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), _IntakeHandler)
        self._server.daemon_threads = True
        self._server.intake = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="trace-intake", daemon=True)

    @property
    def url(self) -> str:
        return f"unix://{self.path}" if self.path else f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)

    def record(self, traces) -> None:
        with self._lock:
            self.traces.extend(traces)

    def fail(self, error: str) -> None:
        with self._lock:
            self.errors.append(error)

    def spans(self) -> list[Span]:
        with self._lock:
            return [span for trace in self.traces for span in trace]
