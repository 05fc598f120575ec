"""``meshctl up`` and ``meshctl down``: the local control plane, in the background.

``meshctl up`` starts ``twistd mesh-control`` on 127.0.0.1 (CA and config on
:15012, admin on :15014) with its state under ``~/.txmesh/control`` and
watching a config directory (``--config-dir``, default ``~/.txmesh/config``),
waits until it is ready and says how to reach it.  Run again, it says the
same about the control plane already running.  ``meshctl down`` stops every
workload ``meshctl run`` started, then the control plane; ``meshctl down NAME``
stops one workload.  The state (CA, tokens) stays for the next ``up``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mesh.cli.local import (
    LOOPBACK,
    START_TIMEOUT,
    LocalError,
    LocalMesh,
    add_state_dir_option,
    port_problem,
    process_ref,
    running,
    spawn_detached,
    stop_processes,
    venv_program,
    wait_until,
)
from mesh.demo.runner import http_get
from mesh.sidecar_contract import CONTROL_ADMIN_PORT, CONTROL_PORT


def add_parser(subparsers):
    up = subparsers.add_parser("up", help="start a local control plane in the background (idempotent)",
                               description=__doc__.split("\n\n")[1])
    add_state_dir_option(up)
    up.add_argument("--config-dir", metavar="DIR",
                    help="the directory of Istio YAML the control plane serves and watches "
                         "(default: STATE/config)")
    up.add_argument("--port", type=int, metavar="PORT",
                    help=f"CA and config port (mTLS) on {LOOPBACK} (default: {CONTROL_PORT})")
    up.add_argument("--admin-port", type=int, metavar="PORT",
                    help=f"admin port on {LOOPBACK} (default: {CONTROL_ADMIN_PORT})")
    up.add_argument("--trust-domain", metavar="DOMAIN", help="SPIFFE trust domain (default: cluster.local)")
    up.set_defaults(func=run_up)
    down = subparsers.add_parser("down", help="stop the local mesh (or the named workloads of meshctl run)")
    add_state_dir_option(down)
    down.add_argument("names", nargs="*", metavar="NAME", help="stop only these workloads of `meshctl run`")
    down.set_defaults(func=run_down)


def control_url(record: dict, path: str = "") -> str:
    return f"http://{LOOPBACK}:{record['admin_port']}{path}"


def describe(mesh: LocalMesh, record: dict) -> str:
    """How to reach the control plane of *record*, and what to do next."""
    admin_flag = ("" if record["admin_port"] == CONTROL_ADMIN_PORT
                  else f" --control-admin {LOOPBACK}:{record['admin_port']}")
    return "\n".join([
        f"  CA and config  {LOOPBACK}:{record['port']} (mTLS), trust bundle {mesh.ca_bundle}",
        f"  admin          {control_url(record, '/ready')}   (meshctl proxy-status{admin_flag})",
        f"  config         {record['config_dir']}   (Istio YAML; changes are pushed to the sidecars)",
        f"  log            {record['log']}",
        f"Next: meshctl run{mesh.option()} --service NAME --port PORT -- COMMAND...   (your app behind a sidecar)",
        f"Stop everything: meshctl down{mesh.option()}",
    ])


def _ready(record: dict) -> bool:
    reply = http_get(LOOPBACK, record["admin_port"], "/ready", timeout=2.0)
    return reply.status == 200 and reply.json().get("ready") is True


def _conflicts(args, record: dict) -> list:
    """Options given to this ``up`` that differ from the running control plane's."""
    wanted = {"--config-dir": args.config_dir and str(_absolute(args.config_dir)), "--port": args.port,
              "--admin-port": args.admin_port, "--trust-domain": args.trust_domain}
    have = {"--config-dir": record["config_dir"], "--port": record["port"], "--admin-port": record["admin_port"],
            "--trust-domain": record["trust_domain"]}
    return [f"{option} {have[option]} (not {value})" for option, value in wanted.items()
            if value is not None and value != have[option]]


def _absolute(path) -> Path:
    return Path(path).expanduser().absolute()


def run_up(args) -> int:
    mesh = LocalMesh(args.state_dir)
    try:
        record = mesh.control()
        if record is not None:
            conflicts = _conflicts(args, record)
            if conflicts:
                raise LocalError(f"the local control plane already runs (pid {record['process']['pid']}) with "
                                 f"{', '.join(conflicts)}; to change that, stop it first: "
                                 f"`meshctl down{mesh.option()}`, then `meshctl up` with the new options")
            print(f"The local control plane is already up (pid {record['process']['pid']}):")
        else:
            record = _start(mesh, args)
            print(f"The local control plane is up (pid {record['process']['pid']}):")
    except LocalError as error:
        print(f"meshctl up: {error}", file=sys.stderr)
        return 1
    print(describe(mesh, record))
    return 0


def _start(mesh: LocalMesh, args) -> dict:
    port = args.port or CONTROL_PORT
    admin_port = args.admin_port or CONTROL_ADMIN_PORT
    problems = [problem for problem in (port_problem(port, "the control plane's CA and config", "--port"),
                                        port_problem(admin_port, "the control plane's admin", "--admin-port"))
                if problem]
    if port == admin_port:
        problems.append("--port and --admin-port must differ")
    if problems:
        raise LocalError("cannot start the control plane:\n  " + "\n  ".join(problems)
                         + "\n(another `meshctl up` with another --state-dir, or `meshctl demo`, may hold them)")
    if args.config_dir:
        config_dir = _absolute(args.config_dir)
        if not config_dir.is_dir():
            raise LocalError(f"--config-dir {config_dir} is not a directory; create it (mkdir -p {config_dir}) "
                             "and put your Istio YAML there, or leave --config-dir out")
    else:
        config_dir = mesh.default_config_dir
    mesh.create()
    config_dir.mkdir(parents=True, exist_ok=True)
    trust_domain = args.trust_domain or "cluster.local"
    log = mesh.log_dir / "control-plane.log"
    argv = [venv_program("twistd"), "-n", "--pidfile=", "mesh-control", "--state-dir", mesh.control_dir,
            "--config-dir", config_dir, "--address", LOOPBACK, "--port", port, "--admin-port", admin_port,
            "--trust-domain", trust_domain]
    process = spawn_detached(argv, log)
    record = {"process": process_ref(process.pid), "port": port, "admin_port": admin_port,
              "config_dir": str(config_dir), "trust_domain": trust_domain, "log": str(log)}
    mesh.save_control(record)
    try:
        wait_until(lambda: _ready(record), "the control plane", time.monotonic() + START_TIMEOUT,
                   alive=lambda: process.poll() is None, log_path=log)
    except BaseException:
        stop_processes([record["process"]])
        mesh.forget_control()
        raise
    return record


def run_down(args) -> int:
    mesh = LocalMesh(args.state_dir)
    runs = {record["name"]: record for record in mesh.runs()}
    unknown = [name for name in args.names if name not in runs]
    if unknown:
        known = ", ".join(sorted(runs)) or "none"
        print(f"meshctl down: no workload named {', '.join(unknown)} runs in {mesh.root} (running: {known}); "
              "`meshctl proxy-status` lists the proxies the control plane knows", file=sys.stderr)
        return 1
    names = args.names or sorted(runs)
    stop_runs(mesh, [runs[name] for name in names])
    stopped = [f"workload {name}" for name in names]
    if not args.names:
        record = mesh.control()
        if record is not None:
            stop_processes([record["process"]])
            stopped.append("the control plane")
        mesh.forget_control()
    if stopped:
        print(f"Stopped {', '.join(stopped)}. The state (CA, logs) stays in {mesh.root}.")
    else:
        print(f"Nothing was running in {mesh.root}.")
    return 0


def stop_runs(mesh: LocalMesh, records) -> None:
    """Stop workloads of ``meshctl run``, all at once: each supervisor stops its app and sidecar; whatever
    is left after the timeout is killed."""
    stop_processes([record["supervisor"] for record in records])
    leftovers = [record[key] for record in records for key in ("app", "sidecar") if running(record.get(key))]
    if leftovers:
        stop_processes(leftovers, timeout=1.0)
    for record in records:
        mesh.forget_run(record["name"])
