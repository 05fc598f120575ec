"""Registry-endpoint proxies connecting one after another cause a linear number of pushes (issue #15).

A real mesh-control and :mod:`bench.scale_client` sessions: real mutual-TLS config streams whose HELLO
announces an inbound listener, so each one is a registry endpoint of its namespace's ``local-app``
service and changes the snapshot of every session of its namespace.  They connect as a steady stream
(one every 30 ms: never the 100 ms of quiet the debounce waits for).

Counted through the control plane's ``mesh_control_pushes_total``, not timed: each session gets its
first snapshot at HELLO, then at most one push per push round, and while endpoints keep coming the
rounds are paced by ``--push-max-delay`` (1 s).  So the pushes are at most
``sessions * (2 + seconds of connecting / 1 s)``.  Before the cap, a round every 100 ms pushed to every
session connected so far: quadratic (about ten times the bound here).
"""

from __future__ import annotations

import pytest
import yaml

from bench.scale import base_config, control_metric, run_client

SESSIONS = 60
NAMESPACES = 3
PACE = 0.03
MAX_DELAY = 1.0  # mesh-control's default --push-max-delay


@pytest.mark.timeout(120)
def test_endpoint_proxies_connecting_cause_a_linear_number_of_pushes(control_factory, tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    (config / "base.yaml").write_text(yaml.safe_dump_all(base_config(2, NAMESPACES, True), sort_keys=False))
    control = control_factory(extra_args=["--config-dir", str(config)])

    result = run_client(control.address, control.state_dir, config, SESSIONS, 0, namespaces=NAMESPACES,
                        endpoints=True, admin_port=control.admin_port, processes=1, pace=PACE, log_dir=tmp_path)

    pushes = control_metric(control.admin_port, "mesh_control_pushes_total")
    report = f"{pushes:.0f} pushes for {SESSIONS} sessions; {result}"
    print(report)
    assert result["connected"] == SESSIONS, report
    assert result["proxies"]["synced"] == SESSIONS, report  # every session has the final snapshot
    assert SESSIONS <= pushes <= SESSIONS * (2 + result["settled_s"] / MAX_DELAY), report
