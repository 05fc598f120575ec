"""docs/quickstart.md, run exactly as written: every ```sh block, in order, in one bash.

The blocks are extracted from the page and run with ``set -euo pipefail`` from the checkout (the page's
first block activates .venv), with HOME in a temporary directory (so ``~/.txmesh`` and
``~/txmesh-quickstart`` are the test's own).  Each block's output is then held to what the page
promises: the pre-flight passes, the YAML validates, both versions get their identity, the app sees
the frontend's SPIFFE id over mTLS, the canary splits about 90/10, the intruder gets 403, the metrics
show both versions, every sidecar is SYNCED and every check passes, and ``meshctl down`` leaves no
process behind.  Whatever the page still runs after a failure or the deadline is stopped, then killed.

The page uses fixed ports (it names them), so nothing else may hold them meanwhile.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mesh.demo.runner import bind_problem
from tests.harness import REPO_ROOT, venv_dir

PAGE = REPO_ROOT / "docs" / "quickstart.md"
#: The ports the page names: the control plane's, the apps', and the sidecar ports it fixes.
PAGE_PORTS = (15012, 15014, 8081, 8082, 8083, 8084, 15001, 15002, 15090)
#: Seconds the whole page may take (it takes about 25 s).
DEADLINE = 120.0
WALL_TIME_BUDGET = 60.0
MARK = "@@quickstart-block"


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``[(language, body)]`` of the page's fenced code blocks, in order."""
    return [(match[1], match[2]) for match in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", text,
                                                          re.MULTILINE | re.DOTALL)]


def script(blocks: list[str]) -> str:
    """One bash script: each block after a marker line, so the transcript splits back into blocks."""
    parts = ["set -euo pipefail", f"cd {REPO_ROOT}"]
    for index, block in enumerate(blocks):
        parts += [f"echo '{MARK} {index}'", block.rstrip("\n")]
    parts.append(f"echo '{MARK} end'")
    return "\n".join(parts) + "\n"


def split_transcript(transcript: str, count: int) -> list[str]:
    pieces = re.split(rf"^{MARK} (\d+|end)\n", transcript, flags=re.MULTILINE)
    outputs = {pieces[i]: pieces[i + 1] for i in range(1, len(pieces) - 1, 2)}
    return [outputs.get(str(index), "") for index in range(count)]


def processes_under(directory: Path) -> list[int]:
    """Pids of the processes whose working directory is under *directory* (what the page started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (cwd == directory or directory in cwd.parents):
            pids.append(int(entry.name))
    return pids


def stop_everything(home: Path) -> None:
    """``meshctl down``, then SIGKILL for anything the page started that still runs."""
    subprocess.run([str(venv_dir() / "bin" / "meshctl"), "down", "--state-dir", str(home / ".txmesh")],
                   capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    for pid in processes_under(home):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture()
def page_ports_free(fixed_ports_lock):
    taken = [port for port in PAGE_PORTS if bind_problem("127.0.0.1", port)]
    if taken:
        pytest.fail(f"the quickstart's ports are in use: {taken}; stop what holds them (`ss -ltnp`) -- "
                    "another meshctl up or meshctl demo?")


def test_the_quickstart_runs_as_written(tmp_path, page_ports_free):
    if venv_dir() != REPO_ROOT / ".venv":
        pytest.fail(f"the page activates .venv of the checkout, but the venv is {venv_dir()}; run `make bootstrap`")
    text = PAGE.read_text()
    blocks = fenced_blocks(text)
    shell = [body for language, body in blocks if language == "sh"]
    assert len(shell) >= 10, f"the page should walk through its steps in ```sh blocks, found {len(shell)}"
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["HOME"] = str(home)
    started = time.monotonic()
    process = subprocess.Popen(["bash", "-c", script(shell)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        transcript, _ = process.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        transcript, _ = process.communicate()
        stop_everything(home)
        pytest.fail(f"the quickstart did not finish in {DEADLINE:g}s:\n{transcript}")
    elapsed = time.monotonic() - started
    left_running = processes_under(home)
    alarms = [line for log in (home / ".txmesh" / "logs").glob("*.log")
              for line in log.read_text(errors="replace").splitlines() if "Traceback" in line]
    stop_everything(home)

    outputs = split_transcript(transcript, len(shell))
    failed_at = next((index for index in range(len(shell)) if f"{MARK} {index + 1}\n" not in transcript
                      and index < len(shell) - 1), None)
    assert process.returncode == 0, (f"block {failed_at} of the quickstart failed (exit {process.returncode}):\n"
                                     f"{shell[failed_at] if failed_at is not None else ''}\n--- transcript ---\n"
                                     f"{transcript}")
    assert left_running == [], f"meshctl down left processes running: {left_running}\n{transcript}"
    assert alarms == [], alarms
    assert elapsed < WALL_TIME_BUDGET, f"the quickstart took {elapsed:.1f}s"

    def output_of(command: str) -> str:
        """The output of the block that runs *command*."""
        index = next(i for i, block in enumerate(shell) if command in block)
        return outputs[index]

    def text_after(command: str) -> str:
        """The ```text block right after the ```sh block that runs *command* (what the page shows)."""
        index = next(i for i, (language, body) in enumerate(blocks) if language == "sh" and command in body)
        language, body = blocks[index + 1]
        assert language == "text", f"the page shows no output after {command!r}"
        return body

    # nothing goes into the txmesh package, and the apps and config live in a fresh directory
    assert not re.search(r"(^|[\s=])(\./)?mesh/", "\n".join(shell), re.MULTILINE), "config written into mesh/"
    assert (home / "txmesh-quickstart" / "mesh-config" / "hello.yaml").exists()

    preflight = output_of("meshctl check --pre")
    assert "PASS  install:" in preflight and "FAIL" not in preflight, preflight
    assert "5 resource(s) in 2 file(s): valid" in output_of("meshctl validate") and \
        "`5 resource(s) in 2 file(s): valid`" in text
    assert "The local control plane is up" in output_of("meshctl up")

    started_workloads = output_of("meshctl run -d --service hello")
    for name, identity in (("hello-v1", "hello"), ("hello-v2", "hello"), ("frontend", "frontend"),
                           ("intruder", "intruder")):
        assert f"{name} is up: service {identity}.default, identity spiffe://cluster.local/ns/default/sa/{identity}" \
            in started_workloads, started_workloads
    assert "outbound  http://127.0.0.1:15001 " in started_workloads
    assert "metrics   http://127.0.0.1:15090/stats/prometheus" in started_workloads

    # mTLS: the app sees the frontend's verified identity
    call = output_of("curl -s -H 'Host: hello' http://127.0.0.1:15001/\n")
    assert re.fullmatch(r'\{"service": "hello-v[12]", "caller": "By=spiffe://cluster\.local/ns/default/sa/hello;'
                        r'Hash=[0-9a-f]{64};Subject=\\"\\";URI=spiffe://cluster\.local/ns/default/sa/frontend"\}\n',
                        call), call
    assert "URI=spiffe://cluster.local/ns/default/sa/frontend" in text_after("http://127.0.0.1:15001/\n")

    # the canary: 200 requests, about 90/10 (v2: 20 expected, standard deviation 4.2)
    counts = {version: int(count) for count, version in
              re.findall(r"^\s*(\d+) (hello-v[12])$", output_of("[1-200]"), re.MULTILINE)}
    assert sum(counts.values()) == 200, output_of("[1-200]")
    assert 5 <= counts.get("hello-v2", 0) <= 45, counts
    shown = {version: int(count) for count, version in re.findall(r"(\d+) (hello-v[12])", text_after("[1-200]"))}
    assert sum(shown.values()) == 200 and 5 <= shown["hello-v2"] <= 45, shown

    # the denied caller
    denied = output_of("http://127.0.0.1:15002/")
    assert denied == "RBAC: access denied\nHTTP 403\n", denied
    assert text_after("http://127.0.0.1:15002/") == denied

    # metrics, sync status, checks
    observed = output_of("meshctl proxy-status")
    series = re.findall(r'^istio_requests_total\{(.*)\} (\d+(?:\.\d+)?)$', observed, re.MULTILINE)
    by_version = {}
    for labels, value in series:
        if 'source_principal="spiffe://cluster.local/ns/default/sa/frontend"' in labels \
                and 'response_code="200"' in labels:
            version = re.search(r'destination_version="(v\d)"', labels)[1]
            by_version[version] = by_version.get(version, 0) + float(value)
    assert set(by_version) == {"v1", "v2"} and sum(by_version.values()) == 201, observed
    status_rows = [line for line in observed.splitlines() if "spiffe://" in line and " SYNCED " in line]
    assert len(status_rows) == 4, observed
    assert "PASS  proxy hello-v1:" in observed and "PASS  config sync: 4 proxies, all SYNCED" in observed
    assert "FAIL" not in observed and "WARN" not in observed, observed

    # stop: nothing left, and the intruder's 403 in its access log
    stopped = output_of("meshctl down")
    assert "Stopped workload frontend, workload hello-v1, workload hello-v2, workload intruder, the control plane" \
        in stopped, stopped
    assert '"response_code":403' in stopped and '"authority":"hello"' in stopped, stopped
