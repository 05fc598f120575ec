"""A small gRPC load generator: unary calls from several processes, with grpcio.

Usage (run by :mod:`bench.grpc_unary`)::

    python -m bench.grpc_load --target 127.0.0.1:PORT [--authority HOST] --seconds S
                              --processes N [--threads T] [--rate CALLS_PER_S]

Each process opens one HTTP/2 channel (h2c, prior knowledge) to ``--target`` and calls
``/demo.Greeter/SayHello`` (:mod:`mesh.demo.grpc_app`) from ``--threads`` threads, one call at a
time per thread.  With ``--rate`` the calls are paced to that many per second in all (an even
share per thread); a call that cannot start on time starts at once and the schedule moves on
without it, so the achieved rate is reported as well (as h2load does in rate mode).  Without
``--rate`` the threads call back to back: the maximum throughput.  Latency is measured from the
start of each call to its answer.  The last line of stdout is JSON: ``completed``, ``failed``,
``errors`` (the first few), ``seconds``, and ``latency_ms``: percentiles ``p50``, ``p90``, ``p99``.

It is a Python client: its own cost (about 0.1 ms per call on this machine) is in every case's
figures, the direct baseline's too, so compare added latencies and ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import threading
import time

METHOD = "/demo.Greeter/SayHello"
MAX_ERRORS = 5


def _thread(stub, deadline: float, interval: float, start: float, out: dict) -> None:
    """Call until ``deadline``; every ``interval`` seconds from ``start`` when ``interval`` is set."""
    import grpc

    latencies, errors = out["latencies"], out["errors"]
    due = start
    while True:
        now = time.perf_counter()
        if now >= deadline:
            return
        if interval:
            if due > now:
                time.sleep(due - now)
                now = time.perf_counter()
            due = max(due + interval, now - interval)  # behind schedule: do not queue the missed calls
        try:
            stub(b"bench", timeout=10.0)
        except grpc.RpcError as error:
            out["failed"] += 1
            if len(errors) < MAX_ERRORS:
                errors.append(f"{error.code().name}: {error.details()}")
            continue
        latencies.append(time.perf_counter() - now)


def _process(args, rate_share: float, queue) -> None:
    """One client process: a channel, ``args.threads`` threads; puts its results on ``queue``."""
    import grpc

    options = [("grpc.default_authority", args.authority)] if args.authority else []
    with grpc.insecure_channel(args.target, options=options) as channel:
        stub = channel.unary_unary(METHOD)
        stub(b"warm-up", timeout=10.0, wait_for_ready=True)
        start = time.perf_counter()
        deadline = start + args.seconds
        interval = args.threads / rate_share if rate_share else 0.0
        results = [{"latencies": [], "errors": [], "failed": 0} for _ in range(args.threads)]
        threads = [threading.Thread(target=_thread, args=(stub, deadline, interval, start + index * interval /
                                                           args.threads, out))
                   for index, out in enumerate(results)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    queue.put({"latencies": [value for out in results for value in out["latencies"]],
               "errors": [error for out in results for error in out["errors"]],
               "failed": sum(out["failed"] for out in results)})


def percentile(sorted_values: list, fraction: float) -> float | None:
    """The value below which ``fraction`` of ``sorted_values`` lie (nearest rank), or None."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the gRPC server or sidecar")
    parser.add_argument("--authority", default=None, help=":authority of the calls (the service's host)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="calls in flight per process")
    parser.add_argument("--rate", type=float, default=0.0, help="calls per second in all (default: unpaced)")
    args = parser.parse_args(argv)
    context = multiprocessing.get_context("spawn")  # grpcio must not be forked after it started
    queue = context.Queue()
    share = args.rate / args.processes if args.rate else 0.0
    workers = [context.Process(target=_process, args=(args, share, queue)) for _ in range(args.processes)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=args.seconds + 60) for _ in workers]
    for worker in workers:
        worker.join()
    latencies = sorted(value * 1000.0 for result in results for value in result["latencies"])
    print(json.dumps({
        "completed": len(latencies), "failed": sum(result["failed"] for result in results),
        "errors": [error for result in results for error in result["errors"]][:MAX_ERRORS],
        "seconds": args.seconds,
        "latency_ms": {name: percentile(latencies, fraction) for name, fraction in
                       (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
    }))


if __name__ == "__main__":
    main()
