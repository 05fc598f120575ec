"""The config stream (:15012, magic TXM1) against clients that hold a valid mesh certificate and abuse it.

Real processes: ``mesh-control`` with a config dir, two sidecars with their own identities (the victim,
``shop/user-service``, an endpoint of a ServiceEntry; the client, ``shop/frontend``), and hand-written
streams (:class:`RawStream`) with certificates the control plane issued to other service accounts.

- hijack: HELLO with the victim's node name, then DRAIN, from another service account of the same
  namespace and from another namespace: refused (ERROR frame, stream closed, one log line); the victim's
  stream stays up and its endpoint stays in the client's snapshot
- memory: 20 streams with unfinished 16 MiB frames are closed at the length prefix and mesh-control's RSS
  stays bounded
- a NACK reason is stored truncated to 1 KiB; a 10 MB NACK frame is refused
- JSON nested 5,000 deep (and 65 deep) is refused with a clear reason and no traceback in the log
"""

from __future__ import annotations

import pytest

from tests.harness import wait_for
from tests.integration.test_control_stream_support import RawStream, mesh_certificate
from tests.integration.test_distribution_support import ControlledProxy, proxies, selector_service
from tests.integration.test_identity_support import spiffe
from tests.integration.test_proxy_support import write_config

CLUSTER = "outbound|80||user-service.shop.svc.cluster.local"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def mesh(control_factory, backend_factory, process_log_dir, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("hostile-config"),
                          selector_service("user-service", namespace="shop"))
    control = control_factory(extra_args=["--config-dir", str(config)])
    app = backend_factory("user-service")
    victim = ControlledProxy(control, "user-service", namespace="shop", app_port=app.port,
                             labels={"app": "user-service"}, log_dir=process_log_dir).start()
    client = ControlledProxy(control, "frontend", namespace="shop", log_dir=process_log_dir).start()
    yield {"control": control, "config": config, "victim": victim, "client": client,
           "certs": tmp_path_factory.mktemp("hostile-certs")}
    client.stop()
    victim.stop()


def endpoints(proxy) -> list:
    """``HOST:PORT`` of every endpoint of user-service.shop in the sidecar's /clusters."""
    return [endpoint["address"] for endpoint in proxy.admin("/clusters").get(CLUSTER, {}).get("endpoints", [])]


def control_log(control) -> str:
    return control.log_path.read_text(errors="replace")


def test_hello_and_drain_for_a_node_of_another_identity_are_refused(mesh):
    control, victim, client = mesh["control"], mesh["victim"], mesh["client"]
    victim_endpoint = f"127.0.0.1:{victim.inbound_port}"
    wait_for(lambda: endpoints(client) == [victim_endpoint], 10, what="the victim to be the client's endpoint")
    row = proxies(control)["user-service"]
    node, connects = row["node"], victim.admin("/config_dump")["control"]["connects"]
    reasons = {}
    for namespace in ("shop", "default"):  # the same namespace as the victim, and another one
        intruder = RawStream(control, mesh_certificate(control, namespace, "intruder", mesh["certs"]))
        intruder.send("HELLO", node=node, workload="user-service", namespace=namespace,
                      labels={"app": "user-service"}, service_account="intruder", address="127.0.0.1",
                      inbound_port=1, app_port=8080, version="")
        intruder.send("DRAIN")
        frames, closed = intruder.frames_until_closed(timeout=5)
        intruder.close()
        # the victim's stream was neither replaced nor reopened, and it is still registered as itself
        assert victim.admin("/config_dump")["control"]["connects"] == connects
        after = proxies(control)["user-service"]
        assert after["connected"] and after["identity"] == spiffe("shop", "user-service"), after
        assert after["connected_since"] == row["connected_since"], after
        errors = [frame["reason"] for frame in frames if frame["type"] == "ERROR"]
        assert closed and errors and not any(frame["type"] == "SNAPSHOT" for frame in frames), frames
        reasons[namespace] = errors[0]
    for namespace, reason in reasons.items():
        assert node in reason and spiffe("shop", "user-service") in reason and spiffe(namespace, "intruder") in reason
        assert "node name" in reason, reason  # says what to do
    refusals = [line for line in control_log(control).splitlines() if "refused HELLO" in line and node in line]
    assert len(refusals) == 2 and spiffe("default", "intruder") in refusals[1], refusals
    # a config change pushes every proxy a snapshot computed after the refused DRAINs: the endpoint is still there
    write_config(mesh["config"], selector_service("marker", namespace="shop"), name="marker.yaml")
    wait_for(lambda: "outbound|80||marker.shop.svc.cluster.local" in client.admin("/clusters"), 10,
             what="the client to apply the marker config")
    assert endpoints(client) == [victim_endpoint]
    assert client.curl("user-service", "/after-hijack").status == 200


def test_nack_reasons_are_stored_truncated_and_a_10_mb_nack_is_refused(mesh):
    control = mesh["control"]
    stream = RawStream(control, mesh_certificate(control, "shop", "nacker", mesh["certs"]))
    stream.send("HELLO", node="nacker-1", workload="nacker", namespace="shop", labels={}, version="")
    snapshot = stream.read_frame()
    assert snapshot["type"] == "SNAPSHOT"
    stream.send("NACK", version=snapshot["version"], reason="first error; " + "x" * 60_000)

    def stored():
        row = proxies(control).get("nacker")
        return row if row and row["last_nack"] else None

    row = wait_for(stored, 5, what="the NACK to be recorded")
    reason = row["last_nack"]
    assert reason.startswith("first error; xxx") and "truncated" in reason and len(reason.encode()) <= 1100, \
        reason[-200:]
    stream.send_until_closed((10_000_000).to_bytes(4, "big") + b"x" * 10_000_000)
    frames, closed = stream.frames_until_closed(timeout=5)
    assert closed
    assert proxies(control)["nacker"]["last_nack"] == reason  # nothing of the refused frame was stored
    assert "frame of 10000000 bytes exceeds" in control_log(control)


@pytest.mark.parametrize("depth", [5000, 65])
def test_deeply_nested_json_is_refused_without_a_traceback(mesh, depth):
    control = mesh["control"]
    stream = RawStream(control, mesh_certificate(control, "shop", "nester", mesh["certs"]))
    body = b'{"type":"HELLO","v":1,"node":"nester","workload":"nester","namespace":"shop","labels":{},"x":' \
        + b"[" * depth + b"]" * depth + b"}"
    stream.send_raw(len(body).to_bytes(4, "big") + body)
    reason = stream.refusal(timeout=5)
    stream.close()
    assert "nested deeper than 64" in reason, reason
    log = control_log(control)
    assert "nested deeper than 64" in log and "Traceback" not in log and "RecursionError" not in log


def test_unfinished_large_frames_keep_mesh_control_memory_bounded(control_factory, tmp_path):
    """20 streams each announce a 16 MiB frame and send as much of it as the control plane takes.

    Bound: the growth of mesh-control's peak RSS (VmHWM) stays under 32 MiB. The streams are refused at the
    length prefix (HELLO, the largest frame mesh-control receives, is at most 64 KiB), so what is buffered is
    at most 20 x 64 KiB plus TLS and socket buffers; 32 MiB leaves room for allocator noise and is a tenth of
    the 366 MiB growth these streams caused before (issue #10).
    """
    control = control_factory()
    certificate = mesh_certificate(control, "shop", "greedy", tmp_path)
    warm = RawStream(control, certificate)  # the TLS and stream code paths allocated once before measuring
    warm.send("PING")
    warm.close()
    before = control.status_kib("VmRSS")
    control.reset_peak_rss()
    streams = [RawStream(control, certificate, timeout=2) for _ in range(20)]
    frame = (16 * MIB).to_bytes(4, "big") + b"[" * (16 * MIB - 1)  # one byte short: never finished
    for stream in streams:
        stream.send_until_closed(frame)
    closed = [stream.frames_until_closed(timeout=5)[1] for stream in streams]
    peak, after = control.status_kib("VmHWM"), control.status_kib("VmRSS")
    for stream in streams:
        stream.close()
    print(f"mesh-control RSS {before / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB, {after / 1024:.1f} MiB "
          f"with the 20 streams")
    assert all(closed), closed
    assert peak - before < 32 * 1024, (before, peak)
    assert control_log(control).count("exceeds the") >= 20
