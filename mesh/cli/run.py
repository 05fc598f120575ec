"""``meshctl run --service NAME [--port P] [options] -- COMMAND ...``: your app behind its own sidecar.

Starts a sidecar (``twistd mesh-proxy``) for the workload, with a join token
it creates and free ports on 127.0.0.1, registered with the local control
plane of ``meshctl up`` (labels ``app=NAME`` plus ``--label``), and once the
sidecar is ready starts COMMAND; then says how to reach both.  COMMAND gets
``TXMESH_OUTBOUND`` (the sidecar's outbound URL: call other services there,
naming them in the Host header), ``TXMESH_WORKLOAD``, ``TXMESH_SERVICE`` and,
with ``--port``, ``PORT``.  ``meshctl run`` forwards SIGHUP, SIGUSR1 and
SIGUSR2 to COMMAND, stops both on SIGINT or SIGTERM, and stops the other when
either ends; its exit status is COMMAND's.  With ``--detach`` it does the same
in the background and returns once both are ready (``meshctl down NAME`` stops it).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

from mesh.cli.local import (
    LOOPBACK,
    START_TIMEOUT,
    STOP_TIMEOUT,
    LocalError,
    LocalMesh,
    add_state_dir_option,
    log_tail,
    port_problem,
    process_ref,
    spawn_detached,
    venv_program,
    wait_until,
)
from mesh.demo.runner import die_with_parent, http_get
from mesh.identity.files import write_private
from mesh.identity.tokens import create_token, load_or_create_key

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
#: Lifetime of the join token a sidecar bootstraps with (renewals use its certificate).
TOKEN_TTL = 3600.0
#: Signals passed on to the app as they are; SIGINT and SIGTERM stop the app and the sidecar.
FORWARDED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: What the watching ``meshctl run`` waits for: those signals, and SIGCHLD (the app or the sidecar exited).
WAKE = {*STOP_SIGNALS, *FORWARDED, signal.SIGCHLD}
#: The sidecar ports ``meshctl run`` picks when not given: role -> option.
PORT_OPTIONS = {"outbound": "--outbound-port", "inbound": None, "admin": None, "metrics": "--metrics-port"}
EXAMPLE = "meshctl run --service web --port 8080 -- python3 -m http.server --bind 127.0.0.1 8080"


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "run", help="run a command behind its own sidecar, registered with the local control plane",
        description=__doc__.split("\n\n")[1], usage="meshctl run --service NAME [--port PORT] [options] -- COMMAND ...")
    add_state_dir_option(parser)
    parser.add_argument("--service", required=True, help="the service this workload serves (label app=SERVICE)")
    parser.add_argument("--port", type=int, help="the port COMMAND listens on, on 127.0.0.1; without it the "
                                                 "workload only calls other services (no inbound listener)")
    parser.add_argument("--name", help="the workload's name (default: SERVICE-VERSION with a version label, "
                                       "else SERVICE)")
    parser.add_argument("--namespace", default="default", help="its namespace (default: %(default)s)")
    parser.add_argument("--service-account", help="its service account, in its identity (default: SERVICE)")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="a label of the workload (repeatable), e.g. version=v2 for DestinationRule subsets")
    parser.add_argument("--outbound-port", type=int, help="the sidecar's outbound port (default: a free one)")
    parser.add_argument("--metrics-port", type=int, help="the sidecar's /stats/prometheus port (default: a free one)")
    parser.add_argument("-d", "--detach", action="store_true",
                        help="run in the background; return once the app and the sidecar are ready")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="the app's command line")
    parser.set_defaults(func=run)


class Plan:
    """What one ``meshctl run`` starts, checked before anything starts."""

    def __init__(self, args):
        self.command = args.command[1:] if args.command[:1] == ["--"] else list(args.command)
        if not self.command:
            raise LocalError(f"give the app's command after --, e.g. `{EXAMPLE}`")
        self.service = args.service
        self.labels = {"app": args.service}
        for label in args.label:
            key, sep, value = label.partition("=")
            if not sep or not key:
                raise LocalError(f"--label wants KEY=VALUE, got {label!r}")
            if key == "app" and value != args.service:
                raise LocalError(f"--label app={value}: the app label is the --service ({args.service}); "
                                 "leave it out or change --service")
            self.labels[key] = value
        version = self.labels.get("version")
        self.name = args.name or (f"{args.service}-{version}" if version else args.service)
        self.namespace = args.namespace
        self.service_account = args.service_account or args.service
        for option, value in (("--service", self.service), ("--name", self.name), ("--namespace", self.namespace),
                              ("--service-account", self.service_account)):
            if not _DNS_LABEL.match(value):
                raise LocalError(f"{option} {value!r} is not a DNS label: use lower-case letters, digits and "
                                 "'-' (at most 63), starting and ending with a letter or digit")
        self.app_port = args.port
        self.given_ports = {"outbound": args.outbound_port, "metrics": args.metrics_port}
        problems = []
        if self.app_port is not None:
            problem = port_problem(self.app_port, "the app's", "--port")
            if problem:
                problems.append(problem + " (meshctl run starts the app: if it already runs, stop it first)")
        for role, port in self.given_ports.items():
            if port is not None:
                problems.append(port_problem(port, f"the sidecar's {role}", PORT_OPTIONS[role]))
        problems = [problem for problem in problems if problem]
        if problems:
            raise LocalError("\n  ".join(["cannot start the workload:", *problems]))

    def supervisor_argv(self, mesh: LocalMesh) -> list:
        """``meshctl run`` in the foreground with this plan: what ``--detach`` runs in the background."""
        argv = [sys.executable, "-m", "mesh.cli.main", "run", "--state-dir", mesh.root, "--service", self.service,
                "--name", self.name, "--namespace", self.namespace, "--service-account", self.service_account]
        for key, value in self.labels.items():
            if key != "app":
                argv += ["--label", f"{key}={value}"]
        if self.app_port is not None:
            argv += ["--port", self.app_port]
        for role, port in self.given_ports.items():
            if port is not None:
                argv += [PORT_OPTIONS[role], port]
        return [str(arg) for arg in [*argv, "--", *self.command]]


def run(args) -> int:
    mesh = LocalMesh(args.state_dir)
    try:
        plan = Plan(args)
        mesh.require_control()
        _check_name_free(mesh, plan.name)
        if args.detach:
            return _launch_detached(mesh, plan)
        return Supervisor(mesh, plan).run()
    except LocalError as error:
        print(f"meshctl run: {error}", file=sys.stderr, flush=True)
        return 1


def _check_name_free(mesh: LocalMesh, name: str) -> None:
    record = mesh.run(name)
    if record is not None:
        raise LocalError(f"a workload named {name} already runs (meshctl run, pid {record['supervisor']['pid']}); "
                         f"give this one another --name, or stop that one: `meshctl down{mesh.option()} {name}`")


def _launch_detached(mesh: LocalMesh, plan: Plan) -> int:
    """Start the supervisor in the background and wait until it reports both processes ready."""
    mesh.create()
    log = mesh.log_dir / f"{plan.name}.log"
    process = spawn_detached(plan.supervisor_argv(mesh), log)

    def ready():
        record = mesh.run(plan.name)
        return record if record and record["supervisor"]["pid"] == process.pid and record["state"] == "ready" \
            else None

    record = wait_until(ready, f"meshctl run {plan.name}", time.monotonic() + 2 * START_TIMEOUT + STOP_TIMEOUT,
                        alive=lambda: process.poll() is None, log_path=log)
    print(describe(record))
    print(f"It runs in the background (output in {log}); stop it with: meshctl down{mesh.option()} {plan.name}")
    return 0


def describe(record: dict) -> str:
    """How to reach a workload of ``meshctl run``: its app, its sidecar's ports, logs and command line."""
    ports, logs = record["ports"], record["logs"]
    outbound = f"http://{LOOPBACK}:{ports['outbound']}"
    lines = [f"{record['name']} is up: service {record['service']}.{record['namespace']}, "
             f"identity {record['identity']}"]
    app = f"  app       {subprocess.list2cmdline(record['command'])} (pid {record['app']['pid']})"
    if record.get("app_port"):
        lines += [f"{app}, listening on {LOOPBACK}:{record['app_port']}",
                  f"  inbound   {LOOPBACK}:{ports['inbound']} (mTLS) -> the app: the endpoint other workloads reach "
                  f"as Host: {record['service']}"]
    else:
        lines.append(f"{app} (no --port: calls others only)")
    lines += [
        f"  outbound  {outbound}   the app calls other services here ($TXMESH_OUTBOUND), e.g.",
        f"              curl -H 'Host: SERVICE' {outbound}/",
        f"  admin     http://{LOOPBACK}:{ports['admin']}/config_dump   "
        f"(meshctl proxy-config routes --admin {LOOPBACK}:{ports['admin']})",
        f"  metrics   http://{LOOPBACK}:{ports['metrics']}/stats/prometheus",
        f"  logs      sidecar {logs['sidecar']}, access log {logs['access']}",
        f"  sidecar   {subprocess.list2cmdline(record['sidecar_argv'])} (pid {record['sidecar']['pid']})",
    ]
    return "\n".join(lines)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def exit_status(returncode: int) -> int:
    """A child's exit status as a shell reports it: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """The foreground ``meshctl run``: starts the sidecar, then the app, and watches both."""

    def __init__(self, mesh: LocalMesh, plan: Plan):
        self.mesh = mesh
        self.plan = plan
        self.record = None
        self.sidecar = None
        self.app = None

    def run(self) -> int:
        previous = {sig: signal.signal(sig, _interrupt) for sig in (*STOP_SIGNALS, signal.SIGHUP)}
        previous_mask = None
        try:
            self._reserve()
            self._start()
            # from here on signals wait for _watch (sigwait), so none is lost once "ready" is announced
            previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, WAKE)
            self.record["state"] = "ready"
            self.mesh.save_run(self.record)
            print(describe(self.record), flush=True)
            return self._watch()
        except KeyboardInterrupt:
            print(f"meshctl run: interrupted; stopping {self.plan.name}", file=sys.stderr, flush=True)
            return 130
        finally:
            self._stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if previous_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)

    def _reserve(self) -> None:
        """Under the state directory's lock: the name and the ports, recorded before anything binds them."""
        mesh, plan = self.mesh, self.plan
        with mesh.locked():
            control = mesh.require_control()
            _check_name_free(mesh, plan.name)
            needed = [role for role in PORT_OPTIONS if role != "inbound" or plan.app_port]
            missing = [role for role in needed if plan.given_ports.get(role) is None]
            free = dict(zip(missing, mesh.free_ports(len(missing),
                                                     exclude={plan.app_port, *plan.given_ports.values()})))
            ports = {role: plan.given_ports.get(role) or free[role] for role in needed}
            identity = f"spiffe://{control['trust_domain']}/ns/{plan.namespace}/sa/{plan.service_account}"
            logs = {"sidecar": str(mesh.log_dir / f"{plan.name}-sidecar.log"),
                    "access": str(mesh.log_dir / f"{plan.name}-access.log")}
            self.record = {"name": plan.name, "service": plan.service, "namespace": plan.namespace,
                           "service_account": plan.service_account, "identity": identity,
                           "labels": plan.labels, "command": plan.command, "app_port": plan.app_port,
                           "ports": ports, "logs": logs, "state": "starting",
                           "supervisor": process_ref(os.getpid()), "app": None, "sidecar": None,
                           "sidecar_argv": self._sidecar_argv(control, ports, logs)}
            mesh.save_run(self.record)

    def _token_file(self, control: dict):
        path = self.mesh.token_dir / f"{self.plan.name}.token"
        key = load_or_create_key(str(self.mesh.control_dir))
        token = create_token(key, self.plan.namespace, self.plan.service_account, control["trust_domain"], TOKEN_TTL)
        write_private(str(path), (token + "\n").encode())
        return path

    def _sidecar_argv(self, control: dict, ports: dict, logs: dict) -> list:
        plan = self.plan
        argv = [venv_program("twistd"), "-n", "--pidfile=", "mesh-proxy", "--workload", plan.name,
                "--namespace", plan.namespace, "--service-account", plan.service_account,
                "--control", f"{LOOPBACK}:{control['port']}", "--ca-bundle", self.mesh.ca_bundle,
                "--token-file", self._token_file(control),
                "--trust-domain", control["trust_domain"],
                "--state-dir", self.mesh.sidecar_dir / plan.name,
                "--outbound-address", LOOPBACK, "--outbound-port", ports["outbound"],
                "--inbound-address", LOOPBACK, "--admin-port", ports["admin"],
                "--metrics-port", ports["metrics"], "--health-port", 0, "--access-log", logs["access"]]
        if plan.app_port:
            argv += ["--inbound-port", ports["inbound"], "--app-address", LOOPBACK, "--app-port", plan.app_port]
        for key, value in plan.labels.items():
            argv += ["--label", f"{key}={value}"]
        return [str(arg) for arg in argv]

    def _start(self) -> None:
        """Start the sidecar, wait until it is ready (certificate and config), then the app and its port."""
        record, plan = self.record, self.plan
        (self.mesh.sidecar_dir / plan.name).mkdir(mode=0o700, parents=True, exist_ok=True)
        sidecar_log = record["logs"]["sidecar"]
        with open(sidecar_log, "ab") as log:
            log.write(f"$ {subprocess.list2cmdline(record['sidecar_argv'])}\n".encode())
            log.flush()
            self.sidecar = self._spawn(record["sidecar_argv"], stdout=log, stderr=subprocess.STDOUT,
                                       env={"PYTHONUNBUFFERED": "1"})
        record["sidecar"] = process_ref(self.sidecar.pid)
        self.mesh.save_run(record)
        deadline = time.monotonic() + START_TIMEOUT
        wait_until(lambda: http_get(LOOPBACK, record["ports"]["admin"], "/ready", timeout=2.0).status == 200,
                   f"the sidecar of {plan.name} (certificate and config from the control plane)", deadline,
                   alive=lambda: self.sidecar.poll() is None, log_path=sidecar_log)
        env = {"TXMESH_OUTBOUND": f"http://{LOOPBACK}:{record['ports']['outbound']}", "TXMESH_WORKLOAD": plan.name,
               "TXMESH_SERVICE": plan.service}
        if plan.app_port:
            env["PORT"] = str(plan.app_port)
        try:
            self.app = self._spawn(plan.command, env=env)
        except OSError as error:
            raise LocalError(f"cannot run {plan.command[0]}: {error.strerror}; check the command after --") from None
        record["app"] = process_ref(self.app.pid)
        self.mesh.save_run(record)
        if plan.app_port:
            wait_until(lambda: _accepts(plan.app_port),
                       f"the app of {plan.name} (listening on {LOOPBACK}:{plan.app_port}; does COMMAND listen on "
                       "--port?)", time.monotonic() + START_TIMEOUT, alive=lambda: self.app.poll() is None)

    @staticmethod
    def _spawn(argv, env, **streams) -> subprocess.Popen:
        """A child in a session of its own (terminal signals reach meshctl only), which gets SIGTERM should
        meshctl die (Linux)."""
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, env={**os.environ, **env}, start_new_session=True,
                                preexec_fn=die_with_parent if sys.platform == "linux" else None, **streams)

    def _watch(self) -> int:
        """Until the app or the sidecar exits, or a stop signal: pass signals on to the app (the signals
        of :data:`WAKE` are blocked, and taken here with sigwait)."""
        while True:
            if self.app.poll() is not None:
                return exit_status(self.app.returncode)
            if self.sidecar.poll() is not None:
                print(f"meshctl run: the sidecar of {self.plan.name} exited with status {self.sidecar.returncode}; "
                      f"stopping the app\n{log_tail(self.record['logs']['sidecar'])}", file=sys.stderr, flush=True)
                return 1
            signum = signal.sigwait(WAKE)
            if signum in STOP_SIGNALS:
                self.app.send_signal(signum)
                self._reap(self.app)
                return exit_status(self.app.returncode)
            if signum in FORWARDED:
                self.app.send_signal(signum)

    @staticmethod
    def _reap(process, timeout: float = STOP_TIMEOUT) -> None:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def _stop(self) -> None:
        """Stop the app and the sidecar (SIGTERM, then SIGKILL after the timeout); forget the record.

        Stop signals are ignored meanwhile, so a second Ctrl-C cannot cut the clean-up short."""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
        try:
            running = [p for p in (self.app, self.sidecar) if p is not None and p.poll() is None]
            for process in running:
                process.terminate()
            for process in running:
                self._reap(process)
            if self.record is not None:
                self.mesh.forget_run(self.plan.name)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _accepts(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=1.0):
        return True
