"""CA throughput: workload CSRs signed per second through mesh-control, per CA backend, in one run.

Usage (from the repository root)::

    .venv/bin/python -m bench.ca                               # the built-in CA, keep-alive and new connection
    .venv/bin/python -m bench.ca --backends builtin,vault      # also bench/ca_backend_vault.py's CA
    .venv/bin/python -m bench.ca --baseline /tmp/wt            # also mesh-control of another checkout
    .venv/bin/python -m bench.ca --profile 4                   # then 4 s under cProfile, top functions
    .venv/bin/python -m bench.ca --rounds 0 --callgrind 200    # instructions per CSR only
    .venv/bin/python -m bench.ca --client wrk                  # the load from wrk (bench/ca_wrk.py)
    .venv/bin/python -m bench.ca --help

One mesh-control per backend (and per ``--baseline`` checkout) is started with the backend's
arguments (bench/ca_backends.py: how a backend plugs in) and a join token is made for one
identity.  Each round then measures every control plane in turn, each mode in turn:
``keepalive`` (each client thread sends its CSRs over one HTTP/1.1 connection) and ``newconn``
(a new TLS connection per CSR, as sidecars renewing at once do), with :mod:`bench.ca_client` in
several processes, so that the client is not the bottleneck, or with ``--client wrk``
(:mod:`bench.ca_wrk`: pre-made CSRs replayed by wrk, which leaves more of the CPUs to the CA).
Reported per control plane and mode: the median over rounds of CSRs signed per second and of
mesh-control's CPU milliseconds per CSR (its own process and its children, from /proc: an external
CA server's CPU is not in it).  This host
steals CPU in long stalls (see bench/callgrind.py), so with ``--callgrind N`` each mesh-control is also
started under valgrind's callgrind and the instructions it executes per CSR are counted over N CSRs
sent one at a time, per mode: the figure that does not depend on what else runs (mesh-control's own
process: CA worker processes, ``--ca-workers``, run outside valgrind and are not counted).
Results go to stdout and bench/results/<timestamp>-ca.{md,json}; logs to bench/work/<timestamp>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pstats
import shlex
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

from bench import ca_backends, ca_wrk, callgrind
from bench.procs import BenchError, free_port, run_main, run_tool, tree_cpu_seconds
from bench.report import by_name, write_table_results
from bench.run import start_run
from bench.topologies import BENCH_DIR, REPO_DIR, Workspace

MODES = ("keepalive", "newconn")
CLIENTS = ("python", "wrk")
NAMESPACE = "bench"
SERVICE_ACCOUNT = "bench-ca"
IDENTITY = f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}"
PROFILE_TOP = 25  # functions shown by --profile
WORKERS_OUTSIDE_VALGRIND = "--trace-children-skip-by-arg=mesh.identity.ca_workers"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ca", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="builtin",
                        help="comma-separated CA backends, each bench/ca_backend_NAME.py (default: %(default)s)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from keepalive, newconn "
                                                                 "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="load per control plane per mode per round (default: %(default)s)")
    parser.add_argument("--client", choices=CLIENTS, default="python",
                        help="the load of the rounds and of --profile: bench.ca_client (python), or wrk replaying "
                             "pre-made CSRs (bench/ca_wrk.py); --callgrind always sends with bench.ca_client "
                             "(default: %(default)s)")
    parser.add_argument("--processes", type=int, default=3, help="client processes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads (concurrent connections) per client process; with --client wrk, "
                             "PROCESSES x THREADS connections from one wrk thread (default: %(default)s)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="also measure the built-in CA of mesh-control running the mesh package of the "
                             "checkout DIR")
    parser.add_argument("--baseline-args", default="", metavar="ARGS",
                        help="mesh-control arguments of the --baseline checkout, e.g. '--ca-workers 2' "
                             "(default: none, the built-in CA in its process)")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="after the rounds, run each backend's mesh-control again under cProfile for "
                             "SECONDS of keep-alive load and print its top functions (default: off)")
    parser.add_argument("--callgrind", type=int, default=0, metavar="N",
                        help="after the rounds, start each mesh-control again under valgrind's callgrind and "
                             "count its instructions over N CSRs per mode, one at a time (default: off)")
    parser.add_argument("--callgrind-warmup", type=int, default=20, metavar="N",
                        help="CSRs before callgrind counting starts (default: %(default)s)")
    parser.add_argument("--venv", default=None, help="virtualenv holding twistd and meshctl (see bench.run)")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results",
                        help="where the summary .md/.json go (default: bench/results)")
    args = parser.parse_args(argv)
    args.backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not args.modes or any(mode not in MODES for mode in args.modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if args.baseline is not None and not (args.baseline / "mesh" / "__init__.py").exists():
        parser.error(f"--baseline {args.baseline}: no mesh/__init__.py there; give a txmesh checkout")
    if args.rounds < 0 or (args.rounds == 0 and not (args.profile or args.callgrind)):
        parser.error("--rounds must be at least 1 (0 only with --profile or --callgrind)")
    return args


class ControlPlane:
    """A running mesh-control for one backend: its ports, state dir, pid and a token file for the client.

    It runs the ``mesh`` package of ``repo``; under cProfile with ``profile`` (a stats file), under
    callgrind when the workspace says so (``ws.callgrind``).
    """

    def __init__(self, ws: Workspace, name: str, backend: ca_backends.CABackend, repo: Path = REPO_DIR,
                 profile: Path | None = None):
        self.name = name
        self.state_dir = ws.root / f"state-{name}"
        self.port, self.admin_port = free_port(), free_port()
        profiling = ["--profile", str(profile), "--profiler", "cprofile", "--savestats"] if profile else []
        argv = [ws.venv_tool("twistd"), "-n", "--pidfile=", *profiling, "mesh-control",
                "--state-dir", str(self.state_dir), "--address", "127.0.0.1", "--port", str(self.port),
                "--admin-port", str(self.admin_port), *backend.args]
        try:
            self.process = ws.start_proxy(f"mesh-control-{name}", argv, self.admin_port, "python", cwd=ws.root,
                                          env={**_with_repo(repo), **backend.env})
        except BenchError as error:
            raise BenchError(f"mesh-control for CA backend {name!r} did not become ready: {error}") from None
        self.pid = self.process.pid
        self.token_file = ws.root / f"token-{name}"
        token = run_tool([ws.venv_tool("meshctl"), "token", "create", "--state-dir", str(self.state_dir),
                          "--namespace", NAMESPACE, "--service-account", SERVICE_ACCOUNT, "--ttl", "2h"],
                         60, ws.root / f"token-{name}.log")
        self.token_file.write_text(token.strip() + "\n")

    @property
    def bundle(self) -> Path:
        return self.state_dir / "root-cert.pem"


def _with_repo(repo: Path) -> dict:
    """The environment that makes mesh-control import ``mesh`` from ``repo``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}


def client(ws: Workspace, control: ControlPlane, mode: str, tag: str, *options: str) -> dict:
    """Run bench.ca_client against ``control`` in ``mode`` with ``options``; its JSON result."""
    argv = [sys.executable, "-m", "bench.ca_client", "--port", str(control.port), "--ca", str(control.bundle),
            "--token-file", str(control.token_file), "--identity", IDENTITY, *options,
            *(["--new-connection"] if mode == "newconn" else [])]
    out = run_tool(argv, 600, ws.root / f"{tag}.log")
    result = json.loads(out.strip().splitlines()[-1])
    if result["failed"]:
        raise BenchError(f"{tag}: {result['failed']} CSRs failed: {result['statuses']} {result['errors']}")
    return result


def wrk_client(ws: Workspace, control: ControlPlane, mode: str, tag: str, seconds: float, connections: int) -> dict:
    """Run wrk (bench/ca_wrk.py) against ``control`` in ``mode``; its result, as :func:`client`'s."""
    bodies = ws.root / f"bodies-{control.name}"
    if not bodies.exists():
        ca_wrk.write_bodies(bodies, IDENTITY, control.token_file.read_text().strip())
    result = ca_wrk.run(control.port, bodies, seconds, connections, mode == "newconn", ws.root / f"{tag}.log")
    if result["failed"]:
        raise BenchError(f"{tag}: {result['failed']} CSRs failed: {result['statuses']} {result['errors']}")
    return result


def measure(args, ws: Workspace, control: ControlPlane, mode: str, tag: str, seconds: float) -> dict:
    """One load run; CSRs signed per second and mesh-control's CPU milliseconds per CSR."""
    before = tree_cpu_seconds(control.pid)
    if args.client == "wrk":
        result = wrk_client(ws, control, mode, tag, seconds, args.processes * args.threads)
    else:
        result = client(ws, control, mode, tag, "--seconds", str(seconds), "--processes", str(args.processes),
                        "--threads", str(args.threads))
    cpu = tree_cpu_seconds(control.pid) - before
    completed = result["completed"]
    return {"rate": completed / result["seconds"], "cpu_ms": 1000 * cpu / completed if completed else None,
            "completed": completed, "failed": result["failed"], "statuses": result["statuses"],
            "errors": result["errors"]}


def profile(args, ws: Workspace, name: str, backend: ca_backends.CABackend) -> str:
    """mesh-control of ``name`` again, under cProfile for ``--profile`` seconds of keep-alive load: the top."""
    stats_file = ws.root / f"profile-{name}.pstats"
    with ExitStack() as stack:
        profiled = Workspace(ws.root, stack, ws.venv_bin)
        control = ControlPlane(profiled, f"{name}-profiled", backend, profile=stats_file)
        measure(args, profiled, control, "keepalive", f"profile-{name}", args.profile)
    out = ws.root / f"profile-{name}.txt"
    with out.open("w") as handle:
        pstats.Stats(str(stats_file), stream=handle).sort_stats("tottime").print_stats(PROFILE_TOP)
    return out.read_text()


def instructions_per_csr(args, ws: Workspace, name: str, backend: ca_backends.CABackend, repo: Path,
                         mode: str) -> float:
    """Instructions (callgrind Ir) mesh-control executes per CSR in ``mode``, one CSR at a time, counted over
    ``--callgrind`` CSRs after ``--callgrind-warmup``, in a mesh-control started afresh under callgrind."""
    root = ws.root / f"callgrind-{name}-{mode}"
    root.mkdir()
    # CA workers (--ca-workers) run outside valgrind: they would write over mesh-control's output file
    backend = dataclasses.replace(backend, env={**backend.env, "VALGRIND_OPTS": WORKERS_OUTSIDE_VALGRIND})
    with ExitStack() as stack:
        counted = Workspace(root, stack, ws.venv_bin, callgrind=True)
        control = ControlPlane(counted, name, backend, repo=repo)
        single = ("--processes", "1", "--threads", "1")
        client(counted, control, mode, f"{name}-{mode}-warmup", "--count", str(args.callgrind_warmup), *single)
        callgrind.instrument([control.process], "on", root)
        client(counted, control, mode, f"{name}-{mode}-counted", "--count", str(args.callgrind), *single)
        callgrind.instrument([control.process], "off", root)
    return callgrind.read_totals(counted.callgrind_file(control.process.name)) / args.callgrind


def median(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def _fmt(value, pattern):
    return pattern.format(value) if value is not None else "-"


def markdown(summary: dict) -> str:
    lines = ["| CA | mode | CSR/s | mesh-control CPU ms/CSR | instructions/CSR | failed |",
             "|---|---|---:|---:|---:|---:|"]
    for (name, mode), figures in summary.items():
        lines.append(f"| {name} | {mode} | {_fmt(figures['rate'], '{:.0f}')} | {_fmt(figures['cpu_ms'], '{:.2f}')} | "
                     f"{_fmt(figures['instructions'], '{:,.0f}')} | {figures['failed']} |")
    return "\n".join(lines)


def run(args) -> int:
    started, revision, work, venv_bin = start_run(args.venv)
    backends = {name: ca_backends.load(name) for name in args.backends}
    rounds, profiles, instructions = {}, {}, {}
    print(f"bench.ca: {args.rounds} rounds of {args.seconds:g} s per CA and mode; work dir {work}", flush=True)
    with ExitStack() as stack:
        ws = Workspace(work, stack, venv_bin)
        configs = {name: stack.enter_context(make(ws)) for name, make in backends.items()}
        # name -> (backend, repo): the baseline checkout gets no --ca (it may predate the option) but
        # --baseline-args, nor the installed third-party plugins (they follow this checkout's mesh.api)
        baseline = ca_backends.CABackend(args=shlex.split(args.baseline_args),
                                         env={"MESH_DISABLE_PLUGINS": ",".join(ca_backends.third_party())})
        planes = {"builtin-baseline": (baseline, args.baseline.resolve())} if args.baseline is not None else {}
        planes.update((name, (config, REPO_DIR)) for name, config in configs.items())
        controls = {name: ControlPlane(ws, name, config, repo=repo) for name, (config, repo) in planes.items()} \
            if args.rounds else {}
        for index in range(1, args.rounds + 1):
            print(f"round {index}/{args.rounds}", flush=True)
            for name, control in controls.items():
                for mode in args.modes:
                    result = measure(args, ws, control, mode, f"r{index}-{name}-{mode}", args.seconds)
                    rounds.setdefault((name, mode), []).append(result)
                    print(f"  {name:<18} {mode:<9} {result['rate']:7.0f} CSR/s  CPU "
                          f"{result['cpu_ms'] or 0:.2f} ms each  failed {result['failed']} "
                          f"{result['statuses'] or ''} {result['errors'] or ''}", flush=True)
        for name, (config, repo) in planes.items() if args.callgrind else ():
            for mode in args.modes:
                instructions[(name, mode)] = instructions_per_csr(args, ws, name, config, repo, mode)
                print(f"callgrind: {name:<18} {mode:<9} {instructions[(name, mode)]:,.0f} instructions per CSR",
                      flush=True)
        for name in configs if args.profile else ():
            profiles[name] = profile(args, ws, name, configs[name])
            print(f"\ncProfile of mesh-control ({name}), {args.profile:g} s keep-alive, by own time:\n"
                  f"{profiles[name]}", flush=True)
    summary = {key: {"rate": median(r["rate"] for r in rounds.get(key, ())),
                     "cpu_ms": median(r["cpu_ms"] for r in rounds.get(key, ())),
                     "failed": sum(r["failed"] for r in rounds.get(key, ())), "instructions": instructions.get(key)}
               for key in dict.fromkeys([*rounds, *instructions])}
    table = markdown(summary)
    meta = {"started": started, "command": shlex.join(sys.orig_argv), "revision": revision,
            "baseline": str(args.baseline) if args.baseline else None, "rounds": args.rounds,
            "load": f"bench.ca_client --seconds {args.seconds:g} --processes {args.processes} "
                    f"--threads {args.threads}" if args.client == "python" else
                    f"wrk (bench/ca_wrk.py) --duration {max(1, round(args.seconds))}s "
                    f"--connections {args.processes * args.threads}",
            "callgrind": f"{args.callgrind} CSRs after {args.callgrind_warmup}" if args.callgrind else "off"}
    base = write_table_results(args.results_dir, "ca", "CA throughput", meta, table,
                               {"summary": by_name(summary), "rounds": by_name(rounds)})
    print(f"results: {base}.md, {base}.json; raw logs: {work}; txmesh from {REPO_DIR}")
    return 0


def main(argv=None) -> int:
    return run_main("bench.ca", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
