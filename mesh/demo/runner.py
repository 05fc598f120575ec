"""Start and stop the demo mesh: the control plane, five demo apps and their five sidecars, as real processes.

The layout matches the config in ``mesh/demo/mesh-config``: the frontend runs
in namespace ``frontend`` (service account ``frontend-service-account``),
user-service v1 and v2, payment-service and greeter in namespace ``demo``
(service accounts ``user-service``, ``payment-service`` and ``greeter``).
greeter is a gRPC service (:mod:`mesh.demo.grpc_app`, left out when grpcio is
not installed); the others are the HTTP app :mod:`mesh.demo.app`.  Each workload has a
loopback address of its own, its app listens on port 8080 there and its
sidecar on Istio's ports 15001 (outbound) and 15006 (inbound, the ServiceEntry
endpoint).  Admin ports are on 127.0.0.1, one per sidecar.  Each sidecar
serves Istio's Prometheus metrics on its own address, port 15090
(``/stats/prometheus``) and its health port 15021 (``/healthz/ready``), as in
a pod; the control plane serves ``/metrics`` on
its admin port.

``twistd mesh-control`` is the mesh's CA and config server, on
127.0.0.1:15012 (TLS) with its admin port on 127.0.0.1:15014; its state (CA
key, trust bundle ``root-cert.pem``, join-token key) goes to
``STATE/control``.  It watches ``STATE/mesh-config``, a copy of
``mesh/demo/mesh-config`` made at start (so it can be edited while the demo
runs, as the tour does), and pushes each sidecar its snapshot of it.  Each
sidecar gets a join token of its own (``meshctl token create``, written to
``STATE/tokens/<workload>.token``, mode 0600), asks the control plane for its
workload certificate and its config (``--control``, no ``--config-dir``; the
last-known-good snapshot goes to ``STATE/sidecars/<workload>``) and reports
``/ready`` only once it has both.

:class:`DemoMesh` starts the control plane and the apps, waits until each
answers, creates the tokens, starts the sidecars, and waits until each reports
``/ready``; every wait has a deadline and fails with the child's log tail.
:meth:`DemoMesh.stop` ends every child (SIGTERM, then SIGKILL of its process
group if it lingers).  Children run in sessions of their own, so a Ctrl-C in
the terminal reaches only ``meshctl``, which then stops them in order; on
Linux they also get SIGTERM should ``meshctl`` die.

Use it from the main thread, as a context manager::

    with DemoMesh(state_dir) as mesh:
        mesh.start()
        ...
"""

from __future__ import annotations

import ctypes
import errno
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mesh.demo import grpc_app
from mesh.plugins import describe_plugins, make_plugin_manager
from mesh.sidecar_contract import (
    CONTROL_ADMIN_PORT,
    CONTROL_PORT,
    HEALTH_PORT,
    INBOUND_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
)

CONFIG_DIR = Path(__file__).with_name("mesh-config")
TRUST_DOMAIN = "cluster.local"
APP_PORT = 8080
#: Each sidecar listens on Istio's ports (mesh.sidecar_contract): outbound and inbound listeners,
#: ``--metrics-port`` (``/stats/prometheus``) and ``--health-port`` (``/healthz/ready``) on its inbound
#: address; the control plane's CSR endpoint (TLS) and admin port are on loopback.
METRICS_PATH = "/stats/prometheus"
ADMIN_ADDRESS = "127.0.0.1"
CONTROL_ADDRESS = "127.0.0.1"
CONTROL_PORTS = (
    (CONTROL_ADDRESS, CONTROL_PORT, "control plane CA"),
    (ADMIN_ADDRESS, CONTROL_ADMIN_PORT, "control plane admin"),
)
#: Lifetime of the join tokens (``meshctl token create --ttl``).
TOKEN_TTL = "1h"

#: Seconds allowed for all apps, then all sidecars, to become ready.
START_TIMEOUT = 30.0
#: Seconds a child gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: Seconds between two readiness probes while waiting.
PROBE_INTERVAL = 0.05
#: Signals that end the demo (Ctrl-C, kill, a closed terminal).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Workload:
    """One workload of the demo: an app and its sidecar on one loopback address.

    ``name`` is both the workload name given to the sidecar and the name the
    app reports (``x-demo-service``), so a response tells which version served it.
    ``grpc``: the app is the gRPC greeter (:mod:`mesh.demo.grpc_app`), not the HTTP app.
    """

    name: str
    service: str
    version: str
    namespace: str
    service_account: str
    address: str
    admin_port: int
    grpc: bool = False

    @property
    def labels(self) -> dict[str, str]:
        return {"app": self.service, "version": self.version}

    @property
    def spiffe_id(self) -> str:
        """The identity in this workload's certificate (and in the callee's x-forwarded-client-cert URI=)."""
        return f"spiffe://{TRUST_DOMAIN}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The identity as AuthorizationPolicy principals write it (no ``spiffe://``)."""
        return self.spiffe_id[len("spiffe://"):]

    @property
    def ports(self) -> tuple[tuple[str, int, str], ...]:
        """Every (address, port, role) this workload listens on."""
        return (
            (self.address, APP_PORT, "app"),
            (self.address, OUTBOUND_PORT, "sidecar outbound"),
            (self.address, INBOUND_PORT, "sidecar inbound"),
            (self.address, METRICS_PORT, "sidecar metrics"),
            (self.address, HEALTH_PORT, "sidecar health"),
            (ADMIN_ADDRESS, self.admin_port, "sidecar admin"),
        )


WORKLOADS = (
    Workload("frontend", "frontend", "v1", "frontend", "frontend-service-account", "127.0.10.1", 15101),
    Workload("user-service-v1", "user-service", "v1", "demo", "user-service", "127.0.10.2", 15102),
    Workload("user-service-v2", "user-service", "v2", "demo", "user-service", "127.0.10.3", 15103),
    Workload("payment-service", "payment-service", "v1", "demo", "payment-service", "127.0.10.4", 15104),
    *((Workload("greeter", "greeter", "v1", "demo", "greeter", "127.0.10.5", 15105, grpc=True),)
      if grpc_app.available() else ()),
)


class DemoError(Exception):
    """The demo mesh cannot start or keep running; the message says why and what to do."""


def installed_plugins() -> dict:
    """``{name: "distribution version"}`` of the plugins installed through entry points (not built in)."""
    return {name: origin for name, origin, _hooks in describe_plugins(make_plugin_manager())
            if origin != "builtin"}


@dataclass(frozen=True)
class Reply:
    """One HTTP response: ``headers`` has lower-case names."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def http_get(address: str, port: int, path: str = "/", headers: dict | None = None,
             source_address: str | None = None, timeout: float = 10.0) -> Reply:
    """One GET on a fresh connection (from *source_address*, if given); raises OSError or HTTPException."""
    source = (source_address, 0) if source_address else None
    conn = http.client.HTTPConnection(address, port, timeout=timeout, source_address=source)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """A child process with its output in *log_path*, and a probe that says when it serves."""

    def __init__(self, label: str, argv: list[str], log_path: Path, probe):
        self.label = label
        self.argv = [str(arg) for arg in argv]
        self.log_path = log_path
        self._probe = probe
        self._popen: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def exit_code(self) -> int | None:
        """None while it runs (or before it started), else its exit status."""
        return self._popen.poll() if self._popen else None

    def spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"$ {subprocess.list2cmdline(self.argv)}\n".encode())
            log.flush()
            try:
                self._popen = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                    preexec_fn=die_with_parent if sys.platform == "linux" else None)
            except OSError as exc:
                raise DemoError(f"cannot run the {self.label}: {self.argv[0]}: {exc.strerror}; "
                                "is txmesh installed in this environment (`make bootstrap`)?") from None

    def ready(self) -> bool:
        """Whether the probe succeeds; raises :class:`DemoError` if the process has exited."""
        if self.exit_code() is not None:
            raise DemoError(self.failure(f"{self.label} exited with status {self.exit_code()} while starting"))
        try:
            return self._probe()
        except (OSError, http.client.HTTPException, ValueError):
            return False

    def terminate(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.terminate()

    def reap(self, deadline: float) -> None:
        """Wait for the exit until *deadline* (monotonic), then kill the process group."""
        if self._popen is None:
            return
        try:
            self._popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self._popen.pid, signal.SIGKILL)
            self._popen.wait()

    def failure(self, message: str, lines: int = 20) -> str:
        """*message*, then the last lines of the log and where the whole log is."""
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            tail = ["(no log)"]
        return "\n".join([message, f"--- last lines of {self.log_path} ---", *tail])


def bind_problem(address: str, port: int) -> str | None:
    """Why a server could not listen on address:port now, or None if it could."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "in use"
            if exc.errno == errno.EADDRNOTAVAIL:
                return "address not available on this host"
            return exc.strerror or str(exc)
    return None


def demo_ports(workloads=WORKLOADS) -> list[tuple[str, int, str]]:
    """Every (address, port, what) the demo listens on: the control plane's, then each workload's."""
    return [*CONTROL_PORTS,
            *((address, port, f"{workload.name} {role}") for workload in workloads
              for address, port, role in workload.ports)]


def check_ports(workloads=WORKLOADS) -> None:
    """Raise :class:`DemoError` listing every address:port the demo needs that is taken."""
    problems = [(address, port, what, problem) for address, port, what in demo_ports(workloads)
                if (problem := bind_problem(address, port))]
    if not problems:
        return
    lines = ["cannot start the demo mesh: it needs these addresses and ports, which are not free:"]
    lines += [f"  {address}:{port}  ({what}): {problem}" for address, port, what, problem in problems]
    if any(problem == "in use" for *_, problem in problems):
        port = next(port for _, port, _, problem in problems if problem == "in use")
        lines.append("Another `meshctl demo` (or a mesh-control on its default ports) may still be running: "
                     "stop it with Ctrl-C in its terminal. "
                     f"Otherwise find the process holding a port with `ss -ltnp 'sport = :{port}'` and stop it.")
    if any(problem.startswith("address not available") for *_, problem in problems):
        lines.append("The demo gives each workload an address in 127.0.10.0/24, which Linux routes to the "
                     "loopback interface by default; elsewhere add them first, e.g. "
                     "`sudo ifconfig lo0 alias 127.0.10.1` (and .2 to .5).")
    raise DemoError("\n".join(lines))


class DemoMesh:
    """The demo mesh: ``twistd mesh-control``, and its workloads, each an app process and a
    ``twistd mesh-proxy`` process.

    Logs go to ``state_dir/logs``, the control plane's state to ``state_dir/control``, the join
    tokens to ``state_dir/tokens``.  Programs come from this interpreter's environment:
    ``sys.executable -m mesh.demo.app`` and the ``twistd`` and ``meshctl`` next to it.
    """

    def __init__(self, state_dir: Path, workloads=WORKLOADS, plugins=()):
        self.state_dir = Path(state_dir)
        #: The installed plugins that are not built in, as ``{name: "distribution version"}``; only the
        #: ones in ``plugins`` are loaded, so the demo shows the built-in behaviour unless asked.
        self.installed_plugins = installed_plugins()
        unknown = sorted(set(plugins) - set(self.installed_plugins))
        if unknown:
            known = ", ".join(sorted(self.installed_plugins)) or "none"
            raise DemoError(f"no plugin named {', '.join(unknown)} is installed (installed plugins: {known}); "
                            "`meshctl plugins` lists them, `pip install ./plugins/NAME` adds one")
        self.plugins = tuple(plugins)
        #: ``--disable-plugin NAME`` for every installed plugin not asked for, given to every process.
        self.plugin_args = [arg for name in sorted(self.installed_plugins) if name not in self.plugins
                            for arg in ("--disable-plugin", name)]
        self.log_dir = self.state_dir / "logs"
        self.control_dir = self.state_dir / "control"
        self.token_dir = self.state_dir / "tokens"
        #: The copy of :data:`CONFIG_DIR` the control plane watches and the tour edits.
        self.config_dir = self.state_dir / "mesh-config"
        self.sidecar_state_dir = self.state_dir / "sidecars"
        self.workloads = tuple(workloads)
        self.control = self._control()
        self.apps = {w.name: self._app(w) for w in self.workloads}
        self.sidecars = {w.name: self._sidecar(w) for w in self.workloads}
        #: The ``meshctl token create`` command lines run by :meth:`start`, for :meth:`describe`.
        self.token_commands: list[str] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def children(self) -> list[Child]:
        return [self.control, *self.apps.values(), *self.sidecars.values()]

    @property
    def ca_bundle(self) -> Path:
        """The trust bundle the control plane writes, which every sidecar is given."""
        return self.control_dir / "root-cert.pem"

    def workload(self, name: str) -> Workload:
        return next(w for w in self.workloads if w.name == name)

    def token_file(self, workload: Workload) -> Path:
        return self.token_dir / f"{workload.name}.token"

    def _control(self) -> Child:
        twistd = Path(sys.executable).with_name("twistd")
        argv = [twistd, "-n", "--pidfile=", "mesh-control", "--state-dir", self.control_dir,
                "--config-dir", self.config_dir, "--address", CONTROL_ADDRESS, "--port", CONTROL_PORT,
                "--admin-port", CONTROL_ADMIN_PORT, *self.plugin_args]

        def probe():
            reply = http_get(ADMIN_ADDRESS, CONTROL_ADMIN_PORT, "/ready", timeout=2.0)
            return reply.status == 200 and reply.json().get("ready") is True

        return Child("control plane", argv, self.log_dir / "control-plane.log", probe)

    def _app(self, workload: Workload) -> Child:
        argv = [sys.executable, "-m", "mesh.demo.grpc_app" if workload.grpc else "mesh.demo.app",
                "--name", workload.name, "--address", workload.address, "--port", APP_PORT]

        def probe():
            if workload.grpc:  # listening is enough: the tour's gRPC step checks its answers
                with socket.create_connection((workload.address, APP_PORT), timeout=2.0):
                    return True
            return http_get(workload.address, APP_PORT, timeout=2.0).json()["service"] == workload.name

        return Child(f"{workload.name} app", argv, self.log_dir / f"{workload.name}-app.log", probe)

    def _sidecar(self, workload: Workload) -> Child:
        twistd = Path(sys.executable).with_name("twistd")
        argv = [twistd, "-n", "--pidfile=", "mesh-proxy", "--state-dir", self.sidecar_state_dir / workload.name,
                "--workload", workload.name, "--namespace", workload.namespace,
                "--service-account", workload.service_account,
                "--control", f"{CONTROL_ADDRESS}:{CONTROL_PORT}", "--ca-bundle", self.ca_bundle,
                "--token-file", self.token_file(workload),
                "--outbound-address", workload.address, "--outbound-port", OUTBOUND_PORT,
                "--inbound-address", workload.address, "--inbound-port", INBOUND_PORT,
                "--app-address", workload.address, "--app-port", APP_PORT,
                "--metrics-port", METRICS_PORT, "--health-port", HEALTH_PORT, "--admin-port", workload.admin_port,
                *self.plugin_args]
        for key, value in workload.labels.items():
            argv += ["--label", f"{key}={value}"]

        def probe():
            return self.admin(workload, "/ready").status == 200

        return Child(f"{workload.name} sidecar", argv, self.log_dir / f"{workload.name}-sidecar.log", probe)

    def admin(self, workload: Workload, path: str) -> Reply:
        """GET *path* on the admin port of *workload*'s sidecar."""
        return http_get(ADMIN_ADDRESS, workload.admin_port, path, timeout=2.0)

    def control_admin(self, path: str) -> Reply:
        """GET *path* on the control plane's admin port (e.g. ``/proxies``)."""
        return http_get(ADMIN_ADDRESS, CONTROL_ADMIN_PORT, path, timeout=2.0)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the control plane and the apps, create the join tokens, then start the sidecars;
        each group must be ready within *timeout* seconds; raise :class:`DemoError`."""
        check_ports(self.workloads)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(CONFIG_DIR, self.config_dir, dirs_exist_ok=True)
        for workload in self.workloads:
            (self.sidecar_state_dir / workload.name).mkdir(mode=0o700, parents=True, exist_ok=True)
        first = [self.control, *self.apps.values()]
        for child in first:
            child.spawn()
        self._wait_ready(first, timeout)
        self._create_tokens()
        sidecars = list(self.sidecars.values())
        for child in sidecars:
            child.spawn()
        self._wait_ready(sidecars, timeout)

    def _create_tokens(self) -> None:
        """One join token per workload, from ``meshctl token create``, in a 0600 file."""
        meshctl = Path(sys.executable).with_name("meshctl")
        self.token_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.token_commands = []
        for workload in self.workloads:
            argv = [str(meshctl), "token", "create", "--state-dir", str(self.control_dir),
                    "--namespace", workload.namespace, "--service-account", workload.service_account,
                    "--ttl", TOKEN_TTL]
            try:
                result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                        timeout=START_TIMEOUT)
            except OSError as exc:
                raise DemoError(f"cannot run {meshctl}: {exc.strerror}; is txmesh installed in this "
                                "environment (`make bootstrap`)?") from None
            except subprocess.TimeoutExpired:
                raise DemoError(f"`{subprocess.list2cmdline(argv)}` did not finish in {START_TIMEOUT:g}s") from None
            token = result.stdout.strip()
            if result.returncode != 0 or not token:
                raise DemoError(f"`{subprocess.list2cmdline(argv)}` failed with status {result.returncode}:\n"
                                f"{result.stderr.strip()}")
            path = self.token_file(workload)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(token + "\n")
            self.token_commands.append(f"{subprocess.list2cmdline(argv)} > {path}")

    @staticmethod
    def _wait_ready(children: list[Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = children
        while pending := [child for child in pending if not child.ready()]:
            if time.monotonic() >= deadline:
                raise DemoError(pending[0].failure(
                    f"{', '.join(child.label for child in pending)} not ready after {timeout:g}s"))
            time.sleep(PROBE_INTERVAL)

    def exited(self) -> list[Child]:
        """Children that have stopped running."""
        return [child for child in self.children if child.exit_code() is not None]

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """End every child: sidecars, apps, then the control plane; SIGTERM, then SIGKILL after
        *timeout* seconds.

        :data:`STOP_SIGNALS` are ignored meanwhile, so a second Ctrl-C cannot
        cut the clean-up short.
        """
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
        try:
            children = [*self.sidecars.values(), *self.apps.values(), self.control]
            for child in children:
                child.terminate()
            deadline = time.monotonic() + timeout
            for child in children:
                child.reap(deadline)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def describe_plugins(self) -> list:
        """Which plugins the mesh runs: the built-ins (the default load balancer among them), the ones asked for,
        and the installed ones left out with how to try them."""
        loaded = [f"{name} ({self.installed_plugins[name]})" for name in self.plugins]
        lines = ["Plugins: the built-in ones (routing, retries, authorization, and load balancing by each "
                 "DestinationRule's policy, LEAST_REQUEST when it names none)"
                 + (f", plus {', '.join(loaded)}, as asked" if loaded else "")]
        left_out = [f"{name} ({origin})" for name, origin in sorted(self.installed_plugins.items())
                    if name not in self.plugins]
        if left_out:
            example = next(name for name in sorted(self.installed_plugins) if name not in self.plugins)
            lines.append(f"  installed but left out: {', '.join(left_out)}; try one with "
                         f"`meshctl demo --plugin {example}` (or make demo DEMO_ARGS='--plugin {example}')")
        return lines

    def describe(self) -> str:
        """Where everything is: the control plane, addresses, identities, admin ports, processes and logs."""
        rows = [("workload", "identity", "app", "sidecar outbound", "sidecar inbound", "sidecar admin")]
        rows += [(w.name, w.spiffe_id, f"{w.address}:{APP_PORT}", f"{w.address}:{OUTBOUND_PORT}",
                  f"{w.address}:{INBOUND_PORT}", f"http://{ADMIN_ADDRESS}:{w.admin_port}/")
                 for w in self.workloads]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"The demo mesh is up: the control plane serves the config in {self.config_dir}",
                 f"  (a copy of {CONFIG_DIR}; edit it and the sidecars get the change)",
                 f"Control plane (CA and config): {CONTROL_ADDRESS}:{CONTROL_PORT}, admin "
                 f"http://{ADMIN_ADDRESS}:{CONTROL_ADMIN_PORT}/proxies, trust bundle {self.ca_bundle}", ""]
        lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines += ["", "Join tokens (one per sidecar, valid " + TOKEN_TTL + "):"]
        lines += [f"  {command}" for command in self.token_commands]
        lines += ["", "Processes and their logs:"]
        label_width = max(len(child.label) for child in self.children)
        lines += [f"  {child.label:<{label_width}}  pid {child.pid:<7}  {child.log_path}" for child in self.children]
        lines += ["", *self.describe_plugins()]
        lines += ["", "Admin endpoints of each sidecar: /ready, /config_dump, /clusters",
                  f"Metrics: each sidecar at http://<its address>:{METRICS_PORT}{METRICS_PATH}, the control plane "
                  f"at http://{ADMIN_ADDRESS}:{CONTROL_ADMIN_PORT}/metrics"]
        return "\n".join(lines)
