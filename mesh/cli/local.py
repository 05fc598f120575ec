"""The local mesh of ``meshctl up``, ``meshctl run`` and ``meshctl down``: one state directory on this host.

``meshctl up`` starts ``twistd mesh-control`` in the background; each
``meshctl run`` starts an app and its sidecar, registered with that control
plane; ``meshctl down`` stops them.  They find each other through the state
directory (``~/.txmesh`` unless ``--state-dir`` says otherwise)::

    control/            mesh-control's --state-dir: CA key (0600), root-cert.pem, token key, registry
    config/             the config directory the control plane watches, unless `up --config-dir` named one
    up.json             the running control plane: pid, ports, config directory
    runs/NAME.json      one per workload started by `meshctl run`: pids, ports, command, logs
    tokens/NAME.token   that workload's join token (0600)
    sidecars/NAME/      its sidecar's last-known-good config
    logs/               control-plane.log; NAME.log (meshctl run and the app, when detached),
                        NAME-sidecar.log, NAME-access.log

A record names its processes by pid *and* start time (``/proc/PID/stat``), so
a pid reused by another program is never taken for ours.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mesh.demo.runner import bind_problem

#: Where the local mesh lives unless ``--state-dir`` says otherwise.
DEFAULT_STATE_DIR = Path("~/.txmesh")
#: The control plane's ports on 127.0.0.1 (Istio's), unless ``meshctl up --port/--admin-port`` say otherwise.
LOOPBACK = "127.0.0.1"
#: Sidecar ports of ``meshctl run`` not given on its command line come from here: below Linux's
#: ephemeral range (32768-60999), so an outgoing connection's source port never takes one meanwhile.
PORT_RANGE = range(16000, 20000)
#: Seconds a process gets to become ready, and to exit after SIGTERM before it is killed.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
PROBE_INTERVAL = 0.05


class LocalError(Exception):
    """The local mesh cannot do what was asked; the message says why and what to do."""


def add_state_dir_option(parser) -> None:
    """``--state-dir DIR``, shared by up, run, down, check and bug-report."""
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                        help="the local mesh's state directory (default: ~/.txmesh)")


def venv_program(name: str) -> str:
    """The console script *name* (twistd, meshctl) next to this interpreter."""
    return str(Path(sys.executable).with_name(name))


# -- processes ------------------------------------------------------------------------------

def start_time(pid: int):
    """The start time of process *pid* (clock ticks since boot), or None if it does not run.

    A zombie counts as not running.  Without ``/proc`` (not Linux), 0 for any live pid.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        if os.path.isdir("/proc"):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def process_ref(pid: int) -> dict:
    """``{"pid", "start"}``: how a record names a process."""
    return {"pid": pid, "start": start_time(pid)}


def running(ref) -> bool:
    """Whether the process a record names (:func:`process_ref`) still runs."""
    if not ref or not ref.get("pid"):
        return False
    now = start_time(ref["pid"])
    return now is not None and (ref.get("start") in (None, 0) or now == ref["start"])


def send(ref, signum) -> None:
    """Send *signum* to the process of *ref*, if it still runs."""
    if running(ref):
        with contextlib.suppress(ProcessLookupError):
            os.kill(ref["pid"], signum)


def stop_processes(refs, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every process of *refs*, wait until they are gone, SIGKILL those left after *timeout*."""
    for ref in refs:
        send(ref, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(running(ref) for ref in refs) and time.monotonic() < deadline:
        time.sleep(PROBE_INTERVAL)
    for ref in refs:
        send(ref, signal.SIGKILL)


def spawn_detached(argv, log_path: Path, env=None) -> subprocess.Popen:
    """Start *argv* in a session of its own (no terminal signals reach it), output appended to *log_path*."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [str(arg) for arg in argv]
    with open(log_path, "ab") as log:
        log.write(f"$ {subprocess.list2cmdline(argv)}\n".encode())
        log.flush()
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                    start_new_session=True)
        except OSError as error:
            raise LocalError(f"cannot run {argv[0]}: {error.strerror}; is txmesh installed in this environment "
                             "(`make bootstrap`, then use .venv/bin/meshctl)?") from None


def log_tail(path: Path, lines: int = 20) -> str:
    """The last *lines* lines of *path*, introduced by its name."""
    try:
        tail = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        tail = ["(no log)"]
    return "\n".join([f"--- last lines of {path} ---", *tail])


def wait_until(probe, what: str, deadline: float, alive=lambda: True, log_path=None):
    """Call *probe* until it returns a truthy value (returned); :class:`LocalError` at *deadline* or when
    ``alive()`` turns false, with the tail of *log_path*.  OSError from the probe means "not yet"."""
    while True:
        if not alive():
            raise LocalError("\n".join([f"{what}: the process exited", *([log_tail(log_path)] if log_path else [])]))
        try:
            result = probe()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            raise LocalError("\n".join([f"{what}: not ready in time", *([log_tail(log_path)] if log_path else [])]))
        time.sleep(PROBE_INTERVAL)


def port_problem(port: int, what: str, option: str):
    """Why *port* on 127.0.0.1 cannot be used for *what* (a line saying what to do), or None."""
    problem = bind_problem(LOOPBACK, port)
    if problem is None:
        return None
    if problem == "in use":
        return (f"{what} port {LOOPBACK}:{port} is in use; find the process with `ss -ltnp 'sport = :{port}'` "
                f"and stop it, or choose another port with {option}")
    return f"{what} port {LOOPBACK}:{port}: {problem}; choose another port with {option}"


# -- the state directory --------------------------------------------------------------------

def _write_json(path: Path, document: dict) -> None:
    """Replace *path* with *document* atomically (readers never see half a record)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class LocalMesh:
    """The state directory of one local mesh; see the module docstring for its layout."""

    def __init__(self, state_dir):
        self.root = Path(state_dir).expanduser().absolute()
        self.control_dir = self.root / "control"
        self.default_config_dir = self.root / "config"
        self.log_dir = self.root / "logs"
        self.runs_dir = self.root / "runs"
        self.token_dir = self.root / "tokens"
        self.sidecar_dir = self.root / "sidecars"
        self.up_path = self.root / "up.json"

    @property
    def ca_bundle(self) -> Path:
        """The trust bundle mesh-control writes (``root-cert.pem``)."""
        return self.control_dir / "root-cert.pem"

    def create(self) -> None:
        """Create the directories (0700: they hold keys and tokens)."""
        for directory in (self.root, self.control_dir, self.log_dir, self.runs_dir, self.token_dir,
                          self.sidecar_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    # the control plane

    def control(self):
        """The record of the running control plane (``up.json``), or None when none runs."""
        record = _read_json(self.up_path)
        if record is not None and running(record.get("process")):
            return record
        return None

    def require_control(self) -> dict:
        """:meth:`control`, or :class:`LocalError` saying to run ``meshctl up``."""
        record = self.control()
        if record is None:
            raise LocalError(f"no local control plane runs for state directory {self.root}; start it with "
                             f"`meshctl up{self.option()}` (or pass the --state-dir you gave `meshctl up`)")
        return record

    def save_control(self, record: dict) -> None:
        _write_json(self.up_path, record)

    def forget_control(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.up_path.unlink()

    def option(self) -> str:
        """`` --state-dir DIR`` when it is not the default, for the commands the messages suggest."""
        default = DEFAULT_STATE_DIR.expanduser().absolute()
        return "" if self.root == default else f" --state-dir {self.root}"

    # the workloads of `meshctl run`

    def run_path(self, name: str) -> Path:
        return self.runs_dir / f"{name}.json"

    def runs(self) -> list:
        """Records of the workloads whose ``meshctl run`` still runs, by name; stale records are removed."""
        found = []
        for path in sorted(self.runs_dir.glob("*.json")) if self.runs_dir.is_dir() else ():
            record = _read_json(path)
            if record is not None and running(record.get("supervisor")):
                found.append(record)
            elif record is not None and not any(running(record.get(key)) for key in ("app", "sidecar")):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return found

    def run(self, name: str):
        """The record of the running workload *name*, or None."""
        return next((record for record in self.runs() if record["name"] == name), None)

    def save_run(self, record: dict) -> None:
        _write_json(self.run_path(record["name"]), record)

    def forget_run(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.run_path(name).unlink()

    @contextlib.contextmanager
    def locked(self):
        """Hold the state directory's lock (port allocation and names are decided under it)."""
        self.create()
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def taken_ports(self) -> set:
        """Ports the control plane and the running workloads hold or are about to bind."""
        taken = set()
        control = self.control()
        if control is not None:
            taken |= {control["port"], control["admin_port"]}
        for record in self.runs():
            taken |= set(record.get("ports", {}).values())
        return taken

    def free_ports(self, count: int, exclude=()) -> list:
        """*count* ports of :data:`PORT_RANGE` free on 127.0.0.1 and not taken by this mesh (call
        under :meth:`locked`)."""
        taken = self.taken_ports() | set(exclude)
        ports = []
        for port in PORT_RANGE:
            if port not in taken and bind_problem(LOOPBACK, port) is None:
                ports.append(port)
                if len(ports) == count:
                    return ports
        raise LocalError(f"no {count} free ports left in {PORT_RANGE.start}-{PORT_RANGE.stop - 1} on {LOOPBACK}; "
                         "stop workloads you no longer need (`meshctl down NAME`)")
