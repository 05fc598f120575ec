"""Control plane outage: the data plane keeps serving with the certificates it has.

mesh-control issues 60 s certificates. While h2load drives traffic through frontend -> user-service
(with connections recycled every 10 requests, so new mTLS handshakes keep happening), mesh-control is
stopped. The scheduled renewals (at about 30 s) fail; the sidecars say so in their logs, keep their
current certificates, stay ready, and no request fails. Then mesh-control comes back on the same state
directory and port: the sidecars renew, proving themselves with their current certificate (their join
tokens expired long before), and traffic still flows.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.harness import wait_for
from tests.integration.test_identity_support import assert_no_secrets_in_logs, mtls_pair, parse_h2load, spiffe, xfcc

NS = "shop"
LOAD_SECONDS = 40
TOKEN_TTL = "15s"


@pytest.fixture(scope="module")
def mesh(control_factory, backend_factory, proxy_factory, tmp_path_factory):
    control = control_factory(workload_cert_ttl="60s")
    app, server, client = mtls_pair(control, backend_factory, proxy_factory,
                                    tmp_path_factory.mktemp("outage-config"), NS, token_ttl=TOKEN_TTL)
    return control, app, server, client


def certificate(proxy) -> dict:
    """The ``certificate`` section of the sidecar's /config_dump (identity, serial, not_after, renewals...)."""
    return proxy.admin("/config_dump")["certificate"]


def h2load_through(client, seconds: int) -> subprocess.Popen:
    return subprocess.Popen(
        ["h2load", "--h1", "-c", "4", "--rps", "25", "-D", str(seconds), "-H", ":authority: user-service",
         f"{client.outbound_url}/outage"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)


@pytest.mark.timeout(150)
def test_control_plane_outage(mesh, control_factory):
    control, app, server, client = mesh
    proxies = (client, server)
    before = {proxy: certificate(proxy) for proxy in proxies}
    assert before[client]["identity"] == spiffe(NS, "frontend")
    assert before[server]["identity"] == spiffe(NS, "user-service")

    load = h2load_through(client, LOAD_SECONDS)
    problems, samples = [], 0
    try:
        time.sleep(3)
        control.stop()  # in the middle of the traffic
        assert not control.running
        while load.poll() is None:
            samples += 1
            for proxy in proxies:
                status, body = proxy.admin_request("/ready")
                if status != 200:
                    problems.append(f"{proxy} /ready {status} during the outage: {body[:300]!r}")
            sample = client.curl("user-service", "/during-outage")
            if sample.status != 200:
                problems.append(f"request during the outage: {sample.status} {sample.body[:300]!r} {sample.error}")
            else:
                assert xfcc(sample.json()["headers"]["x-forwarded-client-cert"])["URI"] == spiffe(NS, "frontend")
            time.sleep(1.0)
        output = load.communicate(timeout=30)[0]
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    result = parse_h2load(output)
    report = (f"h2load during the outage: {result.done} done, {result.succeeded} succeeded, {result.failed} "
              f"failed, {result.errored} errored, {result.status}\n{output[-1200:]}")
    assert result.done >= 0.9 * 100 * LOAD_SECONDS, report
    assert (result.failed, result.errored, result.timeout) == (0, 0, 0), report
    assert result.succeeded == result.done == result.status["2xx"], report
    assert not problems, "\n".join(problems) + "\n" + report

    # the renewals were due (60 s certificates, renewal at ~50%) and failed; the certificates stayed
    for proxy in proxies:
        now = certificate(proxy)
        assert now["serial"] == before[proxy]["serial"], now
        assert now["last_renewal_error"] and "unreachable" in now["last_renewal_error"], now
        assert 0 < now["expires_in_s"] < 30, now
        log = proxy.log_path.read_text()
        assert "certificate renewal failed" in log and "serving with the current certificate" in log, \
            proxy.describe("no renewal failure logged")

    # mesh-control comes back (same state, same port): the sidecars renew before their certificates expire
    restarted = control_factory(control.state_dir, workload_cert_ttl="60s", port=control.port,
                                admin_port=control.admin_port)
    for proxy in proxies:
        def renewed_certificate(proxy=proxy):
            """The proxy's certificate once it is another than before the outage, else False."""
            current = certificate(proxy)
            return current["serial"] != before[proxy]["serial"] and current

        renewed = wait_for(renewed_certificate, 25, what=f"{proxy} to renew after the control plane came back")
        assert renewed["last_renewal_error"] is None and renewed["expires_in_s"] > 50, renewed
        assert proxy.admin_request("/ready")[0] == 200
    # renewed with the certificate as proof: the join tokens have expired, and none was tried
    assert restarted.admin()["csr_signed"] >= 2
    assert restarted.admin()["csr_rejected"] == {}
    assert "rejected" not in restarted.log_path.read_text()
    after = parse_h2load(subprocess.run(
        ["h2load", "--h1", "-c", "2", "-n", "200", "-H", ":authority: user-service", f"{client.outbound_url}/after"],
        capture_output=True, text=True, timeout=60).stdout)
    assert (after.succeeded, after.status["2xx"]) == (200, 200), after.output
    assert_no_secrets_in_logs([control, restarted, *proxies, app], tokens=control.tokens,
                              key_files=[control.state_dir / "ca-key.pem"])
