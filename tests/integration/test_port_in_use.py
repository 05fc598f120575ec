"""A port already in use stops mesh-proxy and mesh-control with one line, not a traceback (issue #10, item 10).

The line names the address, the port and the option that moves it, and the exit status is not 0.  The
health and metrics ports of a sidecar are not the data path: a taken one is logged and the sidecar
serves anyway (docs/operations.md, "Processes and ports").
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.harness import free_port, venv_bin, wait_for
from tests.harness.net import http_request
from tests.integration.test_proxy_support import write_config

ADDRESS = "127.0.0.1"
PROXY_PORTS = ("--outbound-port", "--inbound-port", "--admin-port")
CONTROL_PORTS = ("--port", "--admin-port", "--webhook-port")


@pytest.fixture
def taken_port():
    """A port on ADDRESS that another process (this test) listens on."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind((ADDRESS, free_port()))
        holder.listen()
        yield holder.getsockname()[1]


def _proxy_argv(tmp_path, ports: dict) -> list[str]:
    config = write_config(tmp_path / "config", name="empty.yaml")
    argv = [venv_bin("twistd"), "-n", "--pidfile=", "mesh-proxy", "--config-dir", config, "--workload", "w",
            "--inbound-address", ADDRESS, "--app-port", free_port()]
    for option in (*PROXY_PORTS, "--health-port", "--metrics-port"):
        argv += [option, ports.get(option) or free_port()]
    return [str(arg) for arg in argv]


def _control_argv(tmp_path, ports: dict) -> list[str]:
    argv = [venv_bin("twistd"), "-n", "--pidfile=", "mesh-control", "--state-dir", tmp_path / "state",
            "--address", ADDRESS]
    for option in CONTROL_PORTS:
        argv += [option, ports.get(option) or free_port()]
    return [str(arg) for arg in argv]


def _run(argv, cwd) -> tuple[int, str]:
    done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=60)
    return done.returncode, done.stdout.decode(errors="replace")


def _assert_one_line(returncode: int, output: str, *expected: str) -> None:
    assert returncode != 0, output
    assert "Traceback" not in output, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    for text in expected:
        assert text in lines[0], output


@pytest.mark.parametrize("option", PROXY_PORTS)
def test_mesh_proxy_names_the_taken_port_and_its_option(tmp_path, taken_port, option):
    returncode, output = _run(_proxy_argv(tmp_path, {option: taken_port}), tmp_path)
    _assert_one_line(returncode, output, f"{ADDRESS}:{taken_port} is already in use", option)


@pytest.mark.parametrize("option", CONTROL_PORTS)
def test_mesh_control_names_the_taken_port_and_its_option(tmp_path, taken_port, option):
    returncode, output = _run(_control_argv(tmp_path, {option: taken_port}), tmp_path)
    _assert_one_line(returncode, output, f"{ADDRESS}:{taken_port} is already in use", option)


def test_two_listeners_given_the_same_port_are_named_together(tmp_path):
    port = free_port()
    returncode, output = _run(_proxy_argv(tmp_path, {"--outbound-port": port, "--admin-port": port}), tmp_path)
    _assert_one_line(returncode, output, "--outbound-port", "--admin-port", str(port))


def test_a_taken_metrics_port_is_logged_and_the_sidecar_serves(tmp_path, taken_port):
    """The metrics port is optional, like the health port (tests/integration/test_health_port.py)."""
    admin_port = free_port()
    argv = _proxy_argv(tmp_path, {"--metrics-port": taken_port, "--admin-port": admin_port})
    log_path = tmp_path / "proxy.log"
    with open(log_path, "wb") as log:
        proxy = subprocess.Popen(argv, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: http_request(ADDRESS, admin_port, "/ready")[0] == 200, 30.0, what="the sidecar's /ready")
    finally:
        proxy.terminate()
        proxy.wait(20)
    text = log_path.read_text()
    assert f"metrics are not served: cannot listen on {ADDRESS}:{taken_port}" in text, text
    assert "--metrics-port" in text and "Traceback" not in text, text
