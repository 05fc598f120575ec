"""End to end: edit the control plane's --config-dir, a sidecar fed by it follows; an invalid file is
rejected alone and shown by meshctl proxy-status; routing stays as it was."""

from __future__ import annotations

import subprocess
import time

import pytest
import yaml

from tests.harness import venv_bin, wait_for
from tests.harness.plugin import ProcessFactory
from tests.integration.test_distribution_support import ControlledProxy
from tests.integration.test_proxy_support import (
    curl_many,
    destination_rule,
    endpoint,
    served_by,
    service_entry,
    virtual_service,
)


def canary(weight: int) -> dict:
    return virtual_service("reviews", ["reviews"], [{"route": [
        {"destination": {"host": "reviews", "subset": "v1"}, "weight": 100 - weight},
        {"destination": {"host": "reviews", "subset": "v2"}, "weight": weight}]}])


def write(directory, name, *documents):
    tmp = directory / f".{name}.tmp"
    tmp.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    tmp.replace(directory / name)


@pytest.fixture
def controlled_proxy_factory(process_log_dir):
    factory = ProcessFactory(ControlledProxy, process_log_dir)
    yield factory
    factory.stop_all()


def test_canary_shift_by_editing_files(tmp_path, backend_factory, control_factory, controlled_proxy_factory):
    v1, v2 = backend_factory("reviews-v1"), backend_factory("reviews-v2")
    config = tmp_path / "config"
    config.mkdir()
    write(config, "reviews.yaml",
          service_entry("reviews", [endpoint(v1, version="v1"), endpoint(v2, version="v2")]),
          destination_rule("reviews", "reviews", subsets=[{"name": "v1", "labels": {"version": "v1"}},
                                                          {"name": "v2", "labels": {"version": "v2"}}]))
    write(config, "reviews-vs.yaml", canary(0))
    control = control_factory(extra_args=["--config-dir", str(config)])
    proxy = controlled_proxy_factory(control, "productpage")

    def version():
        return proxy.admin("/config_dump")["version"]

    timings = []
    for weight in (0, 20, 50, 100):
        before = version()
        if weight:
            write(config, "reviews-vs.yaml", canary(weight))
            started = time.monotonic()
            wait_for(lambda before=before: version() != before, timeout=2.0,
                     what=f"the proxy to apply the {weight}% canary")
            timings.append(time.monotonic() - started)
        counts = served_by(curl_many(f"{proxy.outbound_url}/", 200, host="reviews"))  # asserts all 200
        share = counts["reviews-v2"] / 200
        assert abs(share - weight / 100) <= 0.12, f"{weight}% canary: v2 served {counts}"
    print(f"edit -> applied at the proxy: {', '.join(f'{t:.2f}s' for t in timings)}")

    # an invalid edit: rejected alone, the 100% canary stays in force, proxy-status shows it
    before = version()
    (config / "reviews-vs.yaml").write_text(yaml.safe_dump(canary(100)).replace("weight: 100", "weight: 0"))
    wait_for(lambda: control.admin("/ready")["config_errors"], timeout=2.0, what="the rejection")
    proc = subprocess.run([venv_bin("meshctl"), "proxy-status", "--control-admin", f"127.0.0.1:{control.admin_port}"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "productpage" in proc.stdout and "SYNCED" in proc.stdout
    assert "weights sum to 0" in proc.stdout and "[last good version in force:" in proc.stdout
    assert version() == before
    assert served_by(curl_many(f"{proxy.outbound_url}/", 50, host="reviews")) == {"reviews-v2": 50}
