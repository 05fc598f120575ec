"""The load generators: h2load for latency at a fixed offered rate, wrk for throughput.

Both are run as real programs (:func:`bench.procs.run_tool`) and their output
is parsed here.  The parsers are plain functions of text, so they can be
checked against a saved log without running anything.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, run_tool


@dataclass(frozen=True)
class Latency:
    """One h2load run: percentiles in milliseconds over the 2xx responses."""

    p50: float
    p90: float
    p99: float
    offered_rps: float
    achieved_rps: float
    ok: int  # 2xx responses in the log
    errors: int  # requests h2load counted that did not get a 2xx response


@dataclass(frozen=True)
class Throughput:
    """One wrk run."""

    rps: float
    requests: int
    errors: int  # non-2xx/3xx responses plus socket errors


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending, non-empty sequence."""
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def parse_h2load_log(text: str) -> list[float]:
    """Parse h2load's ``--log-file``: return the durations of 2xx responses in ms, sorted.

    Each row is ``start_us<TAB>status<TAB>duration_us``; status -1 is a failed
    stream.  Columns beyond the third (``man h2load``: "more columns may be
    added later") are ignored.
    """
    durations = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and 200 <= int(fields[1]) < 300:
            durations.append(int(fields[2]) / 1000.0)
    durations.sort()
    return durations


_H2LOAD_FINISHED = re.compile(r"^finished in [\d.]+m?s, ([\d.]+) req/s", re.M)
_H2LOAD_TOTAL = re.compile(r"^requests: (\d+) total,", re.M)
_H2LOAD_2XX = re.compile(r"^status codes: (\d+) 2xx,", re.M)


def parse_h2load_summary(text: str) -> tuple[float, int]:
    """From h2load's stdout: (achieved req/s, requests counted that got no 2xx response)."""
    finished, total, ok = (regex.search(text) for regex in (_H2LOAD_FINISHED, _H2LOAD_TOTAL, _H2LOAD_2XX))
    if not (finished and total and ok):
        raise BenchError(f"cannot parse h2load output:\n{text[-2000:]}")
    return float(finished.group(1)), int(total.group(1)) - int(ok.group(1))


_WRK_REQUESTS = re.compile(r"^\s*(\d+) requests in ", re.M)
_WRK_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_WRK_NON2XX = re.compile(r"^\s*Non-2xx or 3xx responses: (\d+)", re.M)
_WRK_SOCKET = re.compile(r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M)


def parse_wrk(text: str) -> Throughput:
    """Parse wrk's stdout (default report, no Lua script)."""
    requests, rps = _WRK_REQUESTS.search(text), _WRK_RPS.search(text)
    if not requests or not rps:
        raise BenchError(f"cannot parse wrk output:\n{text[-2000:]}")
    non2xx = _WRK_NON2XX.search(text)
    sockets = _WRK_SOCKET.search(text)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sockets.groups())) if sockets else 0)
    return Throughput(rps=float(rps.group(1)), requests=int(requests.group(1)), errors=errors)


class LoadGenerator:
    """Runs h2load and wrk against a URL, optionally pinned with ``taskset``.

    ``cpus`` is a taskset CPU list (e.g. "0") or None for no pinning.
    ``log_dir`` receives the raw output of every run.
    """

    def __init__(self, log_dir: Path, cpus: str | None = None):
        self.log_dir = log_dir
        self.prefix = ["taskset", "-c", cpus] if cpus else []

    def latency(
        self, url: str, host: str | None, tag: str, clients: int, rps_per_client: int, seconds: int,
        h2_streams: int = 0,
    ) -> Latency:
        """Offer ``clients * rps_per_client`` req/s for ``seconds`` with h2load over HTTP/1.1
        (``h2_streams`` N: over HTTP/2, up to N streams per connection)."""
        log_file = self.log_dir / f"{tag}.h2load.tsv"
        log_file.unlink(missing_ok=True)  # h2load appends to it
        argv = [*self.prefix, "h2load", *_protocol(h2_streams), "-c", str(clients), "--rps", str(rps_per_client),
                "-D", str(seconds), f"--log-file={log_file}"]
        if host:
            # "-H host: x" would add a second Host header; :authority replaces it.
            argv += ["-H", f":authority: {host}"]
        out = run_tool([*argv, url], timeout=seconds + 30, log_path=self.log_dir / f"{tag}.h2load.out")
        achieved, errors = parse_h2load_summary(out)
        durations = parse_h2load_log(log_file.read_text())
        if not durations:
            summary = next((line for line in out.splitlines() if line.startswith("requests:")), "")
            raise BenchError(f"h2load got no 2xx response from {url} in {seconds}s ({summary}); "
                             f"see {self.log_dir / tag}.h2load.out and the proxy's log")
        return Latency(
            p50=percentile(durations, 50),
            p90=percentile(durations, 90),
            p99=percentile(durations, 99),
            offered_rps=float(clients * rps_per_client),
            achieved_rps=achieved,
            ok=len(durations),
            errors=errors,
        )

    def fixed_count(self, url: str, host: str | None, tag: str, requests: int, h2_streams: int = 0) -> None:
        """Send exactly ``requests`` requests, one at a time, over one connection; all must get a 2xx.

        ``h2_streams`` N: over HTTP/2 (one stream at a time all the same)."""
        argv = [*self.prefix, "h2load", *(("--h1",) if not h2_streams else ()), "-c", "1", "-n", str(requests)]
        if host:
            argv += ["-H", f":authority: {host}"]
        out = run_tool([*argv, url], timeout=3600, log_path=self.log_dir / f"{tag}.h2load.out")
        _, errors = parse_h2load_summary(out)
        if errors:
            raise BenchError(f"{errors} of {requests} requests to {url} got no 2xx response")

    def throughput(self, url: str, host: str | None, tag: str, connections: int, seconds: int,
                   h2_streams: int = 0) -> Throughput:
        """Closed-loop maximum throughput with one wrk thread and ``connections`` connections.

        wrk speaks HTTP/1.1 only: with ``h2_streams`` N, h2load does it instead, over HTTP/2 with
        up to N streams per connection (one thread too)."""
        if h2_streams:
            return self._h2_throughput(url, host, tag, connections, seconds, h2_streams)
        argv = [*self.prefix, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
        if host:
            argv += ["-H", f"Host: {host}"]  # wrk replaces its own Host header with this one
        out = run_tool([*argv, url], timeout=seconds + 30, log_path=self.log_dir / f"{tag}.wrk.out")
        return parse_wrk(out)

    def _h2_throughput(self, url, host, tag, connections, seconds, streams) -> Throughput:
        argv = [*self.prefix, "h2load", "-t1", "-c", str(connections), "-m", str(streams), "-D", str(seconds)]
        if host:
            argv += ["-H", f":authority: {host}"]
        out = run_tool([*argv, url], timeout=seconds + 30, log_path=self.log_dir / f"{tag}.h2load.out")
        rps, _ = parse_h2load_summary(out)
        counts = _H2LOAD_COUNTS.search(out)
        if not counts:
            raise BenchError(f"cannot parse h2load output:\n{out[-2000:]}")
        done, succeeded = map(int, counts.groups())
        # in duration mode "total" counts the requests still in flight at the end: compare what finished
        return Throughput(rps=rps, requests=done, errors=done - succeeded)


_H2LOAD_COUNTS = re.compile(r"^requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded,", re.M)


def _protocol(h2_streams: int) -> tuple:
    """h2load's options for HTTP/1.1 (0) or HTTP/2 with up to ``h2_streams`` streams per connection."""
    return ("-m", str(h2_streams)) if h2_streams else ("--h1",)
