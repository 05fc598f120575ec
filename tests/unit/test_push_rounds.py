"""Unit tests of the distributor's push rounds: capped debounce, shared snapshots, linear pushes.

A real :class:`~mesh.control.distribution.Distributor` on a :class:`~twisted.internet.task.Clock`,
with the :class:`tests.unit.test_protocol.FakeStream` proxies (what the distributor reads and calls).
"""

from __future__ import annotations

from twisted.internet.task import Clock

from mesh.config.compile import Workload
from mesh.control.distribution import PUSH_SLICE, Distributor, view_key
from tests.unit.test_protocol import FakeStream, registration, service_entry

#: a service of each namespace that selects every registered proxy of it (they are its endpoints)
LOCAL = {"app": "local"}


def distributor(clock, namespaces=("a", "b")) -> Distributor:
    dist = Distributor(clock, lambda: b"-----BUNDLE-----\n", debounce=0.1, max_delay=1.0, grace=5)
    dist.set_resources([service_entry(f"local-{ns}", namespace=ns, selector=LOCAL, export_to=["."])
                        for ns in namespaces])
    clock.advance(1)
    return dist


def endpoint(index, namespace) -> FakeStream:
    """A proxy that registers as an endpoint of its namespace's ``local`` service."""
    node = f"p{index}.{namespace}"
    return FakeStream(node, namespace, LOCAL, registration(node, namespace=namespace, labels=LOCAL,
                                                          address=f"10.0.{index // 250}.{index % 250 + 1}"))


def connect(dist, stream) -> None:
    """HELLO of an endpoint proxy: it registers, and gets its first snapshot."""
    dist.hello(stream, stream.registration.address)


def test_a_quiet_change_is_pushed_after_the_debounce():
    clock = Clock()
    dist = distributor(clock)
    watcher = FakeStream("w", "a")
    dist.hello(watcher, "10.9.9.9")
    connect(dist, endpoint(1, "a"))
    clock.advance(0.09)
    assert len(watcher.pushed) == 1
    clock.advance(0.01)
    assert len(watcher.pushed) == 2


def test_a_steady_stream_of_changes_is_pushed_once_per_max_delay():
    clock = Clock()
    dist = distributor(clock)
    watcher = FakeStream("w", "a")
    dist.hello(watcher, "10.9.9.9")
    pushed_at = []
    for index in range(56):  # a new endpoint every 62.5 ms for 3.5 s: never 100 ms of quiet
        connect(dist, endpoint(index, "a"))
        before = len(watcher.pushed)
        clock.advance(0.0625)
        if len(watcher.pushed) > before:
            pushed_at.append(clock.seconds() - 1)
    assert pushed_at == [1.0, 2.0, 3.0]  # the cap, not the debounce window, paces the rounds
    clock.advance(0.1)  # quiet at last: the rest goes out
    entries = [doc for doc in watcher.pushed[-1][1] if doc["kind"] == "WorkloadEntry"]
    assert len(entries) == 56


def test_proxies_of_one_view_share_one_snapshot_and_its_encoded_frame():
    clock = Clock()
    dist = distributor(clock)
    one = dist.snapshot(Workload(name="web-1", namespace="a", labels={"app": "web"}))[1]
    two = dist.snapshot(Workload(name="web-2", namespace="a", labels={"app": "web"}))[1]
    other = dist.snapshot(Workload(name="web", namespace="b", labels={"app": "web"}))[1]
    assert one is two and one.frame() is two.frame()
    assert other is not one and other.version != one.version


def test_an_endpoint_changes_only_the_views_that_include_it():
    clock = Clock()
    dist = distributor(clock)
    in_a, in_b = FakeStream("x", "a"), FakeStream("y", "b")
    dist.hello(in_a, "10.9.9.9")
    dist.hello(in_b, "10.9.9.8")
    view_b = dist._views[view_key(in_b.workload)]
    connect(dist, endpoint(1, "a"))
    clock.advance(0.1)
    assert (len(in_a.pushed), len(in_b.pushed)) == (2, 1)
    assert dist._views[view_key(in_b.workload)] is view_b  # not rebuilt: namespace b's entries did not change


def test_endpoints_connecting_one_after_another_cause_a_linear_number_of_pushes():
    """Each proxy gets its first snapshot and then one push per round; rounds come once per max_delay."""
    clock = Clock()
    dist = distributor(clock, namespaces=("a",))
    count = 200
    for index in range(count):  # one every 20 ms: 4 s
        connect(dist, endpoint(index, "a"))
        clock.advance(0.02)
    clock.advance(1)
    # 200 first snapshots, then 5 rounds (1, 2, 3, 4 s and the quiet one) to those connected by then
    assert dist.pushes <= count + 5 * count
    assert dist.pushes >= count


def test_a_push_round_serves_the_streams_a_slice_per_reactor_turn():
    clock = Clock()
    dist = distributor(clock, namespaces=("a",))
    streams = [FakeStream(f"s{index}", "a") for index in range(250)]
    for stream in streams:
        dist.hello(stream, "10.9.9.9")
    dist.set_resources([service_entry("local-a", namespace="a", selector={"app": "other"}, export_to=["."])])
    dist.push_all()  # the round's first slice; the others come on the next reactor turns
    assert sum(len(stream.pushed) == 2 for stream in streams) == PUSH_SLICE
    clock.advance(0)
    assert all(len(stream.pushed) == 2 for stream in streams)
