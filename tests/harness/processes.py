"""Child processes of the test run: started with their output in a log file, always stopped."""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from .waiting import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1
_live: dict[ManagedProcess, None] = {}  # insertion-ordered set of running processes
_unchecked: dict[ManagedProcess, None] = {}  # started, with log lines not yet checked for tracebacks

#: What must never appear in a process log: a Python traceback, or Twisted's "Unhandled Error".
LOG_ALARMS = ("Traceback (most recent call last)", "Unhandled Error", "Unhandled error")


def venv_dir() -> Path:
    """The virtualenv to run programs from: $MESH_VENV, else <repo>/.venv, else this interpreter's prefix."""
    if os.environ.get("MESH_VENV"):
        return Path(os.environ["MESH_VENV"])
    if (REPO_ROOT / ".venv" / "bin" / "python").exists():
        return REPO_ROOT / ".venv"
    return Path(sys.prefix)


def venv_bin(program: str) -> str:
    """Absolute path of *program* in :func:`venv_dir`'s bin/, which must exist."""
    path = venv_dir() / "bin" / program
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `make test` (it bootstraps .venv) or set MESH_VENV")
    return str(path)


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the test run dies, so no process outlives it."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ProcessExitedError(RuntimeError):
    """A managed process exited while it was expected to start up."""


class ManagedProcess:
    """A child process whose stdout and stderr go to *log_path*.

    It runs in its own process group, gets SIGTERM if the test run dies, and
    :meth:`stop` ends it (and anything it spawned). Subclasses override
    :meth:`is_ready`; :meth:`start` waits for it and fails fast, with the log
    tail, if the process exits first.

    Start processes from the main thread: the kernel sends the "parent died"
    signal when the *thread* that started the child ends.
    """

    kind = "process"
    ready_timeout = 10.0

    def __init__(self, name: str, argv: list[str], log_path: Path, *, cwd: Path | None = None,
                 env: dict | None = None):
        self.name = name
        self.argv = [str(arg) for arg in argv]
        self.log_path = Path(log_path)
        self.cwd = Path(cwd) if cwd else self.log_path.parent
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._popen: subprocess.Popen | None = None
        self._log_checked = 0  # bytes of the log already checked by :meth:`new_log_alarms`

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r} (pid {self.pid})"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()

    @classmethod
    def live(cls) -> list[ManagedProcess]:
        """The processes started and not yet stopped, oldest first."""
        return list(_live)

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self, timeout: float | None = None):
        """Start the process and wait until :meth:`is_ready`; return self."""
        self.spawn()
        try:
            self.wait_ready(self.ready_timeout if timeout is None else timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def spawn(self):
        """Start the process without waiting for it (e.g. to start several at once; then
        :meth:`wait_ready` each); return self."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shlex.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
            )
        _live[self] = None
        _unchecked[self] = None
        return self

    def is_ready(self) -> bool:
        """Whether the process serves; overridden by subclasses."""
        return True

    def wait_ready(self, timeout: float) -> None:
        """Wait until :meth:`is_ready`; raise with the log tail if the process exits or time runs out."""

        def ready():
            if self._popen.poll() is not None:
                raise ProcessExitedError(
                    self.describe(f"{self} exited with {self._popen.returncode} before it was ready"))
            return self.is_ready()

        try:
            wait_for(ready, timeout, what=f"{self} to be ready")
        except TimeoutError as exc:
            raise TimeoutError(self.describe(str(exc))) from None

    def send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after *timeout* seconds; also kill whatever it left in its group.

        Returns the exit code (negative: killed by that signal). Safe to call twice.
        """
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._popen.terminate()
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self._popen.wait()
        self._kill_group()
        _live.pop(self, None)
        return self._popen.returncode

    def _kill_group(self) -> None:
        try:
            os.killpg(self._popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 60) -> str:
        """The last *lines* lines of the log file."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 256 * lines))
                text = log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return "(no log file)"
        return "\n".join(text.splitlines()[-lines:])

    def new_log_alarms(self) -> list[str]:
        """The :data:`LOG_ALARMS` in log lines written since the last call (each line once)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_checked)
                text = log.read()
        except FileNotFoundError:
            return []
        cut = text.rfind(b"\n") + 1  # a line still being written is checked next time
        if not self.running:
            cut = len(text)
        self._log_checked += cut
        lines = text[:cut].decode("utf-8", "replace").splitlines()
        return [line for line in lines if any(alarm in line for alarm in LOG_ALARMS)]

    def describe(self, message: str) -> str:
        """*message* followed by the tail of this process's log, for assertion and error messages."""
        return f"{message}\n--- last lines of {self.log_path} ---\n{self.log_tail()}"

    def reset_peak_rss(self) -> None:
        """Reset the process's VmHWM (peak RSS) to its current RSS, to measure the peak of what follows."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")

    def status_kib(self, field: str = "VmRSS") -> int:
        """A memory figure of the running process from /proc/PID/status, in KiB (VmRSS, VmHWM, ...)."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(f"{field} not in /proc/{self.pid}/status")


def log_alarms_since_last_check() -> list[str]:
    """``"<process>: <line>"`` for every :data:`LOG_ALARMS` line any process logged since the last call.

    A stopped process is checked one last time (its shutdown included), then forgotten.
    """
    found = []
    for process in list(_unchecked):
        found += [f"{process}: {line}" for line in process.new_log_alarms()]
        if not process.running:
            _unchecked.pop(process, None)
    return found


def stop_all() -> None:
    """Stop every process still running (the safety net at the end of a test session)."""
    for process in reversed(ManagedProcess.live()):
        process.stop()
