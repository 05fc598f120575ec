"""``meshctl top [NAME | --admin HOST:PORT] [--by route|path] [--duration D] [tap filters]``.

Golden metrics per route (VirtualService http route) or per path, live, from one sidecar's tap
(:mod:`mesh.cli.tap`), as ``linkerd viz top``: requests, req/s, success rate (non-5xx) and
p50/p95/p99 latency of the requests seen since it started.  On a terminal the table is redrawn
every ``--interval``; otherwise (or with ``-o json``) it is printed once, when ``--duration``
is over or on Ctrl-C.  Events the sidecar dropped (``--max-rps``, a slow terminal) are not
counted; the table says how many.
"""

from __future__ import annotations

import collections
import json
import math
import sys
import threading
import time

from mesh.cli.admin_client import AdminError, table
from mesh.cli.golden import format_ms, format_rate
from mesh.cli.proxies import add_proxy_arguments
from mesh.cli.tap import add_filter_arguments, open_tap
from mesh.durations import duration_argument

#: Durations kept per row for the percentiles (the latest ones).
SAMPLES_PER_ROW = 10000
KEYS = {"route": (("DIRECTION", "ROUTE"), lambda e: (e.get("direction"), e.get("route") or "-")),
        "path": (("DIRECTION", "AUTHORITY", "METHOD", "PATH"),
                 lambda e: (e.get("direction"), e.get("authority"), e.get("method"),
                            (e.get("path") or "").partition("?")[0]))}


def add_parser(subparsers):
    parser = subparsers.add_parser("top", help="live golden metrics per route or path of one sidecar (from tap)")
    add_proxy_arguments(parser, "to watch")
    add_filter_arguments(parser)
    parser.add_argument("--by", choices=sorted(KEYS), default="route", help="one row per route (default) or path")
    parser.add_argument("--duration", type=duration_argument, metavar="DURATION", help="stop after this long")
    parser.add_argument("--interval", type=duration_argument, default=1.0, metavar="DURATION",
                        help="redraw period on a terminal (default 1s)")
    parser.add_argument("--limit", type=int, default=20, metavar="N", help="rows shown, busiest first (default 20)")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    parser.set_defaults(func=run)


class Row:
    """What was seen of one route or path."""

    def __init__(self):
        self.count = 0
        self.failures = 0
        self.durations = collections.deque(maxlen=SAMPLES_PER_ROW)

    def add(self, event) -> None:
        self.count += 1
        if str(event.get("status", "")).startswith("5"):
            self.failures += 1
        self.durations.append(float(event.get("duration_ms") or 0.0))

    def percentile(self, q: float):
        """Nearest-rank percentile of the kept durations (ms), or None."""
        values = sorted(self.durations)
        return values[max(0, math.ceil(q * len(values)) - 1)] if values else None


class Top:
    """Rows by key, fed from the tap stream's thread and read by the display (hence the lock)."""

    def __init__(self, by: str, clock=time.monotonic):
        self.headers, self.key_of = KEYS[by]
        self.rows = {}
        self.dropped = {}
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()

    def add(self, document) -> None:
        with self._lock:
            if "dropped" in document:
                self.dropped = document["dropped"]
                return
            self.rows.setdefault(self.key_of(document), Row()).add(document)

    def snapshot(self, limit: int) -> list:
        """Dicts of the busiest ``limit`` rows."""
        elapsed = max(self._clock() - self._started, 1e-3)
        with self._lock:
            busiest = sorted(self.rows.items(), key=lambda item: (-item[1].count, item[0]))[:limit]
            return [{"key": list(key), "requests": row.count, "rps": row.count / elapsed,
                     "success_rate": 1 - row.failures / row.count, "p50_ms": row.percentile(0.5),
                     "p95_ms": row.percentile(0.95), "p99_ms": row.percentile(0.99)} for key, row in busiest]

    def render(self, limit: int) -> str:
        rows = self.snapshot(limit)
        text = table(self.headers + ("REQUESTS", "RPS", "SUCCESS", "P50", "P95", "P99"), [
            [*row["key"], row["requests"], f"{row['rps']:.2f}", format_rate(row["success_rate"]),
             format_ms(row["p50_ms"]), format_ms(row["p95_ms"]), format_ms(row["p99_ms"])] for row in rows]) \
            if rows else "no requests yet"
        if any(self.dropped.values()):
            text += (f"\n(not counted: {self.dropped.get('slow_client', 0)} dropped while reading too slowly, "
                     f"{self.dropped.get('rate_limit', 0)} over --max-rps)")
        return text


def run(args) -> int:
    try:
        stream = open_tap(args)
    except AdminError as error:
        print(f"meshctl top: {error}", file=sys.stderr)
        return 1
    print(f"watching {args.name or args.admin or 'the sidecar'}; Ctrl-C to stop", file=sys.stderr, flush=True)
    top = Top(args.by)
    stream.close_after(args.duration)
    live = sys.stdout.isatty() and args.output == "table"
    reader = threading.Thread(target=lambda: [top.add(document) for document in stream], daemon=True)
    reader.start()
    try:
        while reader.is_alive():
            reader.join(args.interval)
            if live:
                print("\x1b[H\x1b[2J" + top.render(args.limit), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()
    if args.output == "json":
        print(json.dumps({"by": args.by, "rows": top.snapshot(args.limit), "dropped": top.dropped}, indent=2))
    elif not live:
        print(top.render(args.limit))
    return 0
