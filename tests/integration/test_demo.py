"""``meshctl demo``: the whole demo mesh as real processes, its tour, and a clean stop every way it can end.

These tests use the demo's fixed addresses (127.0.10.1-4, ports 8080, 15001,
15006, 15021, 15090, admin ports 15101-15104, and the control plane's 127.0.0.1:15012 and
15014), so nothing else may hold them meanwhile.
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

from mesh.demo.runner import APP_PORT, CONFIG_DIR, CONTROL_ADDRESS, CONTROL_PORT, WORKLOADS, demo_ports
from tests.harness import venv_bin

#: Seconds one demo run may take: start-up, a 500-request tour, shutdown.
DEMO_TIMEOUT = 90.0
DEMO_PORTS = [(address, port) for address, port, _what in demo_ports()]
#: The control plane, then an app and a sidecar per workload.
CHILDREN = 1 + 2 * len(WORKLOADS)


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
    assert len(pids) == CHILDREN, output
    assert alive(pids) == [], f"children still running after meshctl exited\n{output}"
    assert listening(DEMO_PORTS) == [], f"ports still served after meshctl exited\n{output}"


@pytest.fixture(autouse=True)
def demo_ports_free(fixed_ports_lock):
    """Fail up front, and clearly, if something already serves the demo's ports."""
    taken = listening(DEMO_PORTS)
    if taken:
        pytest.fail(f"the demo's ports are in use before the test: {', '.join(taken)}; "
                    "stop the process holding them (`ss -ltnp`)")


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([venv_bin("meshctl"), "demo", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=DEMO_TIMEOUT)


def workload(name):
    return next(workload for workload in WORKLOADS if workload.name == name)


def test_tour_passes_and_stops_every_child(tmp_path):
    started = time.monotonic()
    result = run_demo("--exit-after-tour", "--state-dir", str(tmp_path))
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    split = re.search(r"500 x GET /profile, Host: user-service.demo -> v1: (\d+), v2: (\d+)", result.stdout)
    assert split, output
    v1, v2 = map(int, split.groups())
    assert v1 + v2 == 500 and v1 > v2, output
    summary = re.search(r"(\d+) of (\d+) steps passed", result.stdout)
    assert summary and summary[1] == summary[2] and int(summary[1]) >= 10, output

    # live config change: the tour edits the copied config, the control plane pushes it, the split follows
    assert "Live config change" in result.stdout, output
    splits = {}
    for weights, v1, v2 in re.findall(r"weights (\d+/\d+): 200 x GET /profile, Host: user-service.demo "
                                      r"-> v1: (\d+), v2: (\d+)", result.stdout):
        splits[weights] = (int(v1), int(v2))
    assert sorted(splits) == ["0/100", "50/50"], output
    assert sum(splits["50/50"]) == 200 and 60 <= splits["50/50"][1] <= 140, output
    assert splits["0/100"] == (0, 200), output
    assert re.search(r"canary set to 50/50: every proxy ACKed the new config in [\d.]+s", result.stdout), output
    assert "canary restored to 90/10: every proxy ACKed it" in result.stdout, output
    assert re.search(r"frontend/frontend .* SYNCED", result.stdout), output
    copied = tmp_path / "mesh-config" / "user-service.yaml"
    assert copied.read_text() == (CONFIG_DIR / "user-service.yaml").read_text(), "90/10 not restored"

    # the sidecars get their config from the control plane only; it watches the copy
    control_argv = (tmp_path / "logs" / "control-plane.log").read_text().splitlines()[0]
    assert f"--config-dir {tmp_path / 'mesh-config'}" in control_argv, control_argv
    for name in (w.name for w in WORKLOADS):
        argv = (tmp_path / "logs" / f"{name}-sidecar.log").read_text().splitlines()[0]
        assert "mesh-proxy" in argv and "--control 127.0.0.1:15012" in argv and "--config-dir" not in argv, argv
    assert "HTTP 404, x-mesh-flags: NR" in result.stdout
    assert "user-service-v1 served attempt 2" in result.stdout, output

    # who is calling: each app sees its caller's SPIFFE id
    frontend, user = workload("frontend").spiffe_id, workload("user-service-v1").spiffe_id
    assert frontend == "spiffe://cluster.local/ns/frontend/sa/frontend-service-account"
    assert user == "spiffe://cluster.local/ns/demo/sa/user-service"
    assert f"user-service-v1 app sees URI={frontend}" in result.stdout, output
    assert f"user-service-v2 app sees URI={frontend}" in result.stdout, output
    assert f"payment-service app sees URI={user}" in result.stdout, output

    # authorization: frontend -> user-service 200, frontend -> payment-service 403, user-service -> payment-service 200
    assert "frontend -> GET /account, Host: user-service.demo -> HTTP 200 from user-service-v" in result.stdout, output
    denied = re.search(r"frontend -> GET /account, Host: payment-service.demo -> HTTP 403, x-mesh-flags: RBAC\n"
                       r"\s+the sidecar says: RBAC: access denied\n", result.stdout)
    assert denied, output
    assert "user-service-v1 -> GET /account, Host: payment-service -> HTTP 200 from payment-service" in result.stdout

    # STRICT mTLS: plaintext to an inbound port gets no HTTP answer
    # gRPC: a call through two sidecars, a denial and a route miss as gRPC statuses
    frontend_id = "spiffe://cluster.local/ns/frontend/sa/frontend-service-account"
    assert (f"frontend -> gRPC /demo.Greeter/SayHello, :authority greeter.demo -> OK: hello tour, from greeter; "
            f"you are {frontend_id}") in result.stdout, output
    assert ("user-service-v1 -> gRPC /demo.Greeter/SayHello, :authority greeter.demo -> PERMISSION_DENIED: "
            "RBAC: access denied (x-mesh-flags: RBAC)") in result.stdout, output
    assert re.search(r"frontend -> gRPC /demo.Unknown/Call, :authority greeter.demo -> UNIMPLEMENTED: .*"
                     r"\(x-mesh-flags: NR\)", result.stdout), output
    assert "reports peer authentication mode STRICT" in result.stdout, output
    assert "the connection was closed without an HTTP answer" in result.stdout, output
    assert "\u2718" not in result.stdout and "[FAIL]" not in result.stdout, output

    # what the metrics say: a table from the sidecars' /stats/prometheus, destination side
    metrics = result.stdout[result.stdout.index("What the metrics say"):]
    assert re.search(r"service +requests +rate +success +p99 +response codes", metrics), output
    rows = {name: (int(requests), codes) for name, requests, codes in re.findall(
        r"^\s+(\S+-service) +(\d+) +[\d.]+/s +[\d.]+% +[\d.]+ ms +(.*)$", metrics, re.MULTILINE)}
    assert sorted(rows) == ["payment-service", "user-service"], output
    assert all(requests > 0 for requests, _codes in rows.values()), output
    assert rows["user-service"][0] >= 500 + 2 * 200 + 20 + 10, output
    assert re.search(r"\b403: [1-9]", rows["payment-service"][1]), output
    assert "job_name: txmesh-sidecars" in metrics and "metrics_path: /stats/prometheus" in metrics, output
    targets = ", ".join(f"'{w.address}:15090'" for w in WORKLOADS)
    assert f"targets: [{targets}]" in metrics and "targets: ['127.0.0.1:15014']" in metrics, output
    assert "Grafana:" in metrics, output

    assert sorted(path.name for path in (tmp_path / "logs").iterdir()) == sorted(
        ["control-plane.log"]
        + [f"{workload.name}-{kind}.log" for workload in WORKLOADS for kind in ("app", "sidecar")])
    tokens = {path.name: path for path in (tmp_path / "tokens").iterdir()}
    assert sorted(tokens) == sorted(f"{workload.name}.token" for workload in WORKLOADS)
    for path in tokens.values():
        assert path.stat().st_mode & 0o777 == 0o600, path
        assert path.read_text().strip() not in output, "a join token was printed"
    assert (tmp_path / "control" / "root-cert.pem").is_file()
    assert_nothing_left(output)
    assert elapsed < 45, f"the demo took {elapsed:.1f}s\n{output}"


@pytest.mark.parametrize("address, port, what", [
    (workload("payment-service").address, APP_PORT, "payment-service app"),
    (CONTROL_ADDRESS, CONTROL_PORT, "control plane CA"),
], ids=["app-port", "control-plane-port"])
def test_a_taken_port_is_named_and_nothing_starts(tmp_path, address, port, what):
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the previous test's TIME_WAITs
        squatter.bind((address, port))
        squatter.listen()
        result = run_demo("--exit-after-tour", "--state-dir", str(tmp_path))
        others = [pair for pair in DEMO_PORTS if pair != (address, port)]
        assert listening(others) == [], result.stdout + result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{address}:{port}  ({what}): in use" in result.stderr
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
