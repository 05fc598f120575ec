"""gRPC unary calls through a sidecar pair: direct vs txmesh pair vs Envoy pair, in one run.

Usage (from the repository root)::

    .venv/bin/python -m bench.grpc_unary                 # 3 interleaved rounds
    .venv/bin/python -m bench.grpc_unary --help

The backend is the demo's gRPC greeter (:mod:`mesh.demo.grpc_app`, grpcio, plaintext HTTP/2).
The cases, started once and measured in turn each round (A B C A B C ...):

- ``direct``: the load generator calls the greeter;
- ``txmesh-pair``: client sidecar (h2c from the client) -> mTLS with ALPN h2 -> server sidecar,
  whose app port is a ``GRPC`` port (h2c to the greeter); route timeout 5 s, 2 retries on 5xx;
- ``envoy-pair``: the same with two Envoys (shared/bench-reference's sidecars, with HTTP/2 on
  every hop: codec AUTO downstream, ``http2_protocol_options`` upstream, ALPN h2).

Each round measures latency at a fixed offered rate, then the maximum throughput, with
:mod:`bench.grpc_load` (a Python load generator of several processes: its own cost is in every
figure, so compare added latencies and ratios).  Reported: the median over rounds of p50, p90
and p99, the latency each pair adds to ``direct``, calls per second unpaced, and each figure of
txmesh as a ratio of Envoy's.  Results go to stdout and bench/results/<timestamp>-grpc.{md,json};
logs to bench/work/<timestamp>/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

from bench.procs import BenchError, free_port, run_main, run_tool, tree_cpu_seconds
from bench.report import write_table_results
from bench.run import start_run, tool_versions
from bench.topologies import (
    BENCH_DIR,
    MESH_HOST,
    Workspace,
    _common_tls,
    _identity_options,
    _tls_socket,
    start_envoy,
    start_txmesh,
    txmesh_pair_resources,
    write_config_dir,
)

CASES = ("direct", "txmesh-pair", "envoy-pair")
BASELINE, REFERENCE = "direct", "envoy-pair"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_unary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=300.0,
                        help="calls per second offered in the latency runs (default: %(default)s)")
    parser.add_argument("--latency-seconds", type=float, default=8.0, help="(default: %(default)s)")
    parser.add_argument("--throughput-seconds", type=float, default=6.0, help="(default: %(default)s)")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=4,
                        help="calls in flight per process in the throughput runs (default: %(default)s)")
    parser.add_argument("--venv", default=None, help="virtualenv holding twistd and envoy (see bench.run)")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results",
                        help="where the summary .md/.json go (default: bench/results)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def start_greeter(ws: Workspace) -> int:
    """The gRPC backend; returns its port (the load generator's warm-up call waits until it serves)."""
    port = free_port()
    ws.start("greeter", [sys.executable, "-m", "mesh.demo.grpc_app", "--name", "greeter", "--port", str(port)])
    return port


def txmesh_pair(ws: Workspace, backend_port: int) -> tuple[list, str, str]:
    """The txmesh pair of bench.topologies' ``txmesh-pair`` case, its service port declared GRPC."""
    inbound = free_port()
    resources = txmesh_pair_resources(MESH_HOST, inbound)
    resources[0]["spec"]["ports"] = [{"number": 80, "name": "grpc", "protocol": "GRPC"}]
    resources[0]["spec"]["endpoints"][0]["ports"] = {"grpc": inbound}
    config_dir = write_config_dir(ws, "txmesh-grpc-config", resources)
    server, _ = start_txmesh(ws, "txmesh-grpc-server", config_dir, workload="server", role="server",
                             inbound_port=inbound,
                             options=(*_identity_options(ws.certs(), "server"), "--app-port", str(backend_port),
                                      "--inbound-address", "127.0.0.1"))
    client, port = start_txmesh(ws, "txmesh-grpc-client", config_dir, workload="client", role="client",
                                options=_identity_options(ws.certs(), "client"))
    return [client, server], f"127.0.0.1:{port}", MESH_HOST


def envoy_pair(ws: Workspace, backend_port: int) -> tuple[list, str, str | None]:
    """Two Envoys as bench.topologies' ``envoy-pair``, HTTP/2 on every hop (the backend is gRPC)."""
    certs = ws.certs()
    server_tls = _common_tls(certs, "server", "client", alpn=["h2"])
    server, server_port = start_envoy(
        ws, "envoy-grpc-server", backend_port, role="server", downstream_h2=True, upstream_h2=True,
        downstream_tls=_tls_socket("DownstreamTlsContext", {"require_client_certificate": True,
                                                            "common_tls_context": server_tls}))
    client_tls = _common_tls(certs, "client", "server", alpn=["h2"])
    client, port = start_envoy(
        ws, "envoy-grpc-client", server_port, role="client", downstream_h2=True, upstream_h2=True,
        upstream_tls=_tls_socket("UpstreamTlsContext", {
            "sni": "outbound_.8080_._.server.default.svc.cluster.local", "common_tls_context": client_tls}))
    return [client, server], f"127.0.0.1:{port}", None


def load(args, ws: Workspace, target: str, authority, tag: str, rate: float, seconds: float, threads: int,
         proxies: list) -> dict:
    """One bench.grpc_load run; adds the proxies' CPU milliseconds per call (/proc: compare ratios)."""
    argv = [sys.executable, "-m", "bench.grpc_load", "--target", target, "--seconds", str(seconds),
            "--processes", str(args.processes), "--threads", str(threads),
            *(["--rate", str(rate)] if rate else []), *(["--authority", authority] if authority else [])]
    before = sum(tree_cpu_seconds(proxy.pid) for proxy in proxies)
    out = run_tool(argv, seconds + 90, ws.root / f"{tag}.log")
    cpu = sum(tree_cpu_seconds(proxy.pid) for proxy in proxies) - before
    result = json.loads(out.strip().splitlines()[-1])
    if result["failed"]:
        raise BenchError(f"{tag}: {result['failed']} calls failed, e.g. {result['errors']}")
    result["rate"] = result["completed"] / seconds
    result["cpu_ms"] = 1000 * cpu / result["completed"] if proxies and result["completed"] else None
    return result


def median(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def summarize(rounds: dict) -> dict:
    """case -> medians over rounds, the latency added to direct's, and ratios to Envoy's."""
    summary = {}
    for case, runs in rounds.items():
        figures = {key: median(run["latency"]["latency_ms"][key] for run in runs) for key in ("p50", "p90", "p99")}
        figures["achieved"] = median(run["latency"]["rate"] for run in runs)
        figures["throughput"] = median(run["throughput"]["rate"] for run in runs)
        figures["cpu_ms"] = median(run["throughput"]["cpu_ms"] for run in runs)
        summary[case] = figures
    base = summary[BASELINE]
    for figures in summary.values():
        for key in ("p50", "p90", "p99"):
            figures[f"added_{key}"] = figures[key] - base[key]
    reference = summary.get(REFERENCE)
    for figures in summary.values():
        for key in ("added_p50", "added_p90", "throughput", "cpu_ms"):
            value, ref = figures.get(key), reference.get(key) if reference else None
            figures[f"{key}_ratio"] = value / ref if value is not None and ref else None
    return summary


def _fmt(value, pattern="{:.2f}"):
    return pattern.format(value) if value is not None else "-"


def markdown(summary: dict) -> str:
    lines = ["| case | p50 ms | p90 ms | p99 ms | added p50 / p90 ms | added vs envoy (p50 / p90) | calls/s at the "
             "offered rate | max calls/s | vs envoy | proxy CPU ms/call | vs envoy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case, f in summary.items():
        added = "-" if case == BASELINE else f"{_fmt(f['added_p50'])} / {_fmt(f['added_p90'])}"
        ratios = ("-" if case in (BASELINE, REFERENCE)
                  else f"{_fmt(f['added_p50_ratio'], '{:.2f}x')} / {_fmt(f['added_p90_ratio'], '{:.2f}x')}")
        lines.append(f"| {case} | {_fmt(f['p50'])} | {_fmt(f['p90'])} | {_fmt(f['p99'])} | {added} | {ratios} | "
                     f"{_fmt(f['achieved'], '{:.0f}')} | {_fmt(f['throughput'], '{:.0f}')} | "
                     f"{_fmt(f['throughput_ratio'], '{:.2f}x')} | {_fmt(f['cpu_ms'])} | "
                     f"{_fmt(f['cpu_ms_ratio'], '{:.2f}x')} |")
    return "\n".join(lines)


def run(args) -> int:
    started, revision, work, venv_bin = start_run(args.venv)
    rounds = {case: [] for case in CASES}
    print(f"bench.grpc_unary: {args.rounds} rounds; {args.rate:g} calls/s for {args.latency_seconds:g} s, then "
          f"unpaced for {args.throughput_seconds:g} s, per case; work dir {work}", flush=True)
    with ExitStack() as stack:
        ws = Workspace(work, stack, venv_bin)
        backend_port = start_greeter(ws)
        targets = {"direct": ([], f"127.0.0.1:{backend_port}", None),
                   "txmesh-pair": txmesh_pair(ws, backend_port), "envoy-pair": envoy_pair(ws, backend_port)}
        for index in range(1, args.rounds + 1):
            print(f"round {index}/{args.rounds}", flush=True)
            for case, (proxies, target, authority) in targets.items():
                latency = load(args, ws, target, authority, f"r{index}-{case}-latency", args.rate,
                               args.latency_seconds, 1, proxies)
                throughput = load(args, ws, target, authority, f"r{index}-{case}-throughput", 0,
                                  args.throughput_seconds, args.threads, proxies)
                rounds[case].append({"latency": latency, "throughput": throughput})
                ms = latency["latency_ms"]
                print(f"  {case:<12} p50 {_fmt(ms['p50'])} ms  p90 {_fmt(ms['p90'])} ms  p99 {_fmt(ms['p99'])} ms  "
                      f"({latency['rate']:.0f} calls/s)  max {throughput['rate']:.0f} calls/s", flush=True)
    summary = summarize(rounds)
    table = markdown(summary)
    meta = {"started": started, "command": shlex.join(sys.orig_argv), "revision": revision, "rounds": args.rounds,
            "load": f"bench.grpc_load --processes {args.processes}: --rate {args.rate:g} (1 call in flight per "
                    f"process) for {args.latency_seconds:g} s, then --threads {args.threads} unpaced for "
                    f"{args.throughput_seconds:g} s",
            **tool_versions(venv_bin)}
    base = write_table_results(args.results_dir, "grpc", "gRPC unary calls", meta, table,
                               {"summary": summary, "rounds": rounds})
    print(f"results: {base}.md, {base}.json; raw logs: {work}")
    return 0


def main(argv=None) -> int:
    return run_main("bench.grpc_unary", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
