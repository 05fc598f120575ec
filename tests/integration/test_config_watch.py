"""The control plane watches --config-dir: edits apply within 2 s, an invalid resource is rejected alone.

Real ``twistd mesh-control`` processes; the state in force is read from the admin ``/ready`` page
(``config``: version, generation, resources, rejected) and the ``mesh_control_config_errors`` metric.
"""

from __future__ import annotations

import os
import time

import pytest
import yaml

from tests.harness import wait_for
from tests.integration.test_proxy_support import service_entry, virtual_service


def write(directory, name, *documents):
    path = directory / name
    tmp = directory / f".{name}.tmp"
    tmp.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    os.replace(tmp, path)  # what most editors and `kubectl cp` do: a new file renamed over the old one
    return path


def canary(weight: int) -> dict:
    return virtual_service("reviews", ["reviews"], [{"route": [
        {"destination": {"host": "reviews", "subset": "v1"}, "weight": 100 - weight},
        {"destination": {"host": "reviews", "subset": "v2"}, "weight": weight}]}])


def config_of(control) -> dict:
    return control.admin("/ready")["config"]


def wait_config(control, predicate, what, timeout=2.0):
    """Wait (at most ``timeout``, the issue's 2 s) until the control plane's config satisfies ``predicate``."""
    started = time.monotonic()
    found = wait_for(lambda: predicate(config_of(control)) and config_of(control), timeout=timeout, what=what)
    return found, time.monotonic() - started


@pytest.fixture
def config_dir(tmp_path):
    directory = tmp_path / "config"
    directory.mkdir()
    write(directory, "services.yaml", service_entry("reviews", [{"address": "127.0.0.1", "ports": {"http": 9080}}]),
          service_entry("ratings", [{"address": "127.0.0.1", "ports": {"http": 9081}}]))
    write(directory, "reviews-vs.yaml", canary(0))
    return directory


def test_edits_apply_within_2s_and_invalid_resources_are_rejected_alone(control_factory, config_dir):
    control = control_factory(extra_args=["--config-dir", str(config_dir)])
    first = config_of(control)
    assert first["resources"] == 3 and first["rejected"] == []

    # shift the canary in steps: each edit is in force within 2 s
    version = first["version"]
    for weight in (10, 50, 100):
        write(config_dir, "reviews-vs.yaml", canary(weight))
        found, took = wait_config(control, lambda c, v=version: c["version"] != v, f"canary {weight}% applied")
        assert found["rejected"] == []
        version = found["version"]

    # an invalid VirtualService (weights sum to 0) in the same moment as a valid new ServiceEntry
    write(config_dir, "reviews-vs.yaml", virtual_service("reviews", ["reviews"], [{"route": [
        {"destination": {"host": "reviews", "subset": "v1"}, "weight": 0},
        {"destination": {"host": "reviews", "subset": "v2"}, "weight": 0}]}]))
    write(config_dir, "details.yaml",
          service_entry("details", [{"address": "127.0.0.1", "ports": {"http": 9082}}]))
    found, _ = wait_config(control, lambda c: c["rejected"] and c["resources"] == 4, "rejection and details")
    [rejected] = found["rejected"]
    assert rejected["error"].startswith(f"{config_dir / 'reviews-vs.yaml'}:")
    assert "VirtualService/default/reviews: spec.http[0].route" in rejected["error"]
    assert "weights sum to 0" in rejected["error"]
    assert rejected["kept"] == f"{config_dir / 'reviews-vs.yaml'}:1"  # the 100% version stays in force
    ready = control.admin("/ready")
    assert ready["config_errors"] == [rejected["error"]]
    status, metrics = control.admin_request("/metrics")
    if status == 200:
        assert b'mesh_control_config_errors{kind="VirtualService"} 1.0' in metrics
    log = control.log_path.read_text()
    assert "config rejected: " + rejected["error"] in log and "stays in force" in log

    # a YAML syntax error in a file keeps what that file defined
    (config_dir / "details.yaml").write_text("apiVersion: [unclosed\n")
    found, _ = wait_config(control, lambda c: len(c["rejected"]) == 2, "the yaml error")
    assert found["resources"] == 4

    # fix both; delete a file: its resources go
    write(config_dir, "reviews-vs.yaml", canary(0))
    (config_dir / "details.yaml").unlink()
    found, _ = wait_config(control, lambda c: not c["rejected"] and c["resources"] == 3, "fixes and deletion")
    assert found["version"] == first["version"]  # the same resources as at the start: the same hash

