"""A plugin that raises in a hook: 500 with flag PE for that request only, and one traceback in the log.

Issue #10, item 10: such a request got ``500 internal proxy error``, its connection (and every request
pipelined on it) was closed, and the log said ``HttpParserCallbackError: User callback error`` without
the plugin or its exception.  Now the request gets 500 with ``x-mesh-flags: PE`` and a body that does
not name the plugin; the access log's details name plugin and hook (``plugin_error{raising,HOOK}``);
the sidecar's log names them too, with the traceback, once per distinct failure however often it
repeats; and the connection goes on serving.

The plugin is tests/plugins/txmesh_raising.py, a third-party plugin found through its ``mesh.plugins``
entry point: the test writes its distribution's metadata into a directory that, with
tests/plugins, is on this proxy's ``PYTHONPATH`` only.  It raises in the hook the request's
``x-raise-in`` header names.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest

from tests.harness import RawConnection, wait_for
from tests.integration.test_proxy_support import endpoint, service_entry, write_config
from tests.integration.test_telemetry_support import access_log

PLUGIN_DIR = Path(__file__).parents[1] / "plugins"
REPEATS = 3


@pytest.fixture(scope="module")
def app(backend_factory):
    return backend_factory("plugin-app")


@pytest.fixture(scope="module")
def sidecar(app, proxy_factory, tmp_path_factory):
    dist = tmp_path_factory.mktemp("raising-dist")
    info = dist / "txmesh_raising-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: txmesh-raising\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mesh.plugins]\nraising = txmesh_raising\n")
    config = write_config(tmp_path_factory.mktemp("plugin-config"), service_entry("plugin-app", [endpoint(app)]))
    log = tmp_path_factory.mktemp("plugin-logs") / "access.log"
    pythonpath = os.pathsep.join(filter(None, [str(PLUGIN_DIR), str(dist), os.environ.get("PYTHONPATH")]))
    proxy = proxy_factory(config, "plugin-client", app_port=app.port, env={"PYTHONPATH": pythonpath},
                          extra_args=["--access-log", log])
    assert "raising" in proxy.admin("/config_dump")["plugins"]
    return proxy, log


def exchange(port: int, requests) -> list:
    """Send ``requests`` (``(path, hook to raise in or None)``) pipelined on one connection; the responses.

    Every response must come, and the connection must still be open afterwards.
    """
    with RawConnection("127.0.0.1", port) as conn:
        conn.send(b"".join(b"GET %s HTTP/1.1\r\nHost: plugin-app\r\nx-request-id: %s\r\n%s\r\n"
                           % (path.encode(), str(uuid.uuid4()).encode(),
                              b"x-raise-in: %s\r\n" % hook.encode() if hook else b"")
                           for path, hook in requests))
        responses = [conn.read_response() for _ in requests]
        conn.send(b"GET /still-open HTTP/1.1\r\nHost: plugin-app\r\n\r\n")
        assert conn.read_response().status == 200, "the connection no longer serves"
    return responses


def app_targets(app) -> list:
    return re.findall(r"^plugin-app GET (\S+) -> \d+$", app.log_path.read_text(errors="replace"), re.MULTILINE)


def failure_lines(proxy, hook: str) -> list:
    return [line for line in proxy.log_path.read_text(errors="replace").splitlines()
            if f"plugin 'raising' failed in {hook}: RuntimeError: txmesh_raising fails in {hook}" in line]


def assert_logged_once(proxy, hook: str) -> None:
    """One log line names plugin and hook, with one traceback (which this test expects: it is taken off
    the list of tracebacks the suite fails on)."""
    wait_for(lambda: failure_lines(proxy, hook), 10, what=f"the log line of the failure in {hook}")
    assert len(failure_lines(proxy, hook)) == 1, failure_lines(proxy, hook)
    alarms = proxy.new_log_alarms()
    assert len([line for line in alarms if "Traceback (most recent call last)" in line]) == 1, alarms


@pytest.mark.parametrize("hook, path, reaches_app", [
    ("mesh_route", "/fails-in-route", False),
    ("mesh_request_headers", "/fails-in-headers", False),
    ("mesh_pick_endpoint", "/fails-in-pick", False),
    ("mesh_retry_decision", "/status/503", True),  # the 503 of the first try asks the retry hook
])
def test_outbound_hook_failure_is_500_pe_for_that_request_only(app, sidecar, hook, path, reaches_app):
    proxy, log = sidecar
    responses = exchange(proxy.outbound_port, [(path, hook)] * REPEATS + [("/after", None)])
    *failed, after = responses
    for response in failed:
        assert (response.status, response.headers.get("x-mesh-flags")) == (500, "PE"), response
        assert b"raising" not in response.body and hook.encode() not in response.body, response.body
        assert "x-demo-service" not in response.headers
    assert after.status == 200 and after.headers.get("x-demo-service") == "plugin-app"
    assert_logged_once(proxy, hook)
    request_ids = {response.headers["x-request-id"] for response in failed}
    entries = wait_for(lambda: [entry for entry in access_log(log) if entry["request_id"] in request_ids]
                       if len(request_ids & {entry["request_id"] for entry in access_log(log)}) == REPEATS
                       else None, 10, what="the access-log lines of the failed requests")
    assert {(entry["response_code"], entry["response_flags"], entry["response_code_details"])
            for entry in entries} == {(500, "PE", f"plugin_error{{raising,{hook}}}")}
    assert app_targets(app).count(path) == (REPEATS if reaches_app else 0)


def test_inbound_authorize_failure_never_reaches_the_app(app, sidecar):
    proxy, _ = sidecar
    responses = exchange(proxy.inbound_port, [("/fails-in-authorize", "mesh_authorize")] * REPEATS)
    assert {(response.status, response.headers.get("x-mesh-flags")) for response in responses} == {(500, "PE")}
    assert_logged_once(proxy, "mesh_authorize")
    assert "/fails-in-authorize" not in app_targets(app)


def test_request_complete_failure_leaves_the_response_alone(sidecar):
    proxy, _ = sidecar
    responses = exchange(proxy.outbound_port, [("/observed", "mesh_request_complete")] * REPEATS)
    assert {(response.status, response.headers.get("x-demo-service")) for response in responses} == \
        {(200, "plugin-app")}
    assert_logged_once(proxy, "mesh_request_complete")
    dump = proxy.admin("/config_dump")["plugin_failures"]
    counts = {row["hook"]: row["count"] for row in dump if row["plugin"] == "raising"}
    assert counts["mesh_request_complete"] == REPEATS
