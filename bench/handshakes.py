"""Handshake throughput on the inbound mTLS port: txmesh's server sidecar vs Envoy's, in one run.

Usage (from the repository root)::

    .venv/bin/python -m bench.handshakes                        # txmesh vs envoy, full and resumed, 5 rounds
    .venv/bin/python -m bench.handshakes --baseline /tmp/wt     # also the txmesh of another checkout
    .venv/bin/python -m bench.handshakes --callgrind 200        # add instructions per handshake
    .venv/bin/python -m bench.handshakes --help

One nginx backend, one txmesh server sidecar (STRICT mTLS inbound listener, as in the
``txmesh-pair`` case) and one Envoy server sidecar (shared/bench-reference/envoy-server-sidecar.yaml,
as in ``envoy-pair``) are started once.  With ``--baseline DIR`` a second txmesh sidecar runs the
``mesh`` package of the checkout DIR (e.g. a ``git worktree`` of the revision before a change).
Each round then measures every case in turn (A B C A B C ...), each mode in turn: ``full`` (every
connection a full handshake) and ``resumed`` (every connection offers the session of the client's
previous one), with :mod:`bench.handshake_client`: new connection per request, client certificate,
one GET, response read to the end.  Reported per case and mode: the median over rounds of
handshakes (= completed requests) per second and of the proxy's CPU milliseconds per handshake
(/proc, inflated on this host: compare ratios), then each txmesh case's ratio to Envoy.  With
``--callgrind N`` each server sidecar is started again under callgrind and the instructions it
executes per handshake (and its one request) are counted over N sequential connections: the
stall-free cost figure.
Results go to stdout and bench/results/<timestamp>-handshakes.{md,json}; logs to bench/work/<timestamp>/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

from bench import callgrind
from bench.handshake_client import client_context, one_request
from bench.procs import BenchError, run_main, run_tool, tree_cpu_seconds
from bench.report import by_name, write_table_results
from bench.run import start_run, tool_versions
from bench.topologies import (
    BENCH_DIR,
    REPO_DIR,
    Proxy,
    Workspace,
    start_backend,
    start_envoy_server_sidecar,
    start_txmesh_server_sidecar,
)

MODES = ("full", "resumed")
REFERENCE = "envoy"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.handshakes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="load per case per mode per round (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=2, help="client processes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=4,
                        help="threads (concurrent connections) per client process (default: %(default)s)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from full, resumed "
                                                                 "(default: %(default)s)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="also measure a txmesh sidecar running the mesh package of the checkout DIR")
    parser.add_argument("--callgrind", type=int, default=0, metavar="N",
                        help="after the rounds, start each server sidecar again under valgrind's callgrind and "
                             "count its instructions over N handshakes per mode, one at a time (default: off)")
    parser.add_argument("--callgrind-warmup", type=int, default=50, metavar="N",
                        help="handshakes before callgrind counting starts (default: %(default)s)")
    parser.add_argument("--venv", default=None, help="virtualenv holding twistd and envoy (see bench.run)")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results",
                        help="where the summary .md/.json go (default: bench/results)")
    args = parser.parse_args(argv)
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not args.modes or any(mode not in MODES for mode in args.modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if args.baseline is not None and not (args.baseline / "mesh" / "__init__.py").exists():
        parser.error(f"--baseline {args.baseline}: no mesh/__init__.py there; give a txmesh checkout")
    if args.rounds < 0 or (args.rounds == 0 and not args.callgrind):
        parser.error("--rounds must be at least 1 (0 only with --callgrind)")
    return args


def server_starters(baseline) -> dict:
    """Case name -> ``start(ws, backend_port) -> (server sidecar, its mTLS port)``, in the order measured."""
    def txmesh(name, repo):
        return lambda ws, backend_port: start_txmesh_server_sidecar(ws, backend_port, name, repo=repo)[:2]
    starters = {"txmesh-baseline": txmesh("txmesh-baseline", baseline.resolve())} if baseline is not None else {}
    starters["txmesh"] = txmesh("txmesh-server", REPO_DIR)
    starters[REFERENCE] = start_envoy_server_sidecar
    return starters


def sequential_requests(ws: Workspace, name: str, port: int, count: int, resume: bool) -> None:
    """``count`` mTLS requests one after the other, each on a new connection (offering the previous
    session if ``resume``); fail unless every one answers 200."""
    certs = ws.certs()
    context = client_context(str(certs / "client.crt"), str(certs / "client.key"), str(certs / "ca.crt"))
    session = None
    for _ in range(count):
        try:
            ok, _, new_session = one_request(context, port, session)
        except OSError as error:
            raise BenchError(f"case {name}: mTLS request to 127.0.0.1:{port} failed: {error}") from None
        if not ok:
            raise BenchError(f"case {name}: mTLS request to 127.0.0.1:{port} did not answer 200")
        session = new_session if resume else None


def instructions_per_handshake(args, ws: Workspace, backend_port: int, name: str, start, mode: str) -> float:
    """Instructions (callgrind Ir) the server sidecar executes per handshake and request in ``mode``.

    The sidecar is started afresh under callgrind (see bench.callgrind); after
    ``--callgrind-warmup`` handshakes, ``--callgrind`` more are counted, one at a time.
    """
    root = ws.root / f"callgrind-{name}-{mode}"
    root.mkdir()
    with ExitStack() as stack:
        counted = Workspace(root, stack, ws.venv_bin, callgrind=True)
        proxy, port = start(counted, backend_port)
        sequential_requests(counted, name, port, args.callgrind_warmup, mode == "resumed")
        callgrind.instrument([proxy], "on", root)
        sequential_requests(counted, name, port, args.callgrind, mode == "resumed")
        callgrind.instrument([proxy], "off", root)
    return callgrind.read_totals(counted.callgrind_file(proxy.name)) / args.callgrind


def measure(args, ws: Workspace, proxy: Proxy, port: int, mode: str, tag: str) -> dict:
    """One load run; handshakes per second and the proxy's CPU milliseconds per handshake."""
    certs = ws.certs()
    argv = [sys.executable, "-m", "bench.handshake_client", "--port", str(port), "--seconds", str(args.seconds),
            "--processes", str(args.processes), "--threads", str(args.threads), "--cert", str(certs / "client.crt"),
            "--key", str(certs / "client.key"), "--ca", str(certs / "ca.crt"),
            *(["--resume"] if mode == "resumed" else [])]
    before = tree_cpu_seconds(proxy.pid)
    out = run_tool(argv, args.seconds + 60, ws.root / f"{tag}.log")
    cpu = tree_cpu_seconds(proxy.pid) - before
    result = json.loads(out.strip().splitlines()[-1])
    completed = result["completed"]
    return {"rate": completed / args.seconds, "cpu_ms": 1000 * cpu / completed if completed else None,
            "completed": completed, "failed": result["failed"], "resumed": result["resumed"],
            "errors": result["errors"]}


def median(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def ratio(value, reference):
    return value / reference if value is not None and reference else None


def summarize(rounds: dict, instructions: dict) -> dict:
    """(case, mode) -> medians over rounds and instructions, each with its ratio to Envoy's."""
    summary = {}
    for (case, mode), runs in rounds.items():
        summary[(case, mode)] = {"rate": median(r["rate"] for r in runs), "cpu_ms": median(r["cpu_ms"] for r in runs),
                                 "failed": sum(r["failed"] for r in runs),
                                 "resumed_share": median(r["resumed"] / r["completed"] if r["completed"] else None
                                                         for r in runs),
                                 "instructions": instructions.get((case, mode))}
    for (_case, mode), figures in summary.items():
        reference = summary.get((REFERENCE, mode), {})
        for key in ("rate", "cpu_ms", "instructions"):
            figures[f"{key}_ratio"] = ratio(figures[key], reference.get(key))
    return summary


def _fmt(value, pattern):
    return pattern.format(value) if value is not None else "-"


def markdown(summary: dict) -> str:
    lines = ["| case | mode | handshakes/s | vs envoy | proxy CPU ms/handshake | vs envoy | "
             "instructions/handshake | vs envoy | resumed | failed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (case, mode), f in summary.items():
        lines.append(f"| {case} | {mode} | {_fmt(f['rate'], '{:.0f}')} | {_fmt(f['rate_ratio'], '{:.2f}x')} | "
                     f"{_fmt(f['cpu_ms'], '{:.2f}')} | {_fmt(f['cpu_ms_ratio'], '{:.2f}x')} | "
                     f"{_fmt(f['instructions'], '{:,.0f}')} | {_fmt(f['instructions_ratio'], '{:.2f}x')} | "
                     f"{_fmt(f['resumed_share'], '{:.0%}')} | {f['failed']} |")
    return "\n".join(lines)


def run(args) -> int:
    started, revision, work, venv_bin = start_run(args.venv)
    rounds, instructions = {}, {}
    print(f"bench.handshakes: {args.rounds} rounds of {args.seconds:g} s per case and mode; work dir {work}",
          flush=True)
    with ExitStack() as stack:
        ws = Workspace(work, stack, venv_bin)
        backend_port = start_backend(ws)
        starters = server_starters(args.baseline)
        servers = {name: start(ws, backend_port) for name, start in starters.items()}
        for name, (_, port) in servers.items():
            sequential_requests(ws, name, port, 1, resume=False)
        for index in range(1, args.rounds + 1):
            print(f"round {index}/{args.rounds}", flush=True)
            for name, (proxy, port) in servers.items():
                for mode in args.modes:
                    result = measure(args, ws, proxy, port, mode, f"r{index}-{name}-{mode}")
                    rounds.setdefault((name, mode), []).append(result)
                    print(f"  {name:<16} {mode:<8} {result['rate']:7.0f} handshakes/s  "
                          f"CPU {_fmt(result['cpu_ms'], '{:.2f}')} ms each  resumed {result['resumed']}  "
                          f"failed {result['failed']} {result['errors'] or ''}", flush=True)
        for name, start in starters.items() if args.callgrind else ():
            for mode in args.modes:
                instructions[(name, mode)] = instructions_per_handshake(args, ws, backend_port, name, start, mode)
                print(f"callgrind: {name:<16} {mode:<8} {instructions[(name, mode)]:,.0f} instructions per "
                      "handshake", flush=True)
    summary = summarize(rounds, instructions)
    table = markdown(summary)
    meta = {"started": started, "command": shlex.join(sys.orig_argv), "revision": revision,
            "baseline": str(args.baseline) if args.baseline else None, "rounds": args.rounds,
            "load": f"bench.handshake_client --seconds {args.seconds:g} --processes {args.processes} "
                    f"--threads {args.threads}",
            "callgrind": f"{args.callgrind} handshakes after {args.callgrind_warmup}" if args.callgrind else "off",
            **tool_versions(venv_bin)}
    base = write_table_results(args.results_dir, "handshakes", "Inbound mTLS handshakes", meta, table,
                               {"summary": by_name(summary), "rounds": by_name(rounds)})
    print(f"results: {base}.md, {base}.json; raw logs: {work}; txmesh from {REPO_DIR}")
    return 0


def main(argv=None) -> int:
    return run_main("bench.handshakes", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
