"""Unit tests of the distributor's push rounds: capped debounce, shared snapshots, linear pushes.

A real :class:`~mesh.control.distribution.Distributor` on a :class:`~twisted.internet.task.Clock`,
with the :class:`tests.unit.test_protocol.FakeStream` proxies (what the distributor reads and calls).
"""

from __future__ import annotations

from twisted.internet.task import Clock

from mesh import protocol as proto
from mesh.config.compile import Workload
from mesh.control.distribution import PUSH_SLICE, Distributor, view_key
from tests.unit import test_control_stream as control_stream
from tests.unit.test_protocol import FakeStream, frames, registration, service_entry

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


# -- flow control: no new SNAPSHOT to a stream before it answered the last one ----------------------

def change(dist, namespace, host) -> None:
    """A config change every proxy of ``namespace`` sees: a new service exported to it alone."""
    dist.set_resources([service_entry("local-a", namespace="a", selector=LOCAL, export_to=["."]),
                        service_entry(host, namespace=namespace, export_to=["."])])


def held_back() -> tuple:
    """``(clock, distributor, stream)``: a stream that has not answered its first snapshot, and a push
    round since that changed its snapshot (held back)."""
    clock = Clock()
    dist = distributor(clock, namespaces=("a",))
    slow = FakeStream("slow", "a", clock=clock)
    dist.hello(slow, "10.9.9.9")
    change(dist, "a", "svc-1")
    clock.advance(0.1)
    return clock, dist, slow


def test_a_stream_gets_no_new_snapshot_before_it_answered_and_then_the_newest_once():
    clock = Clock()
    dist = distributor(clock, namespaces=("a",))
    slow = FakeStream("slow", "a", clock=clock)
    dist.hello(slow, "10.9.9.9")
    for index in range(3):  # three rounds, each changing its snapshot, while its first is unanswered
        change(dist, "a", f"svc-{index}")
        clock.advance(0.1)
    assert len(slow.pushed) == 1
    dist.acked(slow, slow.pushed[0][0])
    assert len(slow.pushed) == 2  # at the ACK, not at a round
    assert "svc-2" in {doc["metadata"]["name"] for doc in slow.pushed[1][1]}  # the newest, not each in turn
    assert slow.awaiting == slow.pushed[1][0]
    dist.acked(slow, slow.pushed[1][0])
    clock.advance(20)
    assert len(slow.pushed) == 2 and not clock.getDelayedCalls()  # nothing more held, no timer left


def test_a_nack_answers_too_and_an_old_answer_does_not():
    clock, dist, slow = held_back()
    dist.acked(slow, "0123456789abcdef")  # not the version in flight
    assert len(slow.pushed) == 1
    dist.nacked(slow, slow.pushed[0][0], "cannot compile")
    assert len(slow.pushed) == 2


def test_a_push_held_back_is_dropped_when_the_view_came_back_to_the_version_sent():
    clock, dist, slow = held_back()
    dist.set_resources([service_entry("local-a", namespace="a", selector=LOCAL, export_to=["."])])
    clock.advance(0.1)
    dist.acked(slow, slow.pushed[0][0])
    assert len(slow.pushed) == 1 and slow.awaiting is None


def test_a_stream_that_never_answers_holds_back_only_its_own_pushes_until_the_ack_timeout():
    clock = Clock()
    dist = distributor(clock, namespaces=("a",))
    stuck, others = FakeStream("stuck", "a", clock=clock), [FakeStream(f"ok{index}", "a") for index in range(3)]
    for stream in (stuck, *others):
        dist.hello(stream, "10.9.9.9")
    change(dist, "a", "svc-1")
    clock.advance(0.1)
    assert [len(stream.pushed) for stream in (stuck, *others)] == [1, 2, 2, 2]
    clock.advance(dist.ack_timeout - 0.2)
    assert len(stuck.pushed) == 1
    clock.advance(0.1)  # ack_timeout after its first snapshot: it gets the newest anyway
    assert len(stuck.pushed) == 2 and stuck.pushed[1][0] == others[0].pushed[1][0]
    dist.acked(stuck, stuck.pushed[0][0])  # a late answer to the snapshot given up on: nothing to release
    change(dist, "a", "svc-2")
    clock.advance(0.1)
    assert len(stuck.pushed) == 2 and all(len(stream.pushed) == 3 for stream in others)


def test_a_stream_closed_while_a_push_is_held_back_leaves_no_timer():
    clock, dist, slow = held_back()
    assert dist._held
    dist.stream_closed(slow)
    clock.advance(0)
    assert len(slow.pushed) == 1 and not clock.getDelayedCalls() and not dist._held


def test_the_control_plane_stream_sends_the_next_snapshot_on_the_ack_frame():
    """The real ProxyStream, fed real frames: SNAPSHOT, a change (held back), then ACK -> SNAPSHOT."""
    clock = Clock()
    dist = distributor(clock, namespaces=("shop",))
    stream, transport = control_stream.connect(dist)
    stream.dataReceived(control_stream.hello("web-1.shop"))
    sent = [frame for frame in frames(transport.value()) if frame["type"] == proto.SNAPSHOT]
    assert len(sent) == 1
    transport.clear()
    change(dist, "shop", "svc-1")
    clock.advance(0.2)  # the push round
    assert not [frame for frame in frames(transport.value()) if frame["type"] == proto.SNAPSHOT]
    stream.dataReceived(proto.encode(proto.message(proto.ACK, version=sent[0]["version"])))
    again = [frame for frame in frames(transport.value()) if frame["type"] == proto.SNAPSHOT]
    assert len(again) == 1 and again[0]["version"] != sent[0]["version"]
    assert "svc-1" in {doc["metadata"]["name"] for doc in again[0]["resources"]}
