"""Benchmark orchestrator: direct nginx vs txmesh vs Envoy, interleaved, in one run.

Usage (from the repository root)::

    .venv/bin/python -m bench.run                       # direct, txmesh, envoy; 3 rounds
    .venv/bin/python -m bench.run --cases direct,envoy  # without txmesh
    .venv/bin/python -m bench.run --help

One nginx backend and every case's proxies are started once and live for the
whole run.  Each round then measures every case in turn (A B C A B C ...):
latency at a fixed offered rate with h2load, then maximum throughput with wrk
while the proxies' CPU time is read from /proc.  Results go to stdout and to
bench/results/<timestamp>.{md,json}; raw logs and configs to bench/work/<timestamp>/.
See docs/performance.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

from bench import callgrind, diagnostics, report
from bench.loadgen import LoadGenerator
from bench.procs import BenchError, run_main, tree_cpu_seconds, tree_memory_kib
from bench.topologies import (
    BENCH_DIR,
    CASES,
    H2_STREAMS,
    Target,
    Workspace,
    check_target,
    find_venv_bin,
    start_backend,
)

DEFAULT_CASES = "direct,txmesh,envoy"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help=f"comma-separated, from {', '.join(CASES)} (default: %(default)s); "
                             "direct is always added, as the baseline")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--latency-seconds", type=int, default=10,
                        help="h2load duration per case per round (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=4, help="h2load connections (default: %(default)s)")
    parser.add_argument("--rps-per-client", type=int, default=250,
                        help="h2load --rps, per connection (default: %(default)s, i.e. 1000 req/s offered)")
    parser.add_argument("--throughput-seconds", type=int, default=8,
                        help="wrk duration per connection count per case per round (default: %(default)s)")
    parser.add_argument("--connections", default="4,16",
                        help="wrk connection counts, comma-separated (default: %(default)s)")
    parser.add_argument("--warmup-seconds", type=int, default=2,
                        help="wrk warm-up per case before the first round (default: %(default)s)")
    parser.add_argument("--client-cpus", default=None,
                        help="taskset CPU list for h2load/wrk (default: no pinning)")
    parser.add_argument("--server-cpus", default=None,
                        help="taskset CPU list for nginx and the proxies (default: no pinning)")
    parser.add_argument("--callgrind", type=int, default=0, metavar="N",
                        help="after the rounds, restart each proxy case under valgrind's callgrind and "
                             "count its instructions over N requests (default: off)")
    parser.add_argument("--callgrind-warmup", type=int, default=200, metavar="N",
                        help="requests sent before callgrind counting starts (default: %(default)s)")
    parser.add_argument("--venv", default=None,
                        help="virtualenv holding twistd and envoy (default: $TXMESH_VENV, ./.venv, "
                             "else the running interpreter's)")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results",
                        help="where the summary .md/.json go (default: bench/results)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.rounds < 1 and not args.callgrind:
        parser.error("--rounds must be at least 1 (0 only with --callgrind)")
    args.cases = [report.BASELINE] + [n for n in dict.fromkeys(names) if n != report.BASELINE]
    args.connections = [int(c) for c in args.connections.split(",")]
    return args


def tool_versions(venv_bin: Path) -> dict:
    """Versions of the programs that shape the figures, for the results file."""
    commands = {
        "nginx": ["nginx", "-v"],
        "h2load": ["h2load", "--version"],
        "wrk": ["wrk", "-v"],
        "envoy": [str(venv_bin / "envoy"), "--version"],
        "python": [str(venv_bin / "python"), "-VV"],
    }
    versions = {}
    for name, argv in commands.items():
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            text = (out.stdout + out.stderr).strip().splitlines()
            versions[name] = next((line.strip() for line in text if line.strip()), "")
        except (OSError, subprocess.TimeoutExpired) as exc:
            versions[name] = f"unavailable ({exc})"
    return versions


def git_revision() -> str:
    """The checkout's commit, with "-dirty" if the working tree differs (the proxy runs from it)."""
    try:
        out = subprocess.run(["git", "-C", str(BENCH_DIR), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


class RunStart(NamedTuple):
    """The start of one benchmark run (bench.run and the side benchmarks)."""

    started: str  # the timestamp that names its results
    revision: str  # the code its processes run (read before they start)
    work: Path  # its work directory, created: configs, logs
    venv_bin: Path


def start_run(venv) -> RunStart:
    """Timestamp the run, read the revision and create its work directory under bench/work."""
    started = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    revision = git_revision()
    work = BENCH_DIR / "work" / started
    work.mkdir(parents=True)
    return RunStart(started, revision, work, find_venv_bin(venv))


def proxy_cpu(target: Target) -> list[float]:
    """CPU seconds used so far by each of the case's proxies (and any processes they forked)."""
    return [tree_cpu_seconds(proxy.pid) for proxy in target.proxies]


def proxy_memory(target: Target, field: str) -> int | None:
    """A /proc ``Vm*`` field in KiB, summed over the case's proxies; None for no proxy."""
    return sum(tree_memory_kib(proxy.pid, field) for proxy in target.proxies) if target.proxies else None


def proxy_memory_by_role(target: Target, field: str) -> dict[str, int]:
    """A /proc ``Vm*`` field in KiB of each proxy that has a role (the sidecars of a pair)."""
    return {proxy.role: tree_memory_kib(proxy.pid, field) for proxy in target.proxies if proxy.role}


def measure_latency(load: LoadGenerator, args, name: str, target: Target, tag: str,
                    backend_port: int) -> tuple[report.Latency | None, str | None]:
    """h2load at the fixed rate: ``(latency, None)``, or ``(None, why)`` if it got no 2xx response.

    A failure is not retried: the socket table taken just before h2load, the
    proxies' admin state and logs and h2load's output go to
    ``<tag>.diagnostics.txt`` (bench.diagnostics), and the round goes on.
    """
    before = diagnostics.socket_table(diagnostics.target_ports(target, backend_port)) if target.proxies else ""
    try:
        return load.latency(target.url, target.host, tag, args.clients, args.rps_per_client,
                            args.latency_seconds, target.h2_streams), None
    except BenchError as exc:
        path = diagnostics.capture(load.log_dir, tag, name, target, backend_port, before, str(exc))
        why = f"{str(exc).splitlines()[0]} Diagnostics: {path.name} in the work dir."
        print(f"  {name:<12} LATENCY RUN FAILED (not retried): {why}", flush=True)
        return None, why


def measure_round(load: LoadGenerator, args, name: str, target: Target, tag: str,
                  backend_port: int) -> report.RoundResult:
    """Latency at the fixed rate, then throughput per connection count with CPU accounting."""
    latency, failure = measure_latency(load, args, name, target, tag, backend_port)
    throughput, cpu = {}, [0.0] * len(target.proxies)
    for connections in args.connections:
        before = proxy_cpu(target)
        throughput[connections] = load.throughput(target.url, target.host, f"{tag}-c{connections}",
                                                  connections, args.throughput_seconds, target.h2_streams)
        cpu = [total + after - start for total, start, after in zip(cpu, before, proxy_cpu(target))]
    by_role = {proxy.role: seconds for proxy, seconds in zip(target.proxies, cpu) if proxy.role}
    result = report.RoundResult(latency, throughput, sum(cpu) if target.proxies else None, by_role, failure)
    wrk = ", ".join(f"c{c} {t.rps:.0f} rps" for c, t in throughput.items())
    cpu_text = ""
    if result.cpu_per_1k is not None:
        cpu_text = f"; CPU {result.cpu_per_1k:.3f} s/1k"
        if by_role:
            cpu_text += " (" + ", ".join(f"{role} {result.role_cpu_per_1k(role):.3f}" for role in by_role) + ")"
    latency_text = (f"p50 {latency.p50:.3f} p90 {latency.p90:.3f} p99 {latency.p99:.3f} ms "
                    f"at {latency.achieved_rps:.0f} rps" if latency else "latency FAILED")
    print(f"  {name:<12} {latency_text}; {wrk}{cpu_text}", flush=True)
    latency_errors = latency.errors if latency else 0
    if latency_errors or any(t.errors for t in throughput.values()):
        print(f"  {name:<12} WARNING: errors (h2load {latency_errors}, wrk "
              f"{sum(t.errors for t in throughput.values())}); see {load.log_dir}", flush=True)
    return result


def run(args) -> int:
    started, revision, work, venv_bin = start_run(args.venv)
    runs = {name: report.CaseRun(name, " ".join(CASES[name].__doc__.split())) for name in args.cases}
    load = LoadGenerator(work, args.client_cpus)
    print(f"bench: cases {', '.join(args.cases)}; {args.rounds} rounds; work dir {work}", flush=True)

    with ExitStack() as stack:
        ws = Workspace(work, stack, venv_bin, args.server_cpus)
        backend_port = start_backend(ws)
        targets = {name: CASES[name](ws, backend_port) for name in args.cases}
        for name, target in targets.items():
            runs[name].proxy_count = len(target.proxies)
            runs[name].idle_rss_kib = proxy_memory(target, "VmRSS")  # before any request
            runs[name].idle_rss_kib_by_role = proxy_memory_by_role(target, "VmRSS")
            check_target(name, target, work)
            if args.warmup_seconds:
                load.throughput(target.url, target.host, f"warmup-{name}", args.connections[0], args.warmup_seconds,
                                target.h2_streams)
        for index in range(1, args.rounds + 1):
            print(f"round {index}/{args.rounds}", flush=True)
            for name, target in targets.items():
                runs[name].rounds.append(measure_round(load, args, name, target, f"r{index}-{name}",
                                                       backend_port))
        for name, target in targets.items():
            runs[name].peak_rss_kib = proxy_memory(target, "VmHWM")
            runs[name].peak_rss_kib_by_role = proxy_memory_by_role(target, "VmHWM")
        if args.callgrind:
            for name, target in targets.items():
                if target.proxies:
                    print(f"callgrind: {name}, {args.callgrind} requests", flush=True)
                    total, by_role = callgrind.instructions_per_request(
                        ws, name, backend_port, load, args.callgrind, args.callgrind_warmup)
                    runs[name].instructions_per_request = total
                    runs[name].instructions_by_role = by_role

    summary = report.summarize(runs)
    ratio_table = report.ratios(summary)
    meta = {
        "started": started,
        "command": shlex.join(sys.orig_argv),
        "revision": revision,
        "rounds": args.rounds,
        "latency": f"h2load --h1 -c {args.clients} --rps {args.rps_per_client} -D {args.latency_seconds}",
        "throughput": " then ".join(f"wrk -t1 -c{c} -d{args.throughput_seconds}s" for c in args.connections),
        "http2 cases": f"h2load -m {H2_STREAMS} instead of --h1; h2load -t1 -m {H2_STREAMS} -D instead of wrk",
        "callgrind": f"{args.callgrind} requests after {args.callgrind_warmup} warm-up" if args.callgrind else "off",
        "client_cpus": args.client_cpus or "any",
        "server_cpus": args.server_cpus or "any",
        "host": f"{platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        **tool_versions(venv_bin),
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    paths = report.write_results(args.results_dir / started, meta, runs, summary, ratio_table)
    print("\n" + report.markdown_tables(summary, ratio_table))
    print("results: " + ", ".join(str(p) for p in paths) + f"; raw logs: {work}")
    return 0


def main(argv=None) -> int:
    return run_main("bench", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
