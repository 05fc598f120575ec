"""Two or more txmesh trees side by side on the HTTP/2 pair, round by round: for comparing one change.

``bench.run`` measures one tree against Envoy; on this host its rounds move by a fifth from one
minute to the next, which is more than most changes to the request path.  This tool starts one
``txmesh-pair-h2`` topology per ``--tree`` (and ``envoy-pair-h2`` for ``--tree envoy``), all behind
the same nginx, then in each round measures every tree in turn, so that each tree sees the host as
the others did a few seconds apart:

- latency: ``h2load -c4 -m8 --rps 250 -D SECONDS`` (1000 req/s offered, as ``bench.run``), p50,
  p90 and p99 of the requests (total, not added: the trees share the baseline);
- the proxies' CPU per request over that run (utime + stime of both sidecars, from /proc), which
  moves much less than the latency;
- throughput: ``h2load -t1 -c4 -m8 -D 5`` and ``-c16``, as ``bench.run``.

It prints each round and the medians.  Every tree runs ``mesh`` from its own directory (PYTHONPATH),
so export the revisions first, each with the C module copied in::

    git archive HEAD~1 | tar -x -C /tmp/before; cp mesh/proxy/codec/*.so /tmp/before/mesh/proxy/codec/
    .venv/bin/python -m bench.pair_ab --tree /tmp/before --tree . --tree envoy --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench import topologies
from bench.loadgen import LoadGenerator
from bench.procs import cpu_seconds

#: What each round measures, in the order printed.
COLUMNS = ("cpu_us", "p50", "p90", "p99", "c4", "c16")
#: The paced run, as bench.run's defaults: 4 connections x 250 req/s.
CLIENTS, RPS_PER_CLIENT = 4, 250
#: h2load -D of each throughput run.
THROUGHPUT_SECONDS = 5


def start(ws: topologies.Workspace, backend_port: int, tree: str, index: int) -> topologies.Target:
    """The pair of ``tree`` (a directory with ``mesh/``, or ``envoy``), ready."""
    if tree == "envoy":
        return topologies.envoy_pair_h2(ws, backend_port)
    return topologies.txmesh_pair_h2(ws, backend_port, repo=Path(tree).resolve(), tag=f"-{index}")


def measure(load: LoadGenerator, target: topologies.Target, seconds: int) -> dict:
    """One round of ``target``: latency and CPU per request at 1000 req/s, then throughput."""
    before = sum(cpu_seconds(proxy.pid) for proxy in target.proxies)
    latency = load.latency(target.url, target.host, "latency", CLIENTS, RPS_PER_CLIENT, seconds, target.h2_streams)
    cpu = sum(cpu_seconds(proxy.pid) for proxy in target.proxies) - before
    row = {"cpu_us": cpu * 1e6 / latency.ok, "p50": latency.p50, "p90": latency.p90, "p99": latency.p99}
    for clients in (4, 16):
        row[f"c{clients}"] = load.throughput(target.url, target.host, "throughput", clients, THROUGHPUT_SECONDS,
                                             target.h2_streams).rps
    return row


def show(label: str, tree: str, row: dict) -> str:
    return (f"{label} {tree[-24:]:>24}: CPU {row['cpu_us']:4.0f} us/req  p50 {row['p50']:.2f}  p90 {row['p90']:.2f}  "
            f"p99 {row['p99']:.2f} ms  -c4 {row['c4']:6.0f}  -c16 {row['c16']:6.0f} req/s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pair_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True,
                        help="a directory holding mesh/ (an export of a revision), or 'envoy'; repeat")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default: %(default)s)")
    parser.add_argument("--latency-seconds", type=int, default=10,
                        help="h2load -D of the paced run (default: %(default)s)")
    parser.add_argument("--venv", help="virtualenv holding twistd (default: as bench.run)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pair-ab-"))
    work.chmod(0o755)  # nginx's workers read their files from it
    rounds: dict[str, list[dict]] = {tree: [] for tree in args.tree}
    load = LoadGenerator(work)
    with ExitStack() as stack:
        ws = topologies.Workspace(work, stack, topologies.find_venv_bin(args.venv))
        backend = topologies.start_backend(ws)
        targets = {tree: start(ws, backend, tree, index) for index, tree in enumerate(args.tree)}
        for target in targets.values():  # warm-up: pools, caches, the specialising interpreter
            load.throughput(target.url, target.host, "warmup", CLIENTS, 2, target.h2_streams)
        for number in range(args.rounds):
            for tree, target in targets.items():
                rounds[tree].append(measure(load, target, args.latency_seconds))
                print(show(f"round {number + 1}", tree, rounds[tree][-1]), flush=True)
    for tree, rows in rounds.items():
        print(show("median ", tree, {column: statistics.median(row[column] for row in rows) for column in COLUMNS}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
