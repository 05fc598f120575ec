"""``meshctl up``, ``meshctl run`` and ``meshctl down`` with real processes: a control plane, sidecars, apps.

One control plane (``meshctl up`` on free ports, a state directory of its own) serves the module;
each test starts its workloads with ``meshctl run`` and stops them.  The sidecars' ports come from
meshctl's range (16000-19999), the apps' from the harness's.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from mesh.cli.local import running
from tests.harness import free_port, venv_bin, wait_for
from tests.integration.local_mesh_support import LocalMeshUnderTest, app_command, hello_config, meshctl


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    mesh = LocalMeshUnderTest(tmp_path_factory.mktemp("local-mesh"), hello_config(weights=(100, 0)))
    mesh.up()
    yield mesh
    mesh.clean_up()
    assert mesh.log_alarms() == []


def _get(port: int, path: str = "/", host: str | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        body = response.read()
        return response.status, (json.loads(body) if body.startswith(b"{") else {"text": body.decode()})
    finally:
        conn.close()


def test_up_is_idempotent_and_says_how_to_reach_the_control_plane(local):
    record = local.mesh.control()
    again = local.up()
    assert f"The local control plane is already up (pid {record['process']['pid']})" in again.stdout
    assert f"admin          http://127.0.0.1:{local.admin_port}/ready" in again.stdout
    assert f"(meshctl proxy-status --control-admin 127.0.0.1:{local.admin_port})" in again.stdout
    assert f"CA and config  127.0.0.1:{local.port} (mTLS)" in again.stdout
    assert f"config         {local.config_dir}" in again.stdout
    assert f"meshctl run --state-dir {local.state_dir} --service NAME --port PORT -- COMMAND" in again.stdout
    assert local.mesh.control()["process"] == record["process"]
    ready = json.loads(subprocess.run(["curl", "-s", f"http://127.0.0.1:{local.admin_port}/ready"],
                                      capture_output=True, timeout=10).stdout)
    assert ready["ready"] is True


def test_up_with_other_options_than_the_running_control_plane_says_to_go_down_first(local):
    result = local.meshctl("up", "--port", local.port + 1)
    assert result.returncode == 1
    assert f"meshctl up: the local control plane already runs (pid {local.mesh.control()['process']['pid']}) with " \
           f"--port {local.port} (not {local.port + 1}); to change that, stop it first: " \
           f"`meshctl down --state-dir {local.state_dir}`" in result.stderr


def test_a_workload_gets_mtls_identity_registration_and_its_outbound_address(local, tmp_path):
    app_port = free_port()
    env_file = tmp_path / "env.txt"
    command = ["sh", "-c", f'echo "$TXMESH_OUTBOUND $TXMESH_WORKLOAD $TXMESH_SERVICE $PORT" > {env_file}; '
                           f'exec "$@"', "sh", *app_command("hello-v1", app_port)]
    started = local.run("--service", "hello", "--port", app_port, "--label", "version=v1", "--", *command)
    caller = local.run("--service", "frontend", "--", "sleep", "600")
    try:
        hello, frontend = local.record("hello-v1"), local.record("frontend")
        outbound = frontend["ports"]["outbound"]
        assert "hello-v1 is up: service hello.default, identity spiffe://cluster.local/ns/default/sa/hello" \
            in started.stdout
        assert f"inbound   127.0.0.1:{hello['ports']['inbound']} (mTLS) -> the app" in started.stdout
        assert f"outbound  http://127.0.0.1:{outbound}   the app calls other services here" in caller.stdout
        assert f"admin     http://127.0.0.1:{frontend['ports']['admin']}/config_dump" in caller.stdout
        assert "--control 127.0.0.1:%d" % local.port in started.stdout and "--token-file" in started.stdout
        assert f"stop it with: meshctl down --state-dir {local.state_dir} frontend" in caller.stdout
        assert env_file.read_text().split() == [f"http://127.0.0.1:{hello['ports']['outbound']}", "hello-v1",
                                                "hello", str(app_port)]
        # the caller reaches the service by name, over mTLS: the app sees the caller's verified identity
        status, echo = _get(outbound, "/who", host="hello")
        assert status == 200 and echo["service"] == "hello-v1", echo
        assert echo["headers"]["x-forwarded-client-cert"].endswith("URI=spiffe://cluster.local/ns/default/sa/frontend")
        # the control plane lists both proxies, hello-v1 with its inbound port and labels (its endpoint)
        proxies = {row["workload"]: row for row in json.loads(subprocess.run(
            ["curl", "-s", f"http://127.0.0.1:{local.admin_port}/proxies"], capture_output=True, timeout=10).stdout)}
        assert proxies["hello-v1"]["inbound_port"] == hello["ports"]["inbound"]
        assert proxies["hello-v1"]["labels"] == {"app": "hello", "version": "v1"}
        assert not proxies["frontend"]["stale"]
    finally:
        assert local.meshctl("down", "hello-v1", "frontend").returncode == 0
    for record in (hello, frontend):
        assert not any(running(record[key]) for key in ("supervisor", "app", "sidecar")), record
    assert not local.mesh.run_path("hello-v1").exists()
    assert local.mesh.control() is not None, "meshctl down NAME stops the workload only"


SIGNAL_APP = textwrap.dedent("""
    import pathlib, signal, sys
    out = pathlib.Path(sys.argv[1])
    def hup(signum, frame):
        out.write_text(out.read_text() + "HUP\\n")
    signal.signal(signal.SIGHUP, hup)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(3))
    out.write_text("started\\n")
    while True:
        signal.pause()
""")


def _foreground(local, *args) -> subprocess.Popen:
    return subprocess.Popen([venv_bin("meshctl"), "run", "--state-dir", str(local.state_dir), *map(str, args)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ready_record(local, name, process):
    def ready():
        if process.poll() is not None:
            raise AssertionError(f"meshctl run exited {process.returncode}: {process.communicate()}")
        path = local.mesh.run_path(name)
        record = json.loads(path.read_text()) if path.exists() else None
        return record if record and record["state"] == "ready" else None
    return wait_for(ready, timeout=60, what=f"meshctl run {name} ready")


def test_run_forwards_signals_to_the_app_and_stops_both_on_sigterm(local, tmp_path):
    script, out = tmp_path / "app.py", tmp_path / "out.txt"
    script.write_text(SIGNAL_APP)
    process = _foreground(local, "--service", "signals", "--", sys.executable, str(script), str(out))
    try:
        record = _ready_record(local, "signals", process)
        wait_for(lambda: out.exists() and out.read_text() == "started\n", what="the app started")
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: out.read_text() == "started\nHUP\n", what="SIGHUP forwarded to the app")
        assert running(record["sidecar"]) and process.poll() is None
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 3, (stdout, stderr)
    assert "signals is up: service signals.default" in stdout
    assert not running(record["sidecar"]) and not running(record["app"])
    assert not local.mesh.run_path("signals").exists()


def test_run_stops_the_sidecar_when_the_app_exits_and_exits_with_its_status(local):
    process = _foreground(local, "--service", "oneshot", "--", sys.executable, "-c",
                          "import time, sys; time.sleep(0.5); sys.exit(7)")
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 7, (stdout, stderr)
    sidecar_pid = int(stdout.rsplit("(pid ", 1)[1].split(")")[0])
    assert not os.path.exists(f"/proc/{sidecar_pid}") or "Z" in open(f"/proc/{sidecar_pid}/stat").read().split()[2]
    assert not local.mesh.run_path("oneshot").exists()


def test_run_stops_the_app_when_the_sidecar_dies(local):
    process = _foreground(local, "--service", "orphan", "--", "sleep", "600")
    try:
        record = _ready_record(local, "orphan", process)
        os.kill(record["sidecar"]["pid"], signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1
    assert "meshctl run: the sidecar of orphan exited with status -9; stopping the app" in stderr
    assert "--- last lines of" in stderr
    wait_for(lambda: not running(record["app"]), what="the app stopped")


def test_a_second_workload_with_the_same_name_is_refused(local):
    local.run("--service", "twice", "--", "sleep", "600")
    try:
        result = local.meshctl("run", "--service", "twice", "--", "sleep", "600")
        assert result.returncode == 1
        assert "meshctl run: a workload named twice already runs (meshctl run, pid " in result.stderr
        assert f"give this one another --name, or stop that one: `meshctl down --state-dir {local.state_dir} twice`" \
            in result.stderr
    finally:
        local.meshctl("down", "twice")


@pytest.mark.parametrize("args, message", [
    (["--service", "web"], "give the app's command after --, e.g. `meshctl run --service web --port 8080 -- "),
    (["--service", "Web", "--", "true"], "--service 'Web' is not a DNS label: use lower-case letters"),
    (["--service", "web", "--label", "version", "--", "true"], "--label wants KEY=VALUE, got 'version'"),
    (["--service", "web", "--label", "app=other", "--", "true"],
     "--label app=other: the app label is the --service (web); leave it out or change --service"),
])
def test_run_usage_errors_say_what_to_do(local, args, message):
    result = local.meshctl("run", *args)
    assert result.returncode == 1 and f"meshctl run: {message}" in result.stderr, result
    assert "Traceback" not in result.stderr


def test_run_refuses_an_app_port_in_use(local):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = local.meshctl("run", "--service", "web", "--port", port, "--", "true")
    assert result.returncode == 1
    assert f"the app's port 127.0.0.1:{port} is in use; find the process with `ss -ltnp 'sport = :{port}'`" \
        in result.stderr
    assert "(meshctl run starts the app: if it already runs, stop it first)" in result.stderr


def test_run_says_when_the_app_does_not_listen_on_its_port(local):
    port = free_port()
    result = local.meshctl("run", "--service", "deaf", "--port", port, "--", sys.executable, "-c",
                           "import sys; sys.exit(5)")
    assert result.returncode == 1
    assert f"meshctl run: the app of deaf (listening on 127.0.0.1:{port}; does COMMAND listen on --port?): " \
           "the process exited" in result.stderr
    assert not local.mesh.run_path("deaf").exists()


def test_run_and_down_errors_without_a_control_plane_or_workload(tmp_path, local):
    state = tmp_path / "empty"
    result = meshctl("run", "--state-dir", state, "--service", "web", "--", "true")
    assert result.returncode == 1
    assert f"meshctl run: no local control plane runs for state directory {state}; start it with " \
           f"`meshctl up --state-dir {state}`" in result.stderr
    result = meshctl("down", "--state-dir", state)
    assert result.returncode == 0 and f"Nothing was running in {state}." in result.stdout
    result = local.meshctl("down", "nosuch")
    assert result.returncode == 1
    assert f"meshctl down: no workload named nosuch runs in {local.state_dir} (running: " in result.stderr


def test_up_errors_say_what_to_do(tmp_path, local):
    result = meshctl("up", "--state-dir", tmp_path / "s", "--config-dir", tmp_path / "missing")
    assert result.returncode == 1
    assert f"meshctl up: --config-dir {tmp_path / 'missing'} is not a directory; create it (mkdir -p " \
           in result.stderr
    result = meshctl("up", "--state-dir", tmp_path / "s", "--port", local.port, "--admin-port", free_port())
    assert result.returncode == 1
    assert f"the control plane's CA and config port 127.0.0.1:{local.port} is in use; find the process with " \
           f"`ss -ltnp 'sport = :{local.port}'` and stop it, or choose another port with --port" in result.stderr
    assert not (tmp_path / "s" / "up.json").exists()


def test_down_stops_workloads_and_the_control_plane(tmp_path):
    mesh = LocalMeshUnderTest(tmp_path)
    try:
        mesh.up()
        mesh.run("--service", "idle", "--", "sleep", "600")
        record, control = mesh.record("idle"), mesh.mesh.control()
        result = mesh.meshctl("down")
        assert result.returncode == 0
        assert f"Stopped workload idle, the control plane. The state (CA, logs) stays in {mesh.state_dir}." \
            in result.stdout
        assert not any(running(record[key]) for key in ("supervisor", "app", "sidecar"))
        assert not running(control["process"]) and mesh.mesh.control() is None
        assert (mesh.state_dir / "control" / "root-cert.pem").exists()
    finally:
        mesh.clean_up()
    assert mesh.log_alarms() == []


def test_run_detached_reports_a_failed_start_with_the_log(local):
    port = free_port()
    result = local.meshctl("run", "-d", "--service", "crash", "--port", port, "--", sys.executable, "-c",
                           "print('cannot open my database'); raise SystemExit(4)")
    assert result.returncode == 1
    assert f"meshctl run crash: the process exited\n--- last lines of {local.state_dir / 'logs' / 'crash.log'} ---" \
        in result.stderr
    assert "cannot open my database" in result.stderr
    assert "meshctl run: the app of crash (listening on 127.0.0.1:" in result.stderr
    assert not local.mesh.run_path("crash").exists()


def test_up_refuses_one_port_for_both(tmp_path):
    port = free_port()
    result = meshctl("up", "--state-dir", tmp_path, "--port", port, "--admin-port", port)
    assert result.returncode == 1
    assert "meshctl up: cannot start the control plane:\n  --port and --admin-port must differ" in result.stderr
