"""Config distribution with real processes: mesh-control --config-dir, sidecars with --control only.

- the routes of the control plane's config dir reach the client sidecar; the server sidecar is an endpoint
  because it announced labels matching a ServiceEntry workloadSelector (registry), with its certificate's
  identity
- a file change propagates to the sidecars within 2 s (the control plane's directory watcher)
- a second endpoint sidecar: SIGTERM (DRAIN) removes it at once, SIGKILL after the registry grace period
- the control plane dies under load: zero failed requests, sidecars stale; it comes back: they resync
- a sidecar restarted while the control plane is down loads its last-known-good config at once
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.harness import wait_for
from tests.integration.test_distribution_support import ControlledProxy, proxies, selector_service
from tests.integration.test_identity_support import parse_h2load, spiffe, xfcc
from tests.integration.test_proxy_support import route_to, virtual_service, write_config

GRACE = 3.0


@pytest.fixture(scope="module")
def mesh(control_factory, backend_factory, process_log_dir, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("dist-config"), selector_service("user-service"))
    control = control_factory(extra_args=["--config-dir", str(config), "--registry-grace", str(GRACE)])
    app = backend_factory("user-service")
    started = []

    def sidecar(workload, **kwargs):
        proxy = ControlledProxy(control, workload, log_dir=process_log_dir, **kwargs).start()
        started.append(proxy)
        return proxy

    server = sidecar("user-service", app_port=app.port, labels={"app": "user-service"})
    client = sidecar("frontend")
    yield {"control": control, "config": config, "app": app, "server": server, "client": client,
           "sidecar": sidecar, "log_dir": process_log_dir}
    for proxy in reversed(started):
        proxy.stop()


def endpoints(proxy, cluster="outbound|80||user-service.default.svc.cluster.local") -> list:
    """The endpoint hosts of a cluster in the sidecar's /clusters."""
    return [endpoint["address"].rpartition(":")[0]
            for endpoint in proxy.admin("/clusters").get(cluster, {}).get("endpoints", [])]


def test_config_and_endpoints_come_from_the_control_plane(mesh):
    client, server, control = mesh["client"], mesh["server"], mesh["control"]
    result = client.curl("user-service", "/hello")
    assert result.status == 200, result
    body = result.json()
    assert body["service"] == "user-service"
    assert xfcc(body["headers"]["x-forwarded-client-cert"])["URI"] == spiffe("default", "frontend")
    assert len(endpoints(client)) == 1
    rows = proxies(control)
    for workload, proxy in (("frontend", client), ("user-service", server)):
        row = rows[workload]
        assert row["connected"] and not row["stale"] and row["version_acked"] == row["version_sent"], row
        assert row["identity"] == spiffe("default", workload)
        ready = proxy.ready_doc()
        assert ready == (200, {"ready": True, "stale": False, "version": row["version_acked"]})
    # the snapshot is the sidecar's config: a registry WorkloadEntry with the certificate's service account
    dump = client.admin("/config_dump")
    assert dump["control"]["connected"] and dump["version"] == rows["frontend"]["version_acked"]
    status, metrics = control.admin_request("/metrics")
    assert status == 200
    text = metrics.decode()
    assert "mesh_control_connected_proxies 2.0" in text and "mesh_control_pushes_total" in text, text[:2000]


def test_a_file_change_reaches_the_sidecars_within_two_seconds(mesh):
    client, control = mesh["client"], mesh["control"]
    assert client.curl("shop-alias", "/").status == 404
    before = proxies(control)["frontend"]["version_acked"]
    write_config(mesh["config"], virtual_service("alias", ["shop-alias"], [route_to("user-service")]),
                 name="alias.yaml")
    started = time.monotonic()
    wait_for(lambda: client.curl("shop-alias", "/alias").status == 200, 2.0, interval=0.05,
             what="the new VirtualService to route through the client sidecar")
    elapsed = time.monotonic() - started
    print(f"file change -> route served through the sidecar in {elapsed:.2f}s")
    row = wait_for(lambda: (lambda r: r if r["version_acked"] != before and not r["stale"] else None)(
        proxies(control)["frontend"]), 2.0, what="the new version to be ACKed")
    assert row["version_acked"] == row["version_sent"]


def test_registry_drain_removes_at_once_and_a_lost_proxy_after_the_grace_period(mesh, backend_factory):
    client, sidecar = mesh["client"], mesh["sidecar"]
    apps = [backend_factory(f"user-service-{index}", address=f"127.0.0.{2 + index}") for index in range(2)]
    extra = [sidecar(f"user-service-{index}", service_account="user-service", app_port=app.port,
                     labels={"app": "user-service"}, extra_args=["--inbound-address", f"127.0.0.{2 + index}"])
             for index, app in enumerate(apps)]
    wait_for(lambda: sorted(endpoints(client)) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"], 3.0,
             what="both new sidecars to become endpoints of user-service")
    # SIGTERM: the sidecar sends DRAIN, the control plane removes it without waiting for the grace period
    started = time.monotonic()
    extra[0].stop()
    wait_for(lambda: "127.0.0.2" not in endpoints(client), GRACE, interval=0.05, what="the drained endpoint to go")
    drained_in = time.monotonic() - started
    # SIGKILL: no DRAIN, the endpoint stays for the grace period, then goes
    started = time.monotonic()
    extra[1].send_signal(signal.SIGKILL)
    time.sleep(GRACE * 0.6)
    assert "127.0.0.3" in endpoints(client), "removed before the grace period ended"
    wait_for(lambda: "127.0.0.3" not in endpoints(client), GRACE + 3, interval=0.05, what="the lost endpoint to go")
    lost_in = time.monotonic() - started
    extra[1].stop()
    print(f"drained endpoint removed in {drained_in:.2f}s, lost endpoint in {lost_in:.2f}s (grace {GRACE}s)")
    assert drained_in < GRACE and lost_in >= GRACE
    assert client.curl("user-service", "/").status == 200


def h2load_through(client, seconds: int) -> subprocess.Popen:
    return subprocess.Popen(
        ["h2load", "--h1", "-c", "4", "--rps", "25", "-D", str(seconds), "-H", ":authority: user-service",
         f"{client.outbound_url}/outage"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)


def test_control_plane_outage_under_load_then_resync_and_a_restart_with_the_last_known_good(mesh):
    control, client, server = mesh["control"], mesh["client"], mesh["server"]
    version = proxies(control)["frontend"]["version_acked"]
    load = h2load_through(client, 12)
    try:
        time.sleep(2)
        control.stop()
        wait_for(lambda: client.ready_doc()[1].get("stale") is True, 35, what="the client sidecar to report stale")
        assert client.ready_doc() == (200, {"ready": True, "stale": True, "version": version})
        assert server.ready_doc()[0] == 200
        output = load.communicate(timeout=60)[0]
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    result = parse_h2load(output)
    assert result.done > 100 and result.failed == 0 and result.errored == 0 and result.status["2xx"] == result.done, \
        output[-1200:]

    # restart the client sidecar while the control plane is still down: it loads its last-known-good at once
    client.stop()
    restarted = ControlledProxy(control, "frontend", state_dir=client.state_dir, log_dir=mesh["log_dir"],
                                outbound_port=client.outbound_port, admin_port=client.admin_port)
    restarted.is_ready = lambda: _answers(restarted)
    restarted.start()
    dump = restarted.admin("/config_dump")
    assert dump["version"] == version and any(route for route in dump["config"]["routes"])
    status, ready = restarted.ready_doc()
    assert status == 503 and ready["waiting_for"] == "workload certificate"  # the key never left the old process

    # the control plane comes back: certificate, stream, resync; the LKG version is what HELLO reports
    started = time.monotonic()
    control.start()
    wait_for(lambda: restarted.ready_doc()[0] == 200, 30, what="the restarted sidecar to be ready")
    wait_for(lambda: not client_row(control, "frontend")["stale"] and not client_row(control, "user-service")["stale"],
             40, what="both sidecars to reconnect and ACK")
    print(f"control plane back: both sidecars resynced in {time.monotonic() - started:.2f}s")
    assert restarted.curl("user-service", "/after").status == 200
    assert client_row(control, "frontend")["version_acked"] == version
    restarted.stop()


def client_row(control, workload):
    try:
        return proxies(control).get(workload) or {"stale": True}
    except Exception:
        return {"stale": True}


def _answers(proxy) -> bool:
    try:
        return proxy.admin_request("/config_dump")[0] == 200
    except OSError:
        return False
