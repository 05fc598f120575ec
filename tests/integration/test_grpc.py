"""gRPC through the mesh: a real grpcio client and server (tests/apps/grpc_app.py), two sidecars, mTLS.

One module-scoped set of processes: the ``client`` sidecar, whose outbound listener the grpcio client
calls (h2c, ``:authority`` ``echo``), and two server sidecars, ``echo-v1`` and ``echo-v2``, each in
front of its own grpcio app, reached over mTLS.  The ServiceEntry port of ``echo`` is ``GRPC``, so the
server sidecars speak h2c to their apps.  The VirtualService routes by method and by header:

- ``/echo.Echo/Count`` to v2 (routing by method), anything else under ``/echo.Echo/`` to v1;
- ``x-route: canary`` splits 75/25 between v1 and v2;
- ``x-route: retry`` retries ``unavailable`` 3 times, ``x-route: no-retry`` never;
  ``x-route: deadline`` retries ``unavailable`` up to 20 times (the deadline stops it first);
- ``x-route: bounded`` has a route timeout of 0.4 s;
- no route for any other service: its calls get UNIMPLEMENTED from the client sidecar.

An AuthorizationPolicy on the servers denies ``/echo.Echo/Forbidden``: PERMISSION_DENIED.

A second service, ``flaky``, has the two apps themselves as plaintext endpoints (h2c from the client
sidecar), round robin, no retries, and outlier detection: 2 consecutive gateway errors eject.
"""

from __future__ import annotations

import json
import queue
import re
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tests.harness import free_port, wait_for
from tests.harness.netns import metric_sum
from tests.harness.processes import ManagedProcess
from tests.integration.test_identity_support import (
    authorization_policy,
    issue_cert,
    make_ca,
    mesh_endpoint,
    spiffe,
)
from tests.integration.test_proxy_support import destination_rule, lb, route_to, virtual_service, write_config
from tests.integration.test_telemetry_support import scrape

NS = "shop"
GRPC_APP = Path(__file__).resolve().parents[1] / "apps" / "grpc_app.py"
NETWORKING = "networking.istio.io/v1"
#: The canary: CANARY_CALLS calls, weight 25 to v2.  v2 expects 50 (standard deviation 6.1); 20..80 is
#: five standard deviations either side, which a correct split misses about once in two million runs.
CANARY_CALLS = 200
CANARY_V2 = (20, 80)


class GrpcApp(ManagedProcess):
    """``python tests/apps/grpc_app.py``: the echo.Echo service, answering as ``name``."""

    kind = "grpc-app"

    def __init__(self, name: str, log_dir: Path):
        self.port = free_port("127.0.0.1")
        super().__init__(name, [sys.executable, GRPC_APP, "--port", self.port, "--name", name],
                         Path(log_dir) / f"grpc-app-{name}-{self.port}.log")

    def is_ready(self) -> bool:
        return "listening" in self.log_path.read_text()


def echo_entry(inbound: dict) -> dict:
    return {"apiVersion": NETWORKING, "kind": "ServiceEntry", "metadata": {"name": "echo", "namespace": NS},
            "spec": {"hosts": ["echo"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                     "ports": [{"number": 80, "name": "grpc", "protocol": "GRPC"}],
                     "endpoints": [{**mesh_endpoint(port, "echo", app="echo", version=version), "ports": {"grpc": port}}
                                   for version, port in inbound.items()]}}


def flaky_entry(apps: dict) -> dict:
    """Service ``flaky``: the grpcio apps themselves, plaintext, as its endpoints."""
    return {"apiVersion": NETWORKING, "kind": "ServiceEntry", "metadata": {"name": "flaky", "namespace": NS},
            "spec": {"hosts": ["flaky"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                     "ports": [{"number": 80, "name": "grpc", "protocol": "GRPC"}],
                     "endpoints": [{"address": "127.0.0.1", "ports": {"grpc": app.port}} for app in apps.values()]}}


#: Istio's outlierDetection for ``flaky``: UNAVAILABLE is 503, a gateway error; one of the two may be ejected.
FLAKY_OUTLIER = {"consecutiveGatewayErrors": 2, "consecutive5xxErrors": 0, "interval": "1s",
                 "baseEjectionTime": "60s", "maxEjectionPercent": 50}


def header_route(value: str, *destinations, **extra) -> dict:
    return {"match": [{"headers": {"x-route": {"exact": value}}}], "route": list(destinations), **extra}


def subset(name: str, weight: int | None = None) -> dict:
    destination = {"destination": {"host": "echo", "subset": name}}
    return destination if weight is None else {**destination, "weight": weight}


UNAVAILABLE_RETRIES = {"attempts": 3, "retryOn": "unavailable"}


@pytest.fixture(scope="module")
def mesh(proxy_factory, process_log_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("grpc")
    apps = {version: GrpcApp(version, process_log_dir).start() for version in ("v1", "v2")}
    ca = make_ca("grpc test CA")
    bundle = work / "ca.pem"
    bundle.write_bytes(ca[1].public_bytes(Encoding.PEM))
    inbound = {"v1": free_port(), "v2": free_port()}
    config = write_config(
        work / "config",
        echo_entry(inbound),
        destination_rule("echo", "echo", namespace=NS, subsets=[
            {"name": version, "labels": {"version": version}} for version in ("v1", "v2")]),
        virtual_service("echo", ["echo"], [
            header_route("canary", subset("v1", 75), subset("v2", 25)),
            header_route("retry", subset("v1"), retries=UNAVAILABLE_RETRIES),
            header_route("no-retry", subset("v1"), retries={"attempts": 0}),
            header_route("deadline", subset("v1"), retries={"attempts": 20, "retryOn": "unavailable"}),
            header_route("bounded", subset("v1"), timeout="0.4s"),
            {"match": [{"uri": {"exact": "/echo.Echo/Count"}}], "route": [subset("v2")]},
            {"match": [{"uri": {"prefix": "/echo.Echo/"}}], "route": [subset("v1")]},
        ], namespace=NS),
        flaky_entry(apps),
        destination_rule("flaky", "flaky", namespace=NS,
                         traffic_policy={**lb("ROUND_ROBIN"), "outlierDetection": FLAKY_OUTLIER}),
        virtual_service("flaky", ["flaky"], [route_to("flaky", retries={"attempts": 0})], namespace=NS),
        authorization_policy("deny-forbidden", NS, selector={"app": "echo"}, action="DENY",
                             rules=[{"to": [{"operation": {"paths": ["/echo.Echo/Forbidden"]}}]}]),
    )

    def sidecar(name, **kwargs):
        cert, key = issue_cert(work / "certs", name, ca, spiffe(NS, "echo" if name != "client" else "client"))
        return proxy_factory(config, name, namespace=NS, extra_args=["--cert", cert, "--key", key,
                                                                     "--ca-bundle", bundle], **kwargs)

    servers = {version: sidecar(f"echo-{version}", labels={"app": "echo", "version": version},
                                app_port=apps[version].port, inbound_port=inbound[version])
               for version in ("v1", "v2")}
    client = sidecar("client", labels={"app": "client"})
    channel = grpc.insecure_channel(f"127.0.0.1:{client.outbound_port}", options=[("grpc.default_authority", "echo")])
    flaky = grpc.insecure_channel(f"127.0.0.1:{client.outbound_port}", options=[("grpc.default_authority", "flaky")])
    yield {"client": client, "servers": servers, "channel": channel, "flaky": flaky}
    channel.close()
    flaky.close()


def unary(mesh, method="Unary", request=b"hi", route=None, key=None, fail=0, delay_ms=0, timeout=10.0):
    """Call ``/echo.Echo/METHOD`` through the client sidecar; returns the answer bytes (or raises grpc.RpcError)."""
    metadata = [(name, str(value)) for name, value in (("x-route", route), ("x-key", key), ("x-fail", fail),
                                                       ("x-delay-ms", delay_ms)) if value]
    call = mesh["channel"].unary_unary(f"/echo.Echo/{method}")
    return call(request, metadata=metadata, timeout=timeout)


def seen(mesh, key: str) -> dict:
    """What the v1 app recorded for the calls with ``x-key: key`` (``Seen`` is routed to v1)."""
    return json.loads(unary(mesh, "Seen", key.encode()))


def status_of(call) -> grpc.RpcError:
    """The error ``call()`` raises (a failed call: its ``code()``, ``details()``, metadata)."""
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def metadata(error: grpc.RpcError) -> dict:
    """The headers of a failed call: a Trailers-Only response has them all in its trailing metadata."""
    return {**dict(error.initial_metadata() or ()), **dict(error.trailing_metadata() or ())}


# -- routing, streaming --------------------------------------------------------------------------------

def test_calls_are_routed_by_method(mesh):
    assert unary(mesh, "Unary", b"hello") == b"v1:hello"
    streamed = list(mesh["channel"].unary_stream("/echo.Echo/Count")(b"5", timeout=10))
    assert streamed == [b"v2:%d" % index for index in range(5)]  # /echo.Echo/Count goes to v2


def test_client_streaming_reaches_the_app_message_by_message(mesh):
    messages = [b"a" * 10, b"b" * 70_000, b"", b"c"]  # one larger than an HTTP/2 window, one empty
    assert mesh["channel"].stream_unary("/echo.Echo/Sum")(iter(messages), timeout=10) == b"v1:4:70011"


def test_a_bidi_stream_exchanges_one_message_at_a_time(mesh):
    """Each message is sent only once the answer to the previous one came back: a proxy that held a
    stream's messages until more arrived (or until the stream ended) would never let this finish."""
    outgoing = queue.Queue()
    responses = mesh["channel"].stream_stream("/echo.Echo/Chat")(iter(outgoing.get, None), timeout=10)
    for index in range(5):
        outgoing.put(b"message %d" % index)
        assert next(responses) == b"v1:message %d" % index
    outgoing.put(None)
    assert list(responses) == []


def test_a_weighted_canary_split(mesh):
    answers = [unary(mesh, route="canary")[:3] for _ in range(CANARY_CALLS)]
    v2 = answers.count(b"v2:")
    assert answers.count(b"v1:") + v2 == CANARY_CALLS
    low, high = CANARY_V2
    assert low <= v2 <= high, f"v2 answered {v2} of {CANARY_CALLS} calls with weight 25"


# -- retries, deadlines --------------------------------------------------------------------------------

def test_unavailable_is_retried_where_the_route_says_so(mesh):
    key = uuid.uuid4().hex
    assert unary(mesh, route="retry", key=key, fail=2) == b"v1:hi"
    assert seen(mesh, key)["calls"] == 3
    key = uuid.uuid4().hex
    failed = status_of(lambda: unary(mesh, route="no-retry", key=key, fail=1))
    assert failed.code() == grpc.StatusCode.UNAVAILABLE and "on purpose" in failed.details()
    assert seen(mesh, key)["calls"] == 1
    key = uuid.uuid4().hex
    exhausted = status_of(lambda: unary(mesh, route="retry", key=key, fail=10))
    assert exhausted.code() == grpc.StatusCode.UNAVAILABLE
    assert seen(mesh, key)["calls"] == 4  # the first try and 3 retries


def test_the_clients_deadline_is_the_requests_and_the_upstream_gets_what_is_left(mesh):
    key = uuid.uuid4().hex
    expired = status_of(lambda: unary(mesh, key=key, delay_ms=5000, timeout=0.8))
    assert expired.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    [left] = seen(mesh, key)["time_remaining"]
    # the app got the client's deadline (grpcio's own reading of a grpc-timeout may exceed it by ~1 %)
    assert 0.3 < left < 0.81, left


def test_retries_stop_at_the_deadline_and_each_try_gets_less_time(mesh):
    """Each try waits 250 ms then fails UNAVAILABLE; the route would retry 20 times, the 1.2 s deadline stops it."""
    key = uuid.uuid4().hex
    expired = status_of(lambda: unary(mesh, route="deadline", key=key, fail=100, delay_ms=250, timeout=1.2))
    assert expired.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    record = seen(mesh, key)
    left = record["time_remaining"]
    assert 2 <= record["calls"] <= 5, record
    assert all(0 < later < earlier for earlier, later in zip(left, left[1:])), left
    assert left[1] < 1.0, left  # a retry gets what is left after the 250 ms of the first try, not 1.2 s


def test_a_route_timeout_shorter_than_the_deadline_wins_and_is_deadline_exceeded(mesh):
    key = uuid.uuid4().hex
    expired = status_of(lambda: unary(mesh, route="bounded", key=key, delay_ms=5000, timeout=30))
    assert expired.code() == grpc.StatusCode.DEADLINE_EXCEEDED, expired
    # the client sidecar's answer, the server sidecar's (the propagated grpc-timeout, what was left of the
    # 0.4 s) or the app's: the same deadline passes for all three at about the same time
    details = expired.details()
    assert ("upstream request timeout after 0.4s" in details or details == "Deadline Exceeded"
            or re.match(r"deadline exceeded: the client's grpc-timeout \(\d+m\) passed", details)), details
    [left] = seen(mesh, key)["time_remaining"]
    assert 0.1 < left < 0.41, left  # the route's 0.4 s, not the client's 30 s


def test_an_endpoint_that_keeps_answering_unavailable_is_ejected(mesh):
    """v2 answers every call UNAVAILABLE in a Trailers-Only response (HTTP 200): outlier detection counts it
    as a 503, as Envoy does, so after 2 in a row v2 is ejected and every later call reaches v1."""
    call = mesh["flaky"].unary_unary("/echo.Echo/Unary")
    answers = []
    for _ in range(16):  # round robin: v2 gets every other call until it is ejected
        try:
            answers.append(call(b"hi", metadata=[("x-unavailable", "v2")], timeout=10))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            answers.append(error.code())
    assert answers.count(grpc.StatusCode.UNAVAILABLE) == 2, answers
    assert answers[-10:] == [b"v1:hi"] * 10, answers


# -- errors made by the mesh ---------------------------------------------------------------------------

def test_an_authorization_denial_is_permission_denied(mesh):
    denied = status_of(lambda: unary(mesh, "Forbidden"))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED, denied
    assert metadata(denied)["x-mesh-flags"] == "RBAC", metadata(denied)


def test_no_route_is_unimplemented(mesh):
    missing = status_of(lambda: mesh["channel"].unary_unary("/other.Service/Method")(b"", timeout=10))
    assert missing.code() == grpc.StatusCode.UNIMPLEMENTED, missing
    assert metadata(missing)["x-mesh-flags"] == "NR"
    assert "no route" in missing.details(), missing.details()


# -- telemetry -----------------------------------------------------------------------------------------

#: What the calls of the metrics test add at least: requests by ``grpc_response_status``, and the messages
#: sent and received by the calls that ended OK (unary 1 and 1, Sum 4 and 1, Count 1 and 5).
EXPECTED_GROWTH = {"0": 3, "4": 1, "7": 1, "12": 1, "14": 1, "sent": 1 + 4 + 1, "received": 1 + 1 + 5}


def grpc_counts(mesh) -> dict:
    """The client sidecar's counters of :data:`EXPECTED_GROWTH`."""
    text = scrape(mesh["client"].metrics_port, "/stats/prometheus").decode()
    counts = {status: metric_sum(text, "istio_requests_total", request_protocol="grpc", grpc_response_status=status)
              for status in EXPECTED_GROWTH if status.isdigit()}
    counts["sent"] = metric_sum(text, "istio_request_messages_total", grpc_response_status="0")
    counts["received"] = metric_sum(text, "istio_response_messages_total", grpc_response_status="0")
    return counts


def test_metrics_carry_the_grpc_status_and_the_message_counts(mesh):
    """The calls made here (whatever the module's other tests did before) show in the client sidecar's metrics."""
    before = grpc_counts(mesh)
    assert unary(mesh) == b"v1:hi"                                                       # 0, 1 message each way
    assert mesh["channel"].stream_unary("/echo.Echo/Sum")(iter([b"a"] * 4), timeout=10) == b"v1:4:4"  # 4 in, 1 out
    assert len(list(mesh["channel"].unary_stream("/echo.Echo/Count")(b"5", timeout=10))) == 5        # 1 in, 5 out
    assert status_of(lambda: unary(mesh, route="bounded", delay_ms=5000)).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_of(lambda: unary(mesh, "Forbidden")).code() == grpc.StatusCode.PERMISSION_DENIED
    assert status_of(lambda: mesh["channel"].unary_unary("/other.Service/Method")(b"", timeout=10)).code() \
        == grpc.StatusCode.UNIMPLEMENTED
    unavailable = status_of(lambda: unary(mesh, route="no-retry", key=uuid.uuid4().hex, fail=1))
    assert unavailable.code() == grpc.StatusCode.UNAVAILABLE
    grown = {}

    def counted() -> bool:
        now = grpc_counts(mesh)
        grown.update({key: now[key] - before[key] for key in EXPECTED_GROWTH})
        return all(grown[key] >= count for key, count in EXPECTED_GROWTH.items())

    try:
        wait_for(counted, timeout=10, what="the calls counted by status and messages")
    except TimeoutError:
        pytest.fail(f"the metrics grew by {grown}, expected at least {EXPECTED_GROWTH}")
