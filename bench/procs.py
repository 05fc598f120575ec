"""Process management for the bench: start, wait for readiness, read /proc, clean up.

Every long-lived process runs in its own session (and so its own process
group), so that stopping it also stops whatever it forked (nginx's worker,
a shell wrapper's child).  :class:`ManagedProcess` is a context manager and the
orchestrator keeps all of them in one :class:`contextlib.ExitStack`, so every
process is stopped on normal exit, on failure and on Ctrl-C.

Readiness is always a poll with a deadline (an HTTP 200),
never a sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL_INTERVAL = 0.05  # seconds between readiness probes


class BenchError(RuntimeError):
    """A failure the harness reports to the user as one clear message."""


def run_main(name: str, run, args) -> int:
    """Run a benchmark's ``run(args)`` as a command: SIGTERM unwinds like Ctrl-C (every started
    process is stopped), a :class:`BenchError` is one line on stderr (exit 1), Ctrl-C exits 130."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(args)
    except BenchError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted; all processes stopped", file=sys.stderr)
        return 130


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (empty log)"


class ManagedProcess:
    """One long-lived child process with its output in a log file.

    ``name`` is used in messages; ``log_path`` receives stdout and stderr.
    ``grace`` is how long :meth:`stop` waits after SIGTERM before SIGKILL.
    Use as a context manager, or call :meth:`stop` yourself.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        cwd: Path | None = None,
        env: dict | None = None,
        grace: float = 5.0,
    ):
        self.name = name
        self.grace = grace
        self.argv = list(argv)
        self.log_path = log_path
        with open(log_path, "wb") as log:
            try:
                self.popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                )
            except FileNotFoundError as exc:
                raise BenchError(f"{name}: cannot run {self.argv[0]!r}: {exc.strerror}") from exc

    @property
    def pid(self) -> int:
        return self.popen.pid

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def check_alive(self) -> None:
        """Raise :class:`BenchError` with the log's tail if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise BenchError(
                f"{self.name} exited with code {code}; command:\n    {' '.join(self.argv)}\n"
                f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
            )

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL it after ``self.grace`` seconds."""
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(self.grace)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while children of its group live on.
        _signal_group(self.pid, signal.SIGKILL)
        self.popen.wait()

    def wait_until(self, probe, what: str, timeout: float) -> None:
        """Poll ``probe()`` until it returns true, the process dies, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if probe():
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} not ready after {timeout:.0f}s (waited for {what}); "
                    f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            time.sleep(POLL_INTERVAL)

    def wait_for_http(self, url: str, timeout: float = 20.0, host: str | None = None) -> None:
        self.wait_until(lambda: http_ok(url, host), f"200 from {url}", timeout)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def http_get(url: str, host: str | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    """GET ``url`` (with an optional Host header and other ``headers``); return (status, body),
    or (0, b"") if unreachable."""
    request = urllib.request.Request(url, headers={**(headers or {}), **({"Host": host} if host else {})})
    try:
        with urllib.request.urlopen(request, timeout=2.0) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def http_ok(url: str, host: str | None = None) -> bool:
    """True if a GET of ``url`` (with an optional Host header) answers 200."""
    return http_get(url, host)[0] == 200


def run_tool(argv: Sequence[str], timeout: float, log_path: Path) -> str:
    """Run a short-lived tool (load generator, openssl) to completion; return its stdout.

    The tool runs in its own process group, which is killed if the harness is
    interrupted or the tool overruns ``timeout``.  Its combined output is also
    written to ``log_path``.  A non-zero exit raises :class:`BenchError`.
    """
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise BenchError(f"cannot run {argv[0]!r}: {exc.strerror}; is it installed and on PATH?") from exc
    try:
        out, _ = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{argv[0]} overran {timeout:.0f}s: {' '.join(argv)}") from exc
    finally:
        if popen.poll() is None:
            _signal_group(popen.pid, signal.SIGKILL)
            popen.wait()
    text = out.decode(errors="replace")
    log_path.write_text(f"$ {' '.join(argv)}\n{text}")
    if popen.returncode != 0:
        raise BenchError(f"{argv[0]} failed with code {popen.returncode}: {' '.join(argv)}\n{text[-2000:]}")
    return text


# --- /proc readers -------------------------------------------------------------


def exe_name(pid: int) -> str:
    """Basename of the executable that ``pid`` runs now (after any exec)."""
    return os.path.basename(os.readlink(f"/proc/{pid}/exe"))


def _parent_pid(pid: str) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])  # field 4 of proc(5)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants, parents before children.

    Found by scanning the parent pid of every process in /proc, since
    /proc/PID/task/TID/children needs a kernel option this host lacks.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(_parent_pid(entry), []).append(int(entry))
            except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
                continue
    tree = [pid]
    for member in tree:  # grows while iterating: breadth-first
        tree.extend(children.get(member, ()))
    return tree


def find_process(root_pid: int, exe_prefix: str) -> int:
    """Return ``root_pid`` or its first descendant whose executable starts with ``exe_prefix``.

    Launcher scripts may exec the real binary (same pid) or spawn it as a
    child; this finds the process whose CPU and memory we must read.
    """
    for pid in process_tree(root_pid):
        try:
            if exe_name(pid).startswith(exe_prefix):
                return pid
        except FileNotFoundError:
            continue
    raise BenchError(f"no process running {exe_prefix!r} under pid {root_pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces; fields after it are space-separated.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def memory_kib(pid: int, field: str) -> int:
    """A ``Vm*`` field of /proc/``pid``/status (e.g. VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field}")


def _tree_sum(pid: int, read) -> float:
    """Sum ``read(p)`` over ``pid`` and its descendants; a descendant may exit meanwhile."""
    if not os.path.exists(f"/proc/{pid}"):
        raise BenchError(f"process {pid} has exited; see its log in the work dir")
    total = 0
    for member in process_tree(pid):
        try:
            total += read(member)
        except FileNotFoundError:
            pass
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants (a proxy may fork workers)."""
    return _tree_sum(pid, cpu_seconds)


def tree_memory_kib(pid: int, field: str) -> int:
    """A ``Vm*`` field summed over ``pid`` and its descendants, in KiB."""
    return _tree_sum(pid, lambda member: memory_kib(member, field))
