"""``meshctl demo``: the whole demo mesh as real processes, its tour, and a clean stop every way it can end.

These tests use the demo's fixed addresses (127.0.10.1-4, ports 8080, 15001,
15006 and admin ports 15101-15104), so nothing else may hold them meanwhile.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import time

import pytest

from mesh.demo.runner import APP_PORT, WORKLOADS
from tests.harness import venv_bin

#: Seconds one demo run may take: start-up, a 500-request tour, shutdown.
DEMO_TIMEOUT = 90.0
DEMO_PORTS = [(address, port) for workload in WORKLOADS for address, port, _role in workload.ports]


def listening(ports) -> list[str]:
    """The address:port pairs among *ports* on which something accepts connections."""
    found = []
    for address, port in ports:
        try:
            socket.create_connection((address, port), timeout=2.0).close()
        except OSError:
            continue
        found.append(f"{address}:{port}")
    return found


def child_pids(output: str) -> list[int]:
    """The pids of the children, from the "Processes and their logs" table the demo prints."""
    return [int(pid) for pid in re.findall(r"\bpid (\d+)\b", output)]


def alive(pids) -> list[int]:
    survivors = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        survivors.append(pid)
    return survivors


def assert_nothing_left(output: str) -> None:
    pids = child_pids(output)
    assert len(pids) == 2 * len(WORKLOADS), output
    assert alive(pids) == [], f"children still running after meshctl exited\n{output}"
    assert listening(DEMO_PORTS) == [], f"ports still served after meshctl exited\n{output}"


@pytest.fixture(autouse=True)
def demo_ports_free():
    """Fail up front, and clearly, if something already serves the demo's ports."""
    taken = listening(DEMO_PORTS)
    if taken:
        pytest.fail(f"the demo's ports are in use before the test: {', '.join(taken)}; "
                    "stop the process holding them (`ss -ltnp`)")


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([venv_bin("meshctl"), "demo", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=DEMO_TIMEOUT)


def test_tour_passes_and_stops_every_child(tmp_path):
    result = run_demo("--exit-after-tour", "--state-dir", str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    split = re.search(r"500 x GET /profile, Host: user-service -> v1: (\d+), v2: (\d+)", result.stdout)
    assert split, output
    v1, v2 = map(int, split.groups())
    assert v1 + v2 == 500 and v1 > v2, output
    assert "7 of 7 steps passed" in result.stdout
    assert "HTTP 404, x-mesh-flags: NR" in result.stdout
    assert sorted(path.name for path in (tmp_path / "logs").iterdir()) == sorted(
        f"{workload.name}-{kind}.log" for workload in WORKLOADS for kind in ("app", "sidecar"))
    assert_nothing_left(output)


def test_a_taken_port_is_named_and_nothing_starts(tmp_path):
    payment = next(workload for workload in WORKLOADS if workload.name == "payment-service")
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the previous test's TIME_WAITs
        squatter.bind((payment.address, APP_PORT))
        squatter.listen()
        result = run_demo("--exit-after-tour", "--state-dir", str(tmp_path))
        others = [pair for pair in DEMO_PORTS if pair != (payment.address, APP_PORT)]
        assert listening(others) == [], result.stdout + result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{payment.address}:{APP_PORT}  (payment-service app): in use" in result.stderr
    assert "ss -ltnp" in result.stderr
    assert "Traceback" not in result.stderr
    assert child_pids(result.stdout) == []


def read_until(process: subprocess.Popen, marker: bytes, timeout: float) -> bytes:
    """Read the process's stdout until *marker* appears; fail on EOF or after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    fd = process.stdout.fileno()
    seen = b""
    while marker not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise AssertionError(f"no {marker!r} within {timeout:g}s; output so far:\n{seen.decode()}")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"meshctl exited ({process.wait()}) before {marker!r}:\n{seen.decode()}")
        seen += chunk
    return seen


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_after_the_tour_stops_every_child(tmp_path, signum):
    process = subprocess.Popen([venv_bin("meshctl"), "demo", "--state-dir", str(tmp_path)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        before = read_until(process, b"stays up until you press Ctrl-C", DEMO_TIMEOUT)
        assert len(listening(DEMO_PORTS)) == len(DEMO_PORTS), before.decode()
        process.send_signal(signum)
        rest, _ = process.communicate(timeout=DEMO_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = (before + rest).decode()
    assert process.returncode == 0, output
    assert f"{signal.Signals(signum).name} received" in output
    assert_nothing_left(output)
