"""Where ``meshctl stat`` reads Istio's metrics: the sidecars themselves, or Prometheus.

Both return increases over a number of seconds, ``(request_increases, bucket_increases,
seconds)``, each ``[(labels, increase)]``, for :func:`mesh.cli.golden.group`:

- :func:`sidecar_increases`: two scrapes of every sidecar's ``/stats/prometheus``, ``window``
  seconds apart, and their difference (exact counts);
- :func:`prometheus_increases`: two PromQL queries (``increase()`` over the window) through
  Prometheus's HTTP API (extrapolated as Prometheus does).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from mesh.cli.admin_client import AdminError
from mesh.cli.golden import BUCKETS, REQUESTS, counter_deltas

METRICS_PATH = "/stats/prometheus"


def scrape(host: str, port: int, timeout: float = 5.0) -> tuple:
    """``(requests, buckets)`` of one sidecar: ``{label items: value}`` of both Istio series."""
    url = f"http://{host}:{port}{METRICS_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as error:
        raise AdminError(f"cannot scrape {url}: {getattr(error, 'reason', error)}; is the sidecar running with "
                         f"--metrics-port {port} (0 turns metrics off)?") from None
    requests, buckets = {}, {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                target = requests if sample.name == REQUESTS else buckets if sample.name == BUCKETS else None
                if target is not None:
                    target[frozenset(sample.labels.items())] = float(sample.value)
    except ValueError as error:
        raise AdminError(f"{url} is not in Prometheus's text format ({error}); is that a sidecar's metrics "
                         "port?") from None
    return requests, buckets


def sidecar_increases(targets, window: float, on_first_sample=lambda: None, clock=time.monotonic,
                      sleep=time.sleep) -> tuple:
    """Scrape ``targets`` (``[(host, port)]``) twice, ``window`` seconds apart.

    A sidecar that cannot be scraped is reported and left out (``AdminError``
    only when none can be the first time); ``on_first_sample()`` runs once
    the first round of scrapes is done.  Returns ``(request_increases,
    bucket_increases, seconds between the two rounds, problems)``.
    """
    first, problems = {}, []
    for target in targets:
        try:
            first[target] = scrape(*target)
        except AdminError as error:
            problems.append(str(error))
    if not first:
        raise AdminError("no sidecar could be scraped: " + "; ".join(problems))
    started = clock()
    on_first_sample()
    sleep(window)
    request_increases, bucket_increases = [], []
    for target, (requests, buckets) in first.items():
        try:
            later = scrape(*target)
        except AdminError as error:
            problems.append(str(error))
            continue
        request_increases += counter_deltas(requests, later[0])
        bucket_increases += counter_deltas(buckets, later[1])
    return request_increases, bucket_increases, max(clock() - started, 1e-3), problems


def prometheus_increases(url: str, grouping, window: float) -> tuple:
    """``(request_increases, bucket_increases, seconds)`` from Prometheus at ``url``, over ``window``."""
    seconds = max(1, round(window))
    selector = f'{{reporter="{grouping.reporter}"}}[{seconds}s]'
    labels = ", ".join(grouping.labels)
    request_increases = query(url, f"sum by (response_code, {labels}) (increase({REQUESTS}{selector}))")
    bucket_increases = query(url, f"sum by (le, {labels}) (increase({BUCKETS}{selector}))")
    return request_increases, bucket_increases, seconds


def query(url: str, promql: str, timeout: float = 10.0) -> list:
    """An instant query through Prometheus's HTTP API: ``[(labels, value)]``."""
    address = url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    hint = "give --prometheus the server's base URL, e.g. http://127.0.0.1:9090"
    try:
        with urllib.request.urlopen(address, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        body = error.read()
        reason = _prometheus_error(body) or f"{error.code} {error.reason}"
        raise AdminError(f"Prometheus at {url} refused the query {promql!r}: {reason}; {hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise AdminError(f"cannot reach Prometheus at {url}: {getattr(error, 'reason', error)}; {hint}") from None
    try:
        answer = json.loads(body)
        return [(sample["metric"], float(sample["value"][1])) for sample in answer["data"]["result"]]
    except (ValueError, KeyError, TypeError, IndexError):
        raise AdminError(f"{url} did not answer as Prometheus's HTTP API does; {hint}") from None


def _prometheus_error(body: bytes):
    try:
        return json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
