"""meshctl version, proxy-config NAME, tap and top against a real control plane and real sidecars.

The mesh is :func:`tests.integration.test_meshctl_observe_support.observed_mesh`; meshctl is the
real binary.
"""

from __future__ import annotations

import json
import socket

import pytest

from mesh import __version__
from tests.harness import free_port, wait_for
from tests.harness.jsonpages import JsonPages
from tests.integration.test_meshctl_observe_support import (
    meshctl,
    observed_mesh,
    start_meshctl,
    wait_for_stderr_line,
)
from tests.integration.test_proxy_support import curl_many


@pytest.fixture(scope="module")
def mesh(control_factory, backend_factory, process_log_dir, tmp_path_factory):
    mesh, stop = observed_mesh(control_factory, backend_factory, process_log_dir, tmp_path_factory.mktemp("mesh"))
    yield mesh
    stop()


# -- meshctl version ----------------------------------------------------------------------------

def test_version_of_client_control_plane_and_every_proxy(mesh):
    code, out, err = meshctl("version", "--control-admin", mesh["control_admin"])
    assert code == 0, err
    assert f"client version: {__version__}" in out and f"control plane version: {__version__}" in out
    for workload in ("productpage", "reviews-v1", "reviews-v2"):
        [row] = [line for line in out.splitlines() if f" {workload} " in line]
        assert row.split()[-1] == __version__, out
    assert "do not run" not in out
    code, out, _ = meshctl("version", "--control-admin", mesh["control_admin"], "-o", "json")
    document = json.loads(out)
    assert document["control_plane"] == __version__
    assert sorted(p["workload"] for p in document["proxies"]) == ["productpage", "reviews-v1", "reviews-v2"]
    assert {p["version"] for p in document["proxies"]} == {__version__}


def test_version_without_a_control_plane_says_what_to_do():
    port = free_port()
    code, out, err = meshctl("version", "--control-admin", f"127.0.0.1:{port}")
    assert code == 1 and out == f"client version: {__version__}\n"
    assert f"cannot reach the control plane's admin port at http://127.0.0.1:{port}/ready" in err
    assert "--admin-port" in err and "meshctl version --client" in err
    assert meshctl("version", "--client")[:2] == (0, f"client version: {__version__}\n")


# -- meshctl proxy-config NAME ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["productpage", "default/productpage"])
def test_proxy_config_finds_a_proxy_by_name_through_the_control_plane(mesh, name):
    code, out, err = meshctl("proxy-config", "routes", name, "--control-admin", mesh["control_admin"])
    assert code == 0, err
    assert "VirtualService/default/reviews" in out and "outbound|80|v2|reviews.default.svc.cluster.local" in out
    code, out, err = meshctl("proxy-config", "endpoints", "reviews-v1", "--control-admin", mesh["control_admin"])
    assert code == 0, err
    assert "outbound|80|v1|reviews.default.svc.cluster.local" in out and "HEALTHY" in out
    node = mesh["control"].admin("/proxies")
    [row] = [row for row in node if row["workload"] == "productpage"]
    code, out, err = meshctl("proxy-config", "cert", row["node"], "--control-admin", mesh["control_admin"])
    assert code == 0 and "spiffe://cluster.local/ns/default/sa/productpage" in out, err


def test_proxy_config_unknown_name_lists_the_known_ones(mesh):
    code, out, err = meshctl("proxy-config", "routes", "ratings", "--control-admin", mesh["control_admin"])
    assert code == 1 and out == ""
    assert "no proxy named 'ratings' is known to the control plane" in err
    assert "productpage.default~" in err and "meshctl proxy-status" in err
    code, _, err = meshctl("proxy-config", "routes", "productpage", "--admin", "127.0.0.1:1",
                           "--control-admin", mesh["control_admin"])
    assert code == 1 and "give either a proxy NAME or --admin HOST:PORT, not both" in err


def test_proxy_config_by_name_without_a_control_plane_says_what_to_do():
    port = free_port()
    code, out, err = meshctl("proxy-config", "routes", "productpage", "--control-admin", f"127.0.0.1:{port}")
    assert code == 1 and out == ""
    assert f"cannot reach the control plane's admin port at http://127.0.0.1:{port}/proxies" in err
    assert "--control-admin" in err


@pytest.fixture
def fixed_rows():
    """A control plane's /proxies with fixed rows (cases a real one cannot easily show: remote, ambiguous)."""
    with JsonPages() as pages:
        yield pages


def test_a_proxy_on_another_host_is_not_confused_with_a_local_one(mesh, fixed_rows):
    """The announced admin port belongs to another proxy here: meshctl says so instead of showing its config."""
    local = mesh["productpage"]
    fixed_rows.pages["/proxies"] = [{"node": "reviews.default~other-host~15000", "workload": "reviews",
                                     "namespace": "default", "address": "10.1.2.3", "connected": True,
                                     "admin_port": local.admin_port},
                  {"node": "ratings-a", "workload": "ratings", "namespace": "default", "connected": True,
                   "admin_port": 1},
                  {"node": "ratings-b", "workload": "ratings", "namespace": "default", "connected": True,
                   "admin_port": 2}]
    control_admin = fixed_rows.address
    code, out, err = meshctl("proxy-config", "routes", "reviews", "--control-admin", control_admin)
    assert code == 1 and out == ""
    assert f"127.0.0.1:{local.admin_port} is not proxy reviews.default~other-host~15000 but productpage" in err
    assert "runs on another host (10.1.2.3)" in err and "kubectl port-forward" in err
    code, _, err = meshctl("proxy-config", "routes", "ratings", "--control-admin", control_admin)
    assert code == 1 and "'ratings' names several proxies (ratings-a, ratings-b)" in err


# -- meshctl tap --------------------------------------------------------------------------------

def tap(*args):
    """Start ``meshctl tap`` and wait until it is subscribed."""
    proc = start_meshctl("tap", *args)
    wait_for_stderr_line(proc, "tapping")
    return proc


def test_tap_streams_matching_requests_with_headers_redacted(mesh):
    client = mesh["productpage"]
    proc = tap("productpage", "--control-admin", mesh["control_admin"], "--path", "/tapped", "-o", "json",
               "--count", "3")
    client.curl("reviews", "/other")  # filtered out by the sidecar
    for index in range(4):
        assert client.curl("reviews", f"/tapped/{index}", headers={"authorization": "Bearer s3cret",
                                                                    "x-custom": "visible?"}).status == 200
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [event["path"] for event in events] == ["/tapped/0", "/tapped/1", "/tapped/2"]
    first = events[0]
    assert first["direction"] == "outbound" and first["method"] == "GET" and first["authority"] == "reviews"
    assert first["status"] == 200 and first["route"] == "VirtualService/default/reviews/http[1]"
    assert first["cluster"].endswith("|reviews.default.svc.cluster.local") and first["duration_ms"] > 0
    assert first["headers"]["authorization"] == "[redacted]" and first["headers"]["x-custom"] == "[redacted]"
    assert "s3cret" not in out and "visible?" not in out


def test_tap_show_headers_never_shows_credentials(mesh):
    client = mesh["reviews-v1"]
    proc = tap("--admin", f"127.0.0.1:{client.admin_port}", "--show-headers", "--count", "1")
    client.curl("reviews", "/v2/shown", headers={"authorization": "Bearer s3cret", "cookie": "session=abc",
                                                 "x-custom": "visible"})  # reviews-v1 as a client
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    [line, *headers] = out.splitlines()
    assert " outbound GET reviews /v2/shown 200 - " in line and "route=VirtualService/default/reviews/http[0]" in line
    assert "    x-custom: visible" in headers and "    authorization: [redacted]" in headers
    assert "    cookie: [redacted]" in headers and "s3cret" not in out and "session=abc" not in out


def test_tap_filters_by_status_and_direction_in_the_sidecar(mesh):
    client = mesh["productpage"]
    proc = tap("reviews-v2", "--control-admin", mesh["control_admin"], "--status", "4xx", "--direction", "inbound",
               "-o", "json", "--count", "3")
    statuses = [client.curl("reviews", path).status
                for path in ("/v2/status/200", "/v2/admin/x", "/v2/status/404", "/v2/status/418")]
    assert statuses == [200, 403, 404, 418]
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(event["direction"], event["status"], event["path"]) for event in events] == [
        ("inbound", 403, "/admin/x"), ("inbound", 404, "/status/404"), ("inbound", 418, "/status/418")]
    denied = events[0]
    assert denied["flags"].startswith("RBAC") and denied["authz_policy"] == "default/deny-admin"
    assert denied["source_principal"] == "spiffe://cluster.local/ns/default/sa/productpage"


def test_tap_bad_filter_and_unreachable_sidecar_say_what_to_do(mesh):
    client = mesh["productpage"]
    code, out, err = meshctl("tap", "--admin", f"127.0.0.1:{client.admin_port}", "--status", "6xx")
    assert code == 1 and out == ""
    assert "/tap answered 400: bad /tap request: status='6xx': give a code (503) or a class (5xx)" in err
    port = free_port()
    code, _, err = meshctl("tap", "--admin", f"127.0.0.1:{port}")
    assert code == 1 and f"cannot reach the sidecar's admin port at http://127.0.0.1:{port}/config_dump" in err
    assert "--admin-port" in err


def raw_tap(port: int, query: str) -> socket.socket:
    """A /tap subscriber that reads nothing until told (a slow client)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # before connect: a small window, fast reads
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /tap?{query} HTTP/1.1\r\nHost: admin\r\n\r\n".encode())
    return sock


def read_until_quiet(sock: socket.socket) -> bytes:
    sock.settimeout(1.0)
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk


def tap_lines(data: bytes) -> list:
    """The JSON objects of a raw chunked /tap response."""
    body = data.split(b"\r\n\r\n", 1)[1]
    return [json.loads(line) for line in body.split(b"\n") if line.startswith(b"{")]


def test_a_slow_tap_client_gets_drops_counted_not_memory(mesh):
    client = mesh["productpage"]
    sock = raw_tap(client.admin_port, "path=/slow&show_headers=1&max_rps=5000")
    try:
        wait_for(lambda: b'{"tap"' in sock.recv(4096, socket.MSG_PEEK), what="the tap's opening line")
        padding = {"x-padding": "p" * 6000}
        sent = 1500  # about 9 MB of events, more than the kernel's socket buffers hold
        rss_before = client.status_kib("VmRSS")
        lines = curl_many(f"{client.outbound_url}/slow", sent, host="reviews", headers=padding,
                          write_out="%{http_code}")
        assert set(lines) == {"200"}
        assert client.status_kib("VmRSS") - rss_before < 6 * 1024  # the events were not queued in the sidecar
        received = tap_lines(read_until_quiet(sock))
        assert client.curl("reviews", "/slow/last").status == 200  # the next event brings the drop count
        received += tap_lines(b"\r\n\r\n" + read_until_quiet(sock))
    finally:
        sock.close()
    events = [line for line in received if "path" in line]
    dropped = [line["dropped"] for line in received if "dropped" in line][-1]  # counters are cumulative
    assert dropped["slow_client"] > 0 and dropped["rate_limit"] == 0, dropped
    assert len(events) + dropped["slow_client"] == sent + 1, (len(events), dropped)
    assert events[-1]["path"] == "/slow/last"


def test_taps_are_limited_per_sidecar(mesh):
    client = mesh["reviews-v2"]
    sockets = [raw_tap(client.admin_port, "") for _ in range(8)]
    try:
        for sock in sockets:
            wait_for(lambda sock=sock: b'{"tap"' in sock.recv(4096, socket.MSG_PEEK), what="a tap's opening line")
        code, _, err = meshctl("tap", "--admin", f"127.0.0.1:{client.admin_port}")
        assert code == 1 and "answered 503: 8 taps are running on this sidecar already" in err
    finally:
        for sock in sockets:
            sock.close()
    proc = tap("--admin", f"127.0.0.1:{client.admin_port}", "--count", "1")  # the slots are free again
    client.curl("reviews", "/v2/")
    assert proc.wait(timeout=20) == 0


# -- meshctl top --------------------------------------------------------------------------------

def test_top_per_route_and_per_path(mesh):
    client = mesh["productpage"]
    proc = start_meshctl("top", "productpage", "--control-admin", mesh["control_admin"], "--duration", "4s",
                         "-o", "json")
    wait_for_stderr_line(proc, "watching")
    curl_many(f"{client.outbound_url}/v2/status/200", 6, host="reviews", write_out="%{http_code}")
    curl_many(f"{client.outbound_url}/v2/status/500", 2, host="reviews", write_out="%{http_code}")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    [row] = [row for row in json.loads(out)["rows"] if row["key"][1] == "VirtualService/default/reviews/http[0]"]
    assert row["key"][0] == "outbound" and row["requests"] == 8 and row["success_rate"] == 0.75
    assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"] and row["rps"] > 0
    proc = start_meshctl("top", "--admin", f"127.0.0.1:{client.admin_port}", "--by", "path", "--duration", "3s")
    wait_for_stderr_line(proc, "watching")
    curl_many(f"{client.outbound_url}/v2/status/200?x=1", 3, host="reviews", write_out="%{http_code}")
    out, err = proc.communicate(timeout=30)
    header, *rows = out.splitlines()
    assert header.split() == ["DIRECTION", "AUTHORITY", "METHOD", "PATH", "REQUESTS", "RPS", "SUCCESS", "P50",
                              "P95", "P99"]
    assert rows[0].split()[:5] == ["outbound", "reviews", "GET", "/v2/status/200", "3"] and "100.00%" in rows[0]
