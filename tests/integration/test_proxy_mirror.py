"""Istio's ``mirror``/``mirrors``/``mirrorPercentage`` through a real sidecar: Istio's mirroring task shape
(v1 answers, v2 gets the copies with a ``-shadow`` Host), a percentage, a dead or stalled mirror that never
touches the primary, a body over the mirror cap, and bad config rejected.

The mirror targets are small recording HTTP servers on loopback (real sockets, in this process) so the
test can see the Host each copy carried; the primaries are demo apps.
"""

from __future__ import annotations

import math
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mesh.proxy.mirror import MIRROR_BODY_LIMIT
from tests.harness import wait_for
from tests.harness.net import free_port
from tests.integration.test_proxy_support import (
    curl_many,
    destination_rule,
    endpoint,
    route_to,
    service_entry,
    virtual_service,
    write_config,
)
from tests.integration.test_telemetry_support import total


class _Recorder(ThreadingHTTPServer):
    """Records ``(host, path, body length)`` of every request; answers 200 after ``stall`` seconds."""

    daemon_threads = True
    request_queue_size = 128  # socketserver's listen backlog is 5: a burst of copies' connects would overflow it

    def __init__(self, stall: float = 0.0):
        self.seen, self.stall, self.stalled = [], stall, threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def paths(self, prefix: str) -> list:
        return [entry for entry in list(self.seen) if entry[1].startswith(prefix)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # http.server calls it by this name
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append((self.headers.get("host"), self.path, len(body)))
        if self.server.stall:
            self.server.stalled.wait(self.server.stall)
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_POST = do_GET

    def log_message(self, *args):
        """Quiet."""


@dataclass
class Mesh:
    proxy: object
    config: Path
    mirror: _Recorder
    stalled: _Recorder
    v1: object


def _routes() -> list:
    def at(prefix, **extra):
        return route_to("reviews", "v1", match=[{"uri": {"prefix": prefix}}], **extra)

    return [
        at("/half", mirror={"host": "reviews", "subset": "v2"}, mirrorPercentage={"value": 50.0}),
        at("/dead", mirrors=[{"destination": {"host": "dead"}}]),
        at("/stalled", mirror={"host": "stalled"}),
        route_to("reviews", "v1", mirror={"host": "reviews", "subset": "v2"}),
    ]


def _config(directory, v1, mirror, stalled, routes=None):
    return write_config(
        directory,
        service_entry("reviews", [endpoint(v1, version="v1"), endpoint(mirror.server_address, version="v2")]),
        service_entry("dead", [endpoint(("127.0.0.1", free_port("127.0.0.1")))]),
        service_entry("stalled", [endpoint(stalled.server_address)]),
        destination_rule("reviews", "reviews", subsets=[{"name": "v1", "labels": {"version": "v1"}},
                                                        {"name": "v2", "labels": {"version": "v2"}}]),
        virtual_service("reviews", ["reviews"], routes or _routes()))


@pytest.fixture(scope="module")
def mesh(backend_factory, proxy_factory, tmp_path_factory) -> Mesh:
    v1 = backend_factory("reviews-v1")
    mirror, stalled = _Recorder(), _Recorder(stall=30.0)
    config = _config(tmp_path_factory.mktemp("mirror-config"), v1, mirror, stalled)
    yield Mesh(proxy_factory(config, "client"), config, mirror, stalled, v1)
    stalled.stalled.set()
    for server in (mirror, stalled):
        server.shutdown()
        server.server_close()


def test_v2_gets_shadow_copies_and_the_client_gets_v1(mesh):
    """Istio's mirroring task: the response is v1's; v2 sees the copy, its Host suffixed ``-shadow``."""
    path = f"/task-{uuid.uuid4().hex}"
    result = mesh.proxy.curl("reviews:9080", path)
    assert result.status == 200 and result.headers["x-demo-service"] == "reviews-v1", result
    [(host, _, _)] = wait_for(lambda: mesh.mirror.paths(path), 10, what="the mirrored copy")
    assert host == "reviews-shadow:9080"
    posted = mesh.proxy.curl("reviews", path + "-post", data=b"x" * 1000)
    assert posted.status == 200, posted
    assert wait_for(lambda: mesh.mirror.paths(path + "-post"), 10, what="the POST copy")[0] == \
        ("reviews-shadow", path + "-post", 1000)


@pytest.mark.parametrize("extra", [["--http2-prior-knowledge"], ["-H", "transfer-encoding: chunked"]],
                         ids=["h2c", "chunked"])
def test_a_streamed_body_is_copied_once_complete(mesh, extra):
    """An HTTP/2 body, or a chunked HTTP/1.1 one (it arrives after the head): the copy carries all of it."""
    path = f"/stream-{uuid.uuid4().hex}"
    result = mesh.proxy.curl("reviews", path, data=b"z" * 20000, extra_args=extra)
    assert result.status == 200 and result.json()["body_bytes"] == 20000, result
    assert wait_for(lambda: mesh.mirror.paths(path), 10, what="the copy") == [("reviews-shadow", path, 20000)]


def test_config_dump_shows_the_mirrors(mesh):
    routes = {route["action"]["name"].rsplit("/", 1)[-1]: route["action"]
              for entry in mesh.proxy.admin("/config_dump")["config"]["routes"] for route in entry["routes"]
              if route["action"]["name"].startswith("VirtualService/default/reviews/")}
    assert routes["http[0]"]["mirrors"] == [{"cluster": "outbound|80|v2|reviews.default.svc.cluster.local",
                                             "percent": 50.0}], routes


def _mirror_copies_ended(proxy) -> dict:
    """The sidecar's count of mirror copies that ended, by result (``mesh_mirror_requests_total``), once it
    has none in flight (``mesh_mirror_requests_active``; a stalled copy lasts up to 15 s)."""
    wait_for(lambda: total(proxy, "mesh_mirror_requests_active") == 0, 30, what="no mirror copy in flight")
    return {result: total(proxy, "mesh_mirror_requests_total", result=result)
            for result in ("completed", "failed", "abandoned")}


def test_mirror_percentage(mesh):
    """``mirrorPercentage: 50`` copies about half of 400 requests (within five binomial standard deviations),
    and every copy that completed reached the mirror.  Counted by the sidecar, before and after, with no
    copy in flight: on a busy host a copy can still be connecting long after the client's requests were
    answered."""
    before = _mirror_copies_ended(mesh.proxy)
    requests, run = 400, uuid.uuid4().hex
    lines = curl_many(f"{mesh.proxy.outbound_url}/half-{run}", requests, host="reviews")
    assert lines.count("200 reviews-v1") == requests, set(lines)
    ended = {result: count - before[result] for result, count in _mirror_copies_ended(mesh.proxy).items()}
    chosen = sum(ended.values())
    assert abs(chosen - requests / 2) <= 5 * math.sqrt(requests * 0.25), ended
    copied = len(mesh.mirror.paths(f"/half-{run}"))
    assert ended["completed"] <= copied <= ended["completed"] + ended["failed"], (copied, ended)


def test_a_copy_whose_request_body_never_completes_is_counted_abandoned(mesh):
    """The copy waits for the whole body; the client leaves mid-body: nothing reaches the mirror, and the
    sidecar counts the copy as abandoned (``mesh_mirror_requests_total{result="abandoned"}``)."""
    before = _mirror_copies_ended(mesh.proxy)
    path = f"/cut-{uuid.uuid4().hex}"
    with socket.create_connection(("127.0.0.1", mesh.proxy.outbound_port), timeout=5) as client:
        client.sendall(f"POST {path} HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n"
                       "5\r\nhello\r\n".encode())  # then gone, before the last chunk
    wait_for(lambda: _mirror_copies_ended(mesh.proxy)["abandoned"] == before["abandoned"] + 1, 10,
             what="the copy counted abandoned")
    assert _mirror_copies_ended(mesh.proxy) == {**before, "abandoned": before["abandoned"] + 1}
    assert mesh.mirror.paths(path) == []


@pytest.mark.parametrize("prefix", ["/dead", "/stalled"])
def test_a_dead_or_stalled_mirror_never_touches_the_primary(mesh, prefix):
    """Copies to a closed port, or to a server that never answers, leave every primary response 200 and
    fast: 50 sequential requests finish well inside a deadline a stalled copy alone would break."""
    started = time.monotonic()
    lines = curl_many(f"{mesh.proxy.outbound_url}{prefix}/{uuid.uuid4().hex}", 50, host="reviews",
                      write_out="%{http_code} %header{x-demo-service} %{time_total}")
    elapsed = time.monotonic() - started
    assert all(line.startswith("200 reviews-v1 ") for line in lines), set(lines)
    assert max(float(line.split()[-1]) for line in lines) < 1.0, lines
    assert elapsed < 10.0, elapsed
    if prefix == "/stalled":
        assert wait_for(lambda: mesh.stalled.paths(prefix), 10, what="a stalled copy"), "no copy was sent"


def test_a_body_over_the_cap_reaches_the_primary_whole_and_no_mirror(mesh):
    path = f"/big-{uuid.uuid4().hex}"
    size = MIRROR_BODY_LIMIT + 1
    result = mesh.proxy.curl("reviews", path, data=b"y" * size)
    assert result.status == 200 and result.json()["body_bytes"] == size, result
    small = f"{path}-small"  # a later copy arrives, so the big one would have too
    assert mesh.proxy.curl("reviews", small, data=b"y" * 10).status == 200
    wait_for(lambda: mesh.mirror.paths(small), 10, what="the small copy")
    assert mesh.mirror.paths(path) == [(mesh.mirror.paths(small)[0][0], small, 10)]


@pytest.mark.parametrize("field, value, message", [
    ("mirrorPercentage", {"value": 150}, r"spec\.http\[3\]\.mirrorPercentage\.value: percentage 150 is neither"),
    ("mirrors", [{"destination": {"host": "reviews"}}], r"spec\.http\[3\]\.mirrors: set only one of mirror or "
                                                        r"mirrors"),
    ("mirrorPercent", 50, r"spec\.http\[3\]\.mirrorPercent: .*use mirrorPercentage"),
])
def test_bad_mirror_config_is_rejected_and_the_old_config_stays(mesh, field, value, message):
    proxy = mesh.proxy
    routes = _routes()
    routes[3][field] = value
    version = proxy.admin("/config_dump")["version"]
    rejected = proxy.log_path.read_text(errors="replace").count("config rejected")
    _config(mesh.config, mesh.v1, mesh.mirror, mesh.stalled, routes)
    proxy.reload()
    try:
        wait_for(lambda: proxy.log_path.read_text(errors="replace").count("config rejected") > rejected, 10,
                 what="the rejection in the proxy's log")
        assert re.search(r"config rejected.*mesh\.yaml:\d+: VirtualService/default/reviews: " + message,
                         proxy.log_path.read_text(errors="replace")), proxy.log_tail()
        assert proxy.admin("/config_dump")["version"] == version
    finally:
        _config(mesh.config, mesh.v1, mesh.mirror, mesh.stalled)
        proxy.reload()
