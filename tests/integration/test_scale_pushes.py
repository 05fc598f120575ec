"""Registry-endpoint proxies connecting one after another cause a linear number of pushes (issue #15).

A real mesh-control and :mod:`bench.scale_client` sessions: real mutual-TLS config streams whose HELLO
announces an inbound listener, so each one is a registry endpoint of its namespace's ``local-app``
service and changes the snapshot of every session of its namespace.  They connect as a steady stream
(one every 30 ms: never the 100 ms of quiet the debounce waits for).

Counted through the control plane's ``mesh_control_pushes_total``, not timed: each session gets its
first snapshot at HELLO, then at most one push per push round, and while endpoints keep coming the
rounds are paced by ``--push-max-delay`` (1 s), plus the final round after the last change.  That
predicts ``sessions * (2 + seconds of connecting / 1 s)``; the bound allows one push per session more
(``3 +``), because on a loaded host a round pushed in slices, and the pushes held back by flow control
until an ACK, can straddle the round boundaries (seen once: 325 pushes against 323).  Before the cap,
a round every 100 ms pushed to every session connected so far: quadratic (about eight times the bound
here).

Flow control, with hand-written streams (:class:`RawStream`): a stream that has not ACKed its last
SNAPSHOT gets no new one; its ACK brings the newest snapshot, once, whatever changed meanwhile.
"""

from __future__ import annotations

import pytest
import yaml

from bench.scale import base_config, control_metric, run_client
from tests.integration.test_control_stream_support import RawStream, mesh_certificate
from tests.integration.test_distribution_support import selector_service
from tests.integration.test_proxy_support import write_config

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
    assert SESSIONS <= pushes <= SESSIONS * (3 + result["settled_s"] / MAX_DELAY), report


def frames_until(stream, *kinds) -> list:
    """The frames ``stream`` reads up to and including the next one of ``kinds`` (the control plane's PINGs
    left out)."""
    frames = []
    while not frames or frames[-1]["type"] not in kinds:
        frame = stream.read_frame()
        assert frame is not None, f"the control plane closed the stream after {frames}"
        if frame["type"] != "PING":
            frames.append(frame)
    return frames


@pytest.mark.timeout(60)
def test_a_stream_gets_no_snapshot_before_its_ack_and_then_only_the_newest(control_factory, tmp_path):
    config = write_config(tmp_path / "config", selector_service("base", namespace="shop"))
    control = control_factory(extra_args=["--config-dir", str(config)])
    watcher, slow = (RawStream(control, mesh_certificate(control, "shop", name, tmp_path / "certs"))
                     for name in ("watcher", "slow"))
    first = {}
    for name, stream in (("watcher", watcher), ("slow", slow)):
        stream.send("HELLO", node=f"{name}-1", workload=name, namespace="shop", labels={}, version="")
        first[name] = frames_until(stream, "SNAPSHOT")[-1]["version"]
    watcher.send("ACK", version=first["watcher"])
    seen = [first["watcher"]]
    for marker in ("one", "two"):  # two changes, a push round each; the watcher ACKs each snapshot, slow none
        write_config(config, selector_service(marker, namespace="shop"), name=f"{marker}.yaml")
        seen.append(frames_until(watcher, "SNAPSHOT")[-1]["version"])
        watcher.send("ACK", version=seen[-1])
    assert len(set(seen)) == 3 and first["slow"] == seen[0], seen
    slow.send("ACK", version=first["slow"])
    slow.send("PING")  # its PONG follows whatever the ACK made the control plane send
    frames = frames_until(slow, "PONG")
    watcher.close()
    slow.close()
    assert [frame.get("version") for frame in frames] == [seen[-1], None], frames
