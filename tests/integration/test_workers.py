"""``twistd mesh-proxy --workers 2``: two worker processes share the listeners, the parent merges their
metrics, passes SIGHUP on, replaces a worker that dies, drains both on SIGTERM, and leaves no worker
behind when it dies; each worker rotates its certificate while traffic flows."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from tests.harness import wait_for
from tests.harness.net import http_request
from tests.integration.test_proxy_support import curl_many, endpoint, service_entry, write_config


@pytest.fixture(scope="module")
def backend(backend_factory):
    return backend_factory("work")


@pytest.fixture(scope="module")
def config(tmp_path_factory, backend):
    return write_config(tmp_path_factory.mktemp("workers"), service_entry("work", [endpoint(backend)]))


@pytest.fixture(scope="module")
def proxy(config, proxy_factory):
    return proxy_factory(config, "client", extra_args=["--workers", "2", "--drain-time", "5s"])


def workers(proxy) -> dict:
    """Worker id -> its row of the parent's /workers (pid, admin_port, restarts)."""
    return {row["id"]: row for row in proxy.admin("/workers")["workers"]}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def requests_total(text: str) -> float:
    """The sum of ``istio_requests_total`` in Prometheus text."""
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("istio_requests_total{"))


def worker_requests(row) -> float:
    status, body = http_request("127.0.0.1", row["admin_port"], "/stats/prometheus")
    assert status == 200, body
    return requests_total(body.decode())


def send(proxy, count: int, parallel: int = 8, millis: int = 0) -> list:
    """``count`` GETs through the outbound listener, each on a connection of its own (``--parallel``)."""
    return curl_many(f"{proxy.outbound_url}/delay/{millis}", count, host="work", write_out="%{http_code}",
                     parallel=parallel, headers={"Connection": "close"})


def test_both_workers_serve_and_the_metrics_port_counts_each_request_once(proxy):
    before = {worker_id: worker_requests(row) for worker_id, row in workers(proxy).items()}
    assert len(before) == 2
    assert send(proxy, 60) == ["200"] * 60
    served = {worker_id: worker_requests(row) - before[worker_id] for worker_id, row in workers(proxy).items()}
    assert sum(served.values()) == 60
    assert all(count > 0 for count in served.values()), f"one worker served everything: {served}"
    status, body = http_request("127.0.0.1", proxy.metrics_port, "/stats/prometheus")
    assert status == 200
    assert requests_total(body.decode()) == sum(before.values()) + 60
    ready = proxy.admin("/ready")
    assert ready["ready"] and set(ready["workers"]) == {"1", "2"}


def worker_admin(row, path: str) -> dict:
    status, body = http_request("127.0.0.1", row["admin_port"], path)
    assert status == 200, body
    return json.loads(body)


def test_sighup_reloads_every_worker(proxy, config, backend):
    before = {worker_id: worker_admin(row, "/config_dump")["version"] for worker_id, row in workers(proxy).items()}
    write_config(config, service_entry("other", [endpoint(backend)]), name="other.yaml")
    proxy.reload()
    wait_for(lambda: all(worker_admin(row, "/config_dump")["version"] != before[worker_id]
                         for worker_id, row in workers(proxy).items()), timeout=10, what="both workers reloaded")
    assert curl_many(f"{proxy.outbound_url}/", 8, host="other", write_out="%{http_code}", parallel=4,
                     headers={"Connection": "close"}) == ["200"] * 8


def test_a_killed_worker_is_replaced_and_logged(proxy):
    old = workers(proxy)[1]
    os.kill(old["pid"], signal.SIGKILL)
    wait_for(lambda: (workers(proxy)[1]["pid"] or old["pid"]) != old["pid"], timeout=10, what="a new worker 1")
    assert workers(proxy)[1]["restarts"] == old["restarts"] + 1
    wait_for(proxy.is_ready, timeout=15, what="the new worker to be ready")
    assert send(proxy, 20) == ["200"] * 20
    assert f"worker 1 (pid {old['pid']}) exited" in proxy.log_path.read_text()


def _in_flight(row) -> int:
    status, body = http_request("127.0.0.1", row["admin_port"], "/clusters")
    return sum(endpoint["active_requests"] for cluster in json.loads(body).values()
               for endpoint in cluster["endpoints"])


def test_sigterm_drains_both_workers(proxy):
    """The last test of the module's proxy: it ends it."""
    pids = [row["pid"] for row in workers(proxy).values()]
    results = []
    thread = threading.Thread(target=lambda: results.extend(send(proxy, 16, parallel=16, millis=1000)))
    thread.start()
    wait_for(lambda: all(_in_flight(row) > 0 for row in workers(proxy).values()), timeout=5,
             what="requests in flight in both workers")
    proxy.send_signal(signal.SIGTERM)
    thread.join(20)
    assert results == ["200"] * 16
    wait_for(lambda: proxy.returncode is not None, timeout=10, what="the parent to exit")
    assert proxy.returncode in (0, -signal.SIGTERM), proxy.describe(f"exit code {proxy.returncode}")
    assert not [pid for pid in pids if alive(pid)]


@pytest.fixture(scope="module")
def rotating(config, control_factory, proxy_factory):
    """A sidecar with 2 workers that get certificates of 4 s from mesh-control (renewed every 2 s or so)."""
    control = control_factory(workload_cert_ttl="4s")
    return proxy_factory(config, "rotating", extra_args=[*control.proxy_args("default", "sa1"), "--workers", "2"])


def test_every_worker_rotates_its_certificate_while_traffic_flows(rotating):
    proxy = rotating
    rows = workers(proxy).values()
    first = {row["id"]: worker_admin(row, "/config_dump")["certificate"]["serial"] for row in rows}
    assert len(set(first.values())) == 2, "each worker has a key and certificate of its own"
    statuses = []

    def rotated():
        statuses.extend(send(proxy, 4, parallel=4))
        return all(worker_admin(row, "/config_dump")["certificate"]["serial"] != first[row["id"]] for row in rows)

    wait_for(rotated, timeout=15, what="both workers' certificates renewed")
    assert set(statuses) == {"200"}


def test_no_worker_outlives_a_killed_parent(rotating):
    """The last test of ``rotating``: it kills it."""
    proxy = rotating
    pids = [row["pid"] for row in workers(proxy).values()]
    assert all(alive(pid) for pid in pids)
    proxy.send_signal(signal.SIGKILL)
    wait_for(lambda: not [pid for pid in pids if alive(pid)], timeout=10, what="the workers to exit")
