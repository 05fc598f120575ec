"""``meshctl stat [NAME] [--by workload|service] [--window 10s] [--prometheus URL | --metrics HOST:PORT]``.

Golden metrics (success rate, requests per second, p50/p95/p99 latency) per workload -- what its
sidecar saw arrive -- or per destination service and version -- what the callers' sidecars saw,
including the failures that never reached it -- as ``linkerd viz stat``.  Read from Istio's
metrics (:mod:`mesh.cli.golden`), either straight from the sidecars (found through the control
plane, or given with ``--metrics``; two scrapes ``--window`` apart) or from Prometheus
(``--prometheus``: ``increase()`` over the window).
"""

from __future__ import annotations

import json
import sys

from mesh.cli import golden
from mesh.cli.admin_client import AdminError, parse_address, table
from mesh.cli.proxies import add_control_option, list_proxies
from mesh.cli.stat_sources import prometheus_increases, sidecar_increases
from mesh.durations import duration_argument
from mesh.sidecar_contract import METRICS_PORT


def add_parser(subparsers):
    parser = subparsers.add_parser("stat", help="success rate, req/s and latency per workload or service")
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help="only this workload (or NAMESPACE/WORKLOAD), or service with --by service")
    parser.add_argument("--by", choices=sorted(golden.GROUPINGS), default="workload",
                        help="workload: as its own sidecar saw requests arrive (default); service: as the "
                             "callers' sidecars saw them, per destination service and version")
    parser.add_argument("--window", type=duration_argument, default=10.0, metavar="DURATION",
                        help="the interval the rates are computed over (default 10s)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prometheus", metavar="URL", help="read the metrics from this Prometheus server")
    source.add_argument("--metrics", action="append", metavar="HOST:PORT",
                        help="scrape this sidecar metrics port (repeatable) instead of asking the control plane")
    add_control_option(parser)
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    parser.set_defaults(func=run)


def run(args) -> int:
    grouping = golden.GROUPINGS[args.by]
    try:
        if args.prometheus:
            requests, buckets, seconds = prometheus_increases(args.prometheus, grouping, args.window)
            source = f"Prometheus {args.prometheus}"
        else:
            targets = _targets(args)
            requests, buckets, seconds, problems = sidecar_increases(
                targets, args.window, lambda: print(f"sampling {len(targets)} sidecar(s) for {args.window:g}s ...",
                                                    file=sys.stderr, flush=True))
            for problem in problems:
                print(f"meshctl stat: left out: {problem}", file=sys.stderr)
            source = f"{len(targets)} sidecar(s)"
    except AdminError as error:
        print(f"meshctl stat: {error}", file=sys.stderr)
        return 1
    rows = [row for row in golden.rows(golden.group(requests, buckets, grouping), seconds)
            if _wanted(row["name"], args.name, args.by)]
    if args.output == "json":
        print(json.dumps({"by": args.by, "seconds": seconds, "source": source, "rows": rows}, indent=2))
        return 0
    if not rows:
        scope = f" for {args.name}" if args.name else ""
        print(f"no requests{scope} in the last {args.window:g}s ({source}); send some traffic or widen --window")
        return 0
    print(render(rows, grouping))
    return 0


def _targets(args) -> list:
    """``[(host, port)]`` of the sidecar metrics ports to scrape."""
    if args.metrics:
        return [parse_address(address, METRICS_PORT) for address in args.metrics]
    rows = [row for row in list_proxies(args.control_admin) if row.get("connected", True)]
    targets = [(row["address"], row["metrics_port"]) for row in rows if row.get("metrics_port") and row.get("address")]
    if not targets:
        raise AdminError(f"no connected proxy of the control plane at {args.control_admin} announced a metrics "
                         "port (meshctl proxy-status lists them); give sidecars with --metrics HOST:PORT, or "
                         "a Prometheus server with --prometheus URL")
    return targets


def _wanted(name, wanted, by) -> bool:
    if not wanted:
        return True
    first, second = name
    if by == "workload":
        return wanted in (second, f"{first}/{second}")
    return wanted in (first, first.split(".")[0])


def render(rows, grouping) -> str:
    return table(grouping.headers + ("SUCCESS", "RPS", "P50", "P95", "P99", "REQUESTS"), [
        [*row["name"], golden.format_rate(row["success_rate"]), f"{row['rps']:.2f}",
         golden.format_ms(row["p50_ms"]), golden.format_ms(row["p95_ms"]), golden.format_ms(row["p99_ms"]),
         row["requests"]] for row in rows])
