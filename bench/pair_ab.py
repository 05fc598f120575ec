"""Two or more txmesh trees side by side on a pair, round by round: for comparing one change.

``bench.run`` measures one tree against Envoy; on this host its rounds move by a fifth from one
minute to the next, which is more than most changes to the request path.  This tool starts one
pair per ``--tree`` (``envoy`` for Envoy's pair, ``direct`` for nginx alone), all behind the same
nginx, then in each round measures every tree in turn, so that each tree sees the host as the
others did a few seconds apart.  ``--protocol h2`` (the default) runs ``txmesh-pair-h2`` and
``envoy-pair-h2``; ``--protocol http1`` runs ``txmesh-pair`` and ``envoy-pair``; ``--telemetry``
their ``-telemetry`` variants (Istio's default telemetry in both); ``--workers N`` gives each txmesh
sidecar ``--workers N`` and each Envoy ``--concurrency N``.  Each round measures:

- latency: ``h2load -c4 --rps 250 -D SECONDS`` (1000 req/s offered, as ``bench.run``; ``-m8`` for
  HTTP/2, ``--h1`` for HTTP/1.1), p50, p90 and p99 of the requests;
- the proxies' CPU per request over that run (utime + stime of both sidecars, their workers
  included, from /proc), which moves much less than the latency;
- throughput: ``h2load -t1 -c4 -m8 -D 5`` and ``-c16`` (HTTP/2), ``wrk -t1 -c4 -d5s`` and ``-c16``
  (HTTP/1.1), as ``bench.run``.

It prints each round and the medians.  With ``--tree direct`` it also prints each tree's added
latency (its p50 and p90 less direct's of the same round), and with ``--tree envoy`` too, each
tree's ratio to Envoy's added latency per round: the median of those ratios and how many rounds
were at most 1.0 (issue #15's latency target).  With ``envoy``, it prints each tree's max req/s
as a ratio to Envoy's per round too: the median, and how many rounds were at least 1.0 (the workers
target).  Every tree runs ``mesh`` from its own directory (PYTHONPATH),
so export the revisions first, each with the C module copied in::

    git archive HEAD~1 | tar -x -C /tmp/before; cp mesh/proxy/codec/*.so /tmp/before/mesh/proxy/codec/
    .venv/bin/python -m bench.pair_ab --tree /tmp/before --tree . --tree envoy --rounds 5
    .venv/bin/python -m bench.pair_ab --protocol http1 --telemetry --tree . --tree envoy --tree direct

(``direct`` is spoken to in HTTP/1.1 whatever ``--protocol`` says: nginx has no HTTP/2 here.)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench import topologies
from bench.loadgen import LoadGenerator
from bench.procs import tree_cpu_seconds

#: What each round measures, in the order printed.
COLUMNS = ("cpu_us", "p50", "p90", "p99", "c4", "c16")
#: The paced run, as bench.run's defaults: 4 connections x 250 req/s.
CLIENTS, RPS_PER_CLIENT = 4, 250
#: h2load -D of each throughput run.
THROUGHPUT_SECONDS = 5


def start(ws: topologies.Workspace, backend_port: int, tree: str, index: int, h2: bool,
          telemetry: str | None, workers: int = 1) -> topologies.Target:
    """The pair of ``tree`` (a directory with ``mesh/``, ``envoy`` or ``direct``), ready."""
    if tree == "direct":
        return topologies.direct(ws, backend_port)
    if tree == "envoy":
        return topologies.envoy_pair(ws, backend_port, h2=h2, concurrency=workers, telemetry=telemetry)
    target = topologies.txmesh_pair(ws, backend_port, workers=workers, telemetry=telemetry,
                                    repo=Path(tree).resolve(), tag=f"-{index}")
    if h2:
        target.h2_streams = topologies.H2_STREAMS
    return target


def measure(load: LoadGenerator, target: topologies.Target, seconds: int) -> dict:
    """One round of ``target``: latency and CPU per request at 1000 req/s, then throughput."""
    before = sum(tree_cpu_seconds(proxy.pid) for proxy in target.proxies)
    latency = load.latency(target.url, target.host, "latency", CLIENTS, RPS_PER_CLIENT, seconds, target.h2_streams)
    cpu = sum(tree_cpu_seconds(proxy.pid) for proxy in target.proxies) - before
    row = {"cpu_us": cpu * 1e6 / latency.ok, "p50": latency.p50, "p90": latency.p90, "p99": latency.p99}
    for clients in (4, 16):
        row[f"c{clients}"] = load.throughput(target.url, target.host, "throughput", clients, THROUGHPUT_SECONDS,
                                             target.h2_streams).rps
    return row


def show(label: str, tree: str, row: dict) -> str:
    return (f"{label} {tree[-24:]:>24}: CPU {row['cpu_us']:4.0f} us/req  p50 {row['p50']:.2f}  p90 {row['p90']:.2f}  "
            f"p99 {row['p99']:.2f} ms  -c4 {row['c4']:6.0f}  -c16 {row['c16']:6.0f} req/s")


def added_latency(rounds: dict[str, list[dict]]) -> list[str]:
    """Lines for each tree's added p50 and p90 (less ``direct``'s of the same round), and with
    ``envoy`` among the trees each tree's ratio to Envoy's: the median over the rounds and how many
    rounds were at most 1.0.  Empty without ``direct``."""
    if "direct" not in rounds:
        return []
    base = rounds["direct"]
    added = {tree: [{q: row[q] - base[number][q] for q in ("p50", "p90")} for number, row in enumerate(rows)]
             for tree, rows in rounds.items() if tree != "direct"}
    lines = []
    for tree, rows in added.items():
        line = f"added   {tree[-24:]:>24}: " + "  ".join(
            f"{q} +{statistics.median(row[q] for row in rows):.3f} ms" for q in ("p50", "p90"))
        if "envoy" in added and tree != "envoy":
            for q in ("p50", "p90"):
                line += _versus_envoy(q, [row[q] / envoy[q] for row, envoy in zip(rows, added["envoy"])
                                          if envoy[q] > 0], at_most=True)
        lines.append(line)
    return lines


def throughput_versus_envoy(rounds: dict[str, list[dict]]) -> list[str]:
    """Lines for each tree's max req/s (-c4, -c16) as a ratio to Envoy's in the same round: the median
    over the rounds and how many rounds were at least 1.0.  Empty without ``envoy``."""
    if "envoy" not in rounds:
        return []
    return [f"req/s   {tree[-24:]:>24}:" + "".join(
                _versus_envoy(column, [row[column] / envoy[column] for row, envoy in zip(rows, rounds["envoy"])
                                       if envoy[column] > 0], at_most=False) for column in ("c4", "c16"))
            for tree, rows in rounds.items() if tree not in ("envoy", "direct")]


def _versus_envoy(label: str, ratios: list[float], at_most: bool) -> str:
    """`` LABEL vs Envoy MEDIANx (MIN-MAX, <= 1.0 in K/N)`` (``>=`` unless ``at_most``); empty without ratios."""
    if not ratios:
        return ""
    met = sum((ratio <= 1.0) if at_most else (ratio >= 1.0) for ratio in ratios)
    return (f"  {label} vs Envoy {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}, "
            f"{'<=' if at_most else '>='} 1.0 in {met}/{len(ratios)})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pair_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True,
                        help="a directory holding mesh/ (an export of a revision), 'envoy' or 'direct'; repeat")
    parser.add_argument("--protocol", choices=("h2", "http1"), default="h2",
                        help="the pairs' protocol: txmesh-pair-h2 and envoy-pair-h2, or txmesh-pair and envoy-pair "
                             "(default: %(default)s)")
    parser.add_argument("--telemetry", action="store_true",
                        help="Istio's default telemetry in both (the *-telemetry cases)")
    parser.add_argument("--workers", type=int, default=1,
                        help="txmesh --workers N, Envoy --concurrency N, in each sidecar (default: %(default)s)")
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
        telemetry = topologies.TELEMETRY if args.telemetry else None
        targets = {tree: start(ws, backend, tree, index, args.protocol == "h2", telemetry, args.workers)
                   for index, tree in enumerate(args.tree)}
        for target in targets.values():  # warm-up: pools, caches, the specialising interpreter
            load.throughput(target.url, target.host, "warmup", CLIENTS, 2, target.h2_streams)
        for number in range(args.rounds):
            for tree, target in targets.items():
                rounds[tree].append(measure(load, target, args.latency_seconds))
                print(show(f"round {number + 1}", tree, rounds[tree][-1]), flush=True)
    for tree, rows in rounds.items():
        print(show("median ", tree, {column: statistics.median(row[column] for row in rows) for column in COLUMNS}))
    for line in added_latency(rounds) + throughput_versus_envoy(rounds):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
