"""Config handling of a real sidecar: an invalid config dir at start, and SIGHUP reloads (invalid edits are
rejected and logged, the old routing stays; valid edits take effect; requests in flight never fail).
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from tests.harness import free_port, venv_bin, wait_for
from tests.integration.test_proxy_support import (
    curl_many,
    destination_rule,
    endpoint,
    route_to,
    served_by,
    service_entry,
    virtual_service,
)

INVALID_VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
      weight: 0
    - destination: {host: reviews}
      weight: 0
"""
INVALID_DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: FASTEST
"""


def _write(directory: Path, name: str, text: str) -> None:
    """Replace a config file atomically, so a reload never reads half of it."""
    temporary = directory / f".{name}.tmp"
    temporary.write_text(text)
    os.replace(temporary, directory / name)


def test_invalid_config_dir_at_start_exits_non_zero_naming_file_line_resource_field(tmp_path):
    _write(tmp_path, "10-reviews.yaml", INVALID_VS)
    _write(tmp_path, "20-rule.yaml", INVALID_DR)
    proc = subprocess.run(
        [venv_bin("twistd"), "-n", "--pidfile=", "mesh-proxy", "--config-dir", tmp_path, "--workload", "client",
         "--outbound-port", str(free_port()), "--admin-port", str(free_port())],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    errors = [line for line in output.splitlines() if re.match(r"\S+\.yaml:\d+: ", line)]
    assert len(errors) == 2, output   # every problem of every file, not just the first
    vs_error = re.fullmatch(r"(\S+):(\d+): VirtualService/default/reviews: spec\.http\[0\]\.route: (.+)", errors[0])
    assert vs_error, errors[0]
    assert vs_error[1] == str(tmp_path / "10-reviews.yaml") and "weights sum to 0" in vs_error[3]
    assert 8 <= int(vs_error[2]) <= 12, "the line of the route list"
    assert errors[1] == (f"{tmp_path / '20-rule.yaml'}:10: DestinationRule/shop/reviews: "
                         "spec.trafficPolicy.loadBalancer.simple: invalid simple 'FASTEST'; use one of: "
                         "ROUND_ROBIN, LEAST_REQUEST, RANDOM, LEAST_CONN, UNSPECIFIED")
    assert "Traceback" not in output


def test_yaml_syntax_error_at_start(tmp_path):
    _write(tmp_path, "bad.yaml", "apiVersion: v1\nkind: [unclosed\n")
    proc = subprocess.run(
        [venv_bin("twistd"), "-n", "--pidfile=", "mesh-proxy", "--config-dir", tmp_path, "--workload", "client",
         "--outbound-port", str(free_port()), "--admin-port", str(free_port())],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert proc.returncode != 0
    assert re.search(rf"^{re.escape(str(tmp_path / 'bad.yaml'))}:\d+: yaml: ", proc.stdout + proc.stderr, re.M), \
        proc.stdout + proc.stderr


# -- reloads -----------------------------------------------------------------------------------------------


def _config(subset: str) -> str:
    return yaml.safe_dump(virtual_service("reviews", ["reviews"], [route_to("reviews", subset)]))


@pytest.fixture(scope="module")
def mesh(backend_factory, proxy_factory, tmp_path_factory):
    v1, v2 = backend_factory("v1"), backend_factory("v2")
    directory = tmp_path_factory.mktemp("reload-config")
    _write(directory, "00-registry.yaml", yaml.safe_dump_all([
        service_entry("reviews", [endpoint(v1, version="v1"), endpoint(v2, version="v2")]),
        destination_rule("reviews", "reviews", subsets=[{"name": "v1", "labels": {"version": "v1"}},
                                                        {"name": "v2", "labels": {"version": "v2"}}]),
    ]))
    _write(directory, "10-route.yaml", _config("v1"))
    proxy = proxy_factory(directory, "client")
    return proxy, directory


def _served(proxy) -> set:
    return set(served_by(curl_many(proxy.outbound_url + "/", 5, host="reviews")))


def _log_count(proxy, text: str) -> int:
    return proxy.log_path.read_text(errors="replace").count(text)


def test_sighup_with_an_invalid_edit_keeps_the_old_routing(mesh):
    proxy, directory = mesh
    version = proxy.admin("/config_dump")["version"]
    assert _served(proxy) == {"v1"}
    rejected_before = _log_count(proxy, "config rejected")
    _write(directory, "10-route.yaml", INVALID_VS.replace("{host: reviews}\n      weight: 0",
                                                          "{host: reviews, subset: v2}\n      weight: 0"))
    proxy.reload()
    wait_for(lambda: _log_count(proxy, "config rejected") > rejected_before, 10, what="the rejection in the log")
    log = proxy.log_path.read_text(errors="replace")
    assert re.search(r"config rejected.*10-route\.yaml:\d+: VirtualService/default/reviews: spec\.http\[0\]\.route: "
                     r"the destinations' weights sum to 0", log), proxy.log_tail()
    assert _served(proxy) == {"v1"}
    assert proxy.admin("/config_dump")["version"] == version
    assert proxy.admin("/ready")["ready"] is True


def test_sighup_with_a_yaml_syntax_error_keeps_the_old_routing(mesh):
    proxy, directory = mesh
    rejected_before = _log_count(proxy, "config rejected")
    _write(directory, "10-route.yaml", _config("v2") + "  - [broken\n")
    proxy.reload()
    wait_for(lambda: _log_count(proxy, "config rejected") > rejected_before, 10, what="the rejection in the log")
    assert _served(proxy) == {"v1"}


def test_sighup_with_a_valid_edit_changes_routing(mesh):
    proxy, directory = mesh
    version = proxy.admin("/config_dump")["version"]
    _write(directory, "10-route.yaml", _config("v2"))
    proxy.reload()
    wait_for(lambda: _served(proxy) == {"v2"}, 10, what="requests to go to v2 after the reload")
    new_version = proxy.admin("/config_dump")["version"]
    assert new_version != version
    assert proxy.admin("/ready")["version"] == new_version


def test_reloads_under_load_fail_no_request(mesh):
    proxy, directory = mesh
    results, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            results.extend(curl_many(proxy.outbound_url + "/", 200, host="reviews", parallel=4, timeout=30))

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_for(lambda: len(results) >= 200, 10, what="the load to start")
        for subset in ("v1", "v2", "v1", "v2", "v1"):
            _write(directory, "10-route.yaml", _config(subset))
            proxy.reload()
            wait_for(lambda: _served(proxy) == {subset}, 10, what=f"the reload to {subset}")  # noqa: B023
    finally:
        stop.set()
        thread.join(60)
    counts = served_by(results)   # asserts every request was 200
    assert set(counts) == {"v1", "v2"} and sum(counts.values()) >= 400, counts
