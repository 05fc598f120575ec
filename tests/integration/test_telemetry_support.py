"""Shared helpers of the telemetry integration tests (tests/integration/test_telemetry_*.py); no tests here.

- :class:`Prometheus`: Debian's real ``prometheus`` server, scraping given targets every second
- :func:`promtool_check`: ``promtool check metrics`` on a scrape
- :func:`scrape`: one GET of a metrics endpoint
- :func:`access_log`: the JSON lines of an access-log file
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.parse
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ManagedProcess, free_port, http_request

#: promtool's one complaint about Istio's own metric names, kept for dashboard compatibility.
ISTIO_MILLISECONDS_LINT = 'istio_request_duration_milliseconds use base unit "seconds" instead of "milliseconds"'


def _binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    if path is None:
        raise FileNotFoundError(f"{name} is not installed: run `make bootstrap` (Debian package prometheus)")
    return path


class Prometheus(ManagedProcess):
    """``prometheus`` on a free loopback port, with a temporary config and storage dir.

    ``jobs`` maps a job name to ``(metrics_path, ["host:port", ...])``; every
    target is scraped each second.  :meth:`start` returns once ``/-/ready``
    answers 200.
    """

    kind = "prometheus"
    ready_timeout = 60.0

    def __init__(self, jobs: dict, *, log_dir: Path | None = None):
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="txmesh-prometheus-"))
        self.port = free_port("127.0.0.1")
        home = Path(tempfile.mkdtemp(prefix="prometheus-", dir=log_dir))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": job, "metrics_path": path, "static_configs": [{"targets": targets}]}
                               for job, (path, targets) in jobs.items()],
        }
        (home / "prometheus.yml").write_text(yaml.safe_dump(config))
        argv = [_binary("prometheus"), f"--config.file={home / 'prometheus.yml'}",
                f"--storage.tsdb.path={home / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"]
        super().__init__("prometheus", argv, log_dir / f"prometheus-{self.port}.log", cwd=home)

    def is_ready(self) -> bool:
        return http_request("127.0.0.1", self.port, "/-/ready", timeout=2.0)[0] == 200

    def query(self, promql: str) -> list:
        """The instant vector of ``promql`` now: ``[(labels, float value)]``."""
        status, body = http_request("127.0.0.1", self.port, "/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}))
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise AssertionError(self.describe(f"query {promql!r} failed: {status} {body[:500]!r}"))
        return [(sample["metric"], float(sample["value"][1])) for sample in answer["data"]["result"]]

    def by(self, promql: str, label: str) -> dict:
        """``{label value: value}`` of an instant vector aggregated ``by (label)`` (one series per value)."""
        result = self.query(promql)
        values = {labels.get(label): value for labels, value in result}
        assert len(values) == len(result), f"{promql!r} has several series per {label}: aggregate it by ({label})"
        return values


def scrape(port: int, path: str) -> bytes:
    status, body = http_request("127.0.0.1", port, path)
    assert status == 200, f"GET 127.0.0.1:{port}{path} answered {status}: {body[:300]!r}"
    return body


def series(proxy, name: str) -> list[tuple[dict, float]]:
    """``[(labels, value)]`` of one sample name of a sidecar's ``/stats/prometheus``."""
    text = scrape(proxy.metrics_port, "/stats/prometheus").decode()
    return [(sample.labels, sample.value) for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name]


def total(proxy, name: str, **labels) -> float:
    """The sum of the samples of ``name`` on a sidecar's ``/stats/prometheus`` whose labels include ``labels``."""
    return sum(value for found, value in series(proxy, name) if labels.items() <= found.items())


def promtool_check(text: bytes) -> list[str]:
    """``promtool check metrics`` of a scrape: the problems it printed (it exits 1 on parse errors)."""
    proc = subprocess.run([_binary("promtool"), "check", "metrics"], input=text, capture_output=True, timeout=30)
    output = (proc.stdout + proc.stderr).decode()
    assert proc.returncode in (0, 3), f"promtool could not parse the metrics (exit {proc.returncode}): {output}"
    return [line for line in output.splitlines() if line.strip()]


def access_log(path: Path) -> list[dict]:
    """The entries of an access-log file, every line parsed as JSON."""
    return [json.loads(line) for line in path.read_text().splitlines()]
