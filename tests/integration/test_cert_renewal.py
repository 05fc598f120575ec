"""Certificate renewal outlives the join token: after the first certificate, a sidecar proves its
identity with the certificate it holds (TLS client certificate on the CSR endpoint), so rotation keeps
working once the short-lived token has expired."""

from __future__ import annotations

import time

from tests.harness import wait_for


def test_rotation_continues_after_the_join_token_expired(control_factory, proxy_factory, tmp_path):
    control = control_factory(workload_cert_ttl="6s")
    config = tmp_path / "config"
    config.mkdir()
    # The token lives 8 s (long enough for the first CSR on a loaded machine); certificates 6 s, renewed
    # at about half life with the certificate as proof: five renewals take the sidecar past the token's expiry.
    token_ttl = 8.0
    proxy = proxy_factory(config, "w", namespace="demo",
                          extra_args=control.proxy_args("demo", "sa1", token_ttl=f"{token_ttl:g}s"))
    started = time.monotonic()
    first = proxy.admin("/config_dump")["certificate"]
    assert first["identity"] == "spiffe://cluster.local/ns/demo/sa/sa1"
    dump = wait_for(lambda: (d := proxy.admin("/config_dump")["certificate"])["renewals"] >= 5 and d,
                    timeout=60, what="five certificate renewals")
    assert time.monotonic() - started > token_ttl, "the renewals did not outlive the token"
    assert dump["serial"] != first["serial"]
    assert dump["last_renewal_error"] is None
    assert dump["expires_in_s"] > 0
    assert proxy.admin_request("/ready")[0] == 200
    log = control.log_path.read_text()
    assert "token expired" not in log, "a renewal fell back to the expired token"


def test_an_expired_certificate_makes_the_sidecar_unready(control_factory, proxy_factory, tmp_path):
    """With the control plane gone, the certificate runs out: /ready turns 503 and says why."""
    control = control_factory(workload_cert_ttl="4s")
    config = tmp_path / "config"
    config.mkdir()
    proxy = proxy_factory(config, "w", namespace="demo", extra_args=control.proxy_args("demo", "sa1"))
    control.stop()
    wait_for(lambda: proxy.admin_request("/ready")[0] == 503, timeout=15, what="/ready to report the expiry")
    body = proxy.admin_request("/ready")[1]
    assert b"expired" in body
