"""``twistd mesh-proxy`` as a daemon (issue #10, item 11): the launching shell gets its prompt back.

``x=$(twistd --pidfile=P --logfile=L mesh-proxy ...)`` used to hang: the access log held a copy of
the shell's stdout (a pipe) in the daemon, so the shell never saw the pipe close.  Daemonized, the
access log goes to twistd's log file instead (docs/operations.md, "Daemon mode").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests.harness import free_port, venv_bin, wait_for
from tests.harness.net import http_request
from tests.integration.test_proxy_support import endpoint, service_entry, write_config

#: How long twistd may take to daemonize and return (it returns once the daemon has started).
LAUNCH_DEADLINE = 20.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def daemon(tmp_path, backend_factory):
    """Launch the daemon as a shell's ``$(...)`` would: stdout and stderr are pipes read to their end."""
    backend = backend_factory("daemon-app")
    config = write_config(tmp_path / "config", service_entry("daemon-app", [endpoint(backend)]))
    pidfile, logfile = tmp_path / "proxy.pid", tmp_path / "proxy.log"
    admin_port, outbound_port = free_port(), free_port()
    argv = [venv_bin("twistd"), f"--pidfile={pidfile}", f"--logfile={logfile}", "mesh-proxy",
            "--config-dir", config, "--workload", "daemon", "--outbound-port", outbound_port,
            "--admin-port", admin_port, "--health-port", "0", "--metrics-port", "0"]
    launched = subprocess.Popen([str(arg) for arg in argv], cwd=tmp_path, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = launched.communicate(timeout=LAUNCH_DEADLINE)
    except subprocess.TimeoutExpired:
        _stop(pidfile)  # the daemon holds the pipes: reading them to their end would wait forever
        launched.kill()
        launched.stdout.close()
        launched.stderr.close()
        launched.wait()
        pytest.fail(f"twistd did not return within {LAUNCH_DEADLINE:.0f}s: something in the daemon holds the "
                    "launching shell's stdout or stderr open")
    try:
        yield {"returncode": launched.returncode, "output": out + err, "pidfile": pidfile, "logfile": logfile,
               "admin_port": admin_port, "outbound_port": outbound_port}
    finally:
        _stop(pidfile)


def _stop(pidfile) -> None:
    """Stop the daemon by its pidfile (SIGTERM), and wait until it is gone."""
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        wait_for(lambda: not _pid_alive(pid), 20.0, what=f"daemon {pid} to exit after SIGTERM")
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        raise


def test_daemon_returns_serves_and_logs_access_lines_to_its_log_file(daemon):
    assert daemon["returncode"] == 0, daemon["output"]
    assert daemon["output"] == b"", daemon["output"]
    pid = int(daemon["pidfile"].read_text())
    assert _pid_alive(pid)
    wait_for(lambda: http_request("127.0.0.1", daemon["admin_port"], "/ready")[0] == 200, 20.0,
             what="the daemon's /ready")
    status, body = http_request("127.0.0.1", daemon["outbound_port"], "/from-the-daemon",
                                headers={"Host": "daemon-app", "x-request-id": "daemon-mode-1"})
    assert status == 200, body

    def access_line():
        for line in daemon["logfile"].read_text(errors="replace").splitlines():
            if '"request_id":"daemon-mode-1"' in line:
                return line
        return None

    line = wait_for(access_line, 10.0, what="the access-log line in the daemon's log file")
    record = json.loads(line[line.index("{"):])
    assert record["path"] == "/from-the-daemon" and record["response_code"] == 200
    _stop(daemon["pidfile"])
    assert not _pid_alive(pid)
    assert "Traceback" not in daemon["logfile"].read_text(errors="replace")
