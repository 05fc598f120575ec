"""Reduce per-round measurements to medians and ratios; render them as markdown and JSON.

Every figure of a case is the median over rounds.  Added latency is computed
per round (case percentile minus the direct percentile of the same round) and
then reduced to its median, so that a slow round hurts both terms alike.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bench.loadgen import Latency, Throughput

#: (numerator, denominator) case pairs whose ratios are reported when both ran.
RATIO_PAIRS = (("txmesh", "envoy"), ("txmesh-pair", "envoy-pair"))
BASELINE = "direct"
PERCENTILES = ("p50", "p90", "p99")


@dataclass
class RoundResult:
    """What one case measured in one round."""

    latency: Latency
    throughput: dict[int, Throughput]  # wrk connections -> result
    cpu_seconds: Optional[float]  # proxy CPU over the wrk runs; None for no proxy

    @property
    def cpu_per_1k(self) -> Optional[float]:
        """Proxy CPU seconds per 1000 requests completed by wrk."""
        if self.cpu_seconds is None:
            return None
        requests = sum(t.requests for t in self.throughput.values())
        return 1000.0 * self.cpu_seconds / requests if requests else None


@dataclass
class CaseRun:
    """All rounds of one case plus its memory figures (KiB, summed over its proxies)."""

    name: str
    description: str
    rounds: list[RoundResult] = field(default_factory=list)
    idle_rss_kib: Optional[int] = None
    peak_rss_kib: Optional[int] = None
    instructions_per_request: Optional[float] = None  # from --callgrind


def _median(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: dict[str, CaseRun]) -> dict[str, dict[str, Optional[float]]]:
    """Case name -> metric name -> median over rounds (None where not applicable)."""
    baseline = runs.get(BASELINE)
    summary = {}
    for name, run in runs.items():
        row: dict[str, Optional[float]] = {}
        for p in PERCENTILES:
            row[f"{p}_ms"] = _median(getattr(r.latency, p) for r in run.rounds)
        for p in PERCENTILES:
            row[f"added_{p}_ms"] = (
                _median(getattr(r.latency, p) - getattr(b.latency, p) for r, b in zip(run.rounds, baseline.rounds))
                if baseline and name != BASELINE else None
            )
        row["achieved_rps"] = _median(r.latency.achieved_rps for r in run.rounds)
        row["latency_errors"] = sum(r.latency.errors for r in run.rounds)
        for connections in sorted({c for r in run.rounds for c in r.throughput}):
            row[f"wrk_c{connections}_rps"] = _median(r.throughput[connections].rps for r in run.rounds)
        row["wrk_errors"] = sum(t.errors for r in run.rounds for t in r.throughput.values())
        row["cpu_s_per_1k"] = _median(r.cpu_per_1k for r in run.rounds)
        row["idle_rss_mib"] = run.idle_rss_kib / 1024 if run.idle_rss_kib else None
        row["peak_rss_mib"] = run.peak_rss_kib / 1024 if run.peak_rss_kib else None
        row["instructions_per_request"] = run.instructions_per_request
        summary[name] = row
    return summary


#: Metrics compared between two proxies, as (summary key, label).
RATIO_METRICS = (
    ("wrk_c4_rps", "throughput, wrk -c4"),
    ("wrk_c16_rps", "throughput, wrk -c16"),
    ("added_p50_ms", "added p50"),
    ("added_p90_ms", "added p90"),
    ("added_p99_ms", "added p99"),
    ("cpu_s_per_1k", "CPU s / 1000 req"),
    ("idle_rss_mib", "idle RSS"),
    ("peak_rss_mib", "peak RSS"),
    ("instructions_per_request", "instructions / req (callgrind)"),
)


def ratios(summary: dict) -> dict[str, dict[str, Optional[float]]]:
    """"a/b" -> metric -> summary[a][metric] / summary[b][metric], for each ran pair of RATIO_PAIRS."""
    out = {}
    for a, b in RATIO_PAIRS:
        if a in summary and b in summary:
            out[f"{a}/{b}"] = {
                key: summary[a][key] / summary[b][key]
                if summary[a].get(key) is not None and summary[b].get(key) else None
                for key, _ in RATIO_METRICS
            }
    return out


# --- rendering ----------------------------------------------------------------

#: Summary rows, as (key, label, format).
SUMMARY_ROWS = (
    ("p50_ms", "p50 @1000 rps (ms)", "{:.3f}"),
    ("p90_ms", "p90 @1000 rps (ms)", "{:.3f}"),
    ("p99_ms", "p99 @1000 rps (ms)", "{:.3f}"),
    ("added_p50_ms", "added p50 (ms)", "{:+.3f}"),
    ("added_p90_ms", "added p90 (ms)", "{:+.3f}"),
    ("added_p99_ms", "added p99 (ms)", "{:+.3f}"),
    ("achieved_rps", "achieved rate (req/s)", "{:.0f}"),
    ("latency_errors", "h2load non-2xx (all rounds)", "{:.0f}"),
    ("wrk_c4_rps", "throughput wrk -c4 (req/s)", "{:.0f}"),
    ("wrk_c16_rps", "throughput wrk -c16 (req/s)", "{:.0f}"),
    ("wrk_errors", "wrk errors (all rounds)", "{:.0f}"),
    ("cpu_s_per_1k", "proxy CPU s / 1000 req", "{:.3f}"),
    ("idle_rss_mib", "proxy idle RSS (MiB)", "{:.1f}"),
    ("peak_rss_mib", "proxy peak RSS (MiB)", "{:.1f}"),
    ("instructions_per_request", "proxy instructions / req (callgrind)", "{:,.0f}"),
)


def _fmt(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def markdown_tables(summary: dict, ratio_table: dict) -> str:
    """The summary (one column per case) and the ratio table, as GitHub markdown."""
    cases = list(summary)
    lines = ["| metric (median of rounds) | " + " | ".join(cases) + " |",
             "|---|" + "---:|" * len(cases)]
    for key, label, pattern in SUMMARY_ROWS:
        values = [summary[c].get(key) for c in cases]
        if any(v is not None for v in values):
            lines.append(f"| {label} | " + " | ".join(_fmt(v, pattern) for v in values) + " |")
    if ratio_table:
        pairs = list(ratio_table)
        lines += ["", "| ratio | " + " | ".join(pairs) + " |", "|---|" + "---:|" * len(pairs)]
        for key, label in RATIO_METRICS:
            values = [ratio_table[p].get(key) for p in pairs]
            if any(v is not None for v in values):
                lines.append(f"| {label} | " + " | ".join(_fmt(v, "{:.2f}x") for v in values) + " |")
    return "\n".join(lines) + "\n"


def round_table(runs: dict[str, CaseRun]) -> str:
    """Per-round raw figures, to judge the spread behind the medians."""
    lines = ["| round | case | p50 | p90 | p99 (ms) | achieved rps | wrk rps | CPU s/1k |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    rounds = max(len(run.rounds) for run in runs.values())
    for index in range(rounds):
        for name, run in runs.items():
            if index < len(run.rounds):
                r = run.rounds[index]
                wrk = " / ".join(f"{t.rps:.0f}" for _, t in sorted(r.throughput.items()))
                lines.append(f"| {index + 1} | {name} | {r.latency.p50:.3f} | {r.latency.p90:.3f} | "
                             f"{r.latency.p99:.3f} | {r.latency.achieved_rps:.0f} | {wrk} | "
                             f"{_fmt(r.cpu_per_1k, '{:.3f}')} |")
    return "\n".join(lines) + "\n"


def write_results(path_stem: Path, meta: dict, runs: dict[str, CaseRun], summary: dict,
                  ratio_table: dict) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (everything) and ``<stem>.md`` (summary); return both paths."""
    json_path, md_path = path_stem.with_suffix(".json"), path_stem.with_suffix(".md")
    raw = {name: dataclasses.asdict(run) for name, run in runs.items()}
    json_path.write_text(json.dumps({"meta": meta, "summary": summary, "ratios": ratio_table, "runs": raw},
                                    indent=2) + "\n")
    cases = "\n".join(f"- **{name}**: {run.description}" for name, run in runs.items())
    settings = "\n".join(f"- {key}: `{value}`" for key, value in meta.items())
    md_path.write_text(
        f"# txmesh bench run {meta['started']}\n\n{settings}\n\n## Cases\n{cases}\n\n"
        f"## Summary\n{markdown_tables(summary, ratio_table)}\n## Rounds\n{round_table(runs)}"
    )
    return json_path, md_path
