"""Built-in load balancing: Istio's ``loadBalancer`` policies.

- ROUND_ROBIN: in turn, honouring endpoint weights (smooth weighted
  round robin when weights differ), from a random first place.
- LEAST_REQUEST: Envoy's weighted least request.  When the endpoints' weights
  are all equal, the power of two choices on active requests, so a slow
  endpoint, which accumulates requests, is picked less; when they differ, an
  earliest-deadline-first schedule on ``weight / (active requests + 1)``, so
  traffic follows the weights and still moves away from a loaded endpoint.
- RANDOM: uniformly at random.
- CONSISTENT_HASH: a ring of virtual nodes keyed by header, cookie, query
  parameter or source IP, so a key keeps its endpoint while the set is stable.

Per-cluster state (cursor, ring, schedule) lives in ``cluster.state`` and is rebuilt when
the healthy endpoint set changes.
"""

import bisect
import hashlib
import itertools
import random
from heapq import heapify, heapreplace
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from mesh import hookimpl

_RING_POINTS_PER_ENDPOINT = 160


def round_robin(ctx, cluster, endpoints, _start=random.randrange):
    state = cluster.state
    schedule = state.get("rr_schedule")
    if schedule is None or state.get("rr_for") is not endpoints:
        schedule = state["rr_schedule"] = _weighted_schedule(endpoints)
        state["rr_for"] = endpoints
    cursor = state.get("rr")
    # A new cluster starts at a random place in the schedule, as Envoy's does, so that
    # sidecars started together do not all send their first requests to the same endpoint.
    cursor = _start(len(schedule)) if cursor is None else cursor + 1
    if cursor >= len(schedule):
        cursor = 0
    state["rr"] = cursor
    return schedule[cursor]


def _weighted_schedule(endpoints):
    """Smooth weighted round robin (as nginx): interleaved, not bunched."""
    weights = [max(1, endpoint.spec.weight) for endpoint in endpoints]
    if len(set(weights)) == 1:
        return tuple(endpoints)
    current = [0] * len(endpoints)
    total = sum(weights)
    schedule = []
    for _ in range(total):
        for index, weight in enumerate(weights):
            current[index] += weight
        best = max(range(len(endpoints)), key=current.__getitem__)
        current[best] -= total
        schedule.append(endpoints[best])
    return tuple(schedule)


def least_request(ctx, cluster, endpoints, _random=random.random):
    """Envoy's LEAST_REQUEST (its "weighted least request"), with its default ``active_request_bias`` of 1.

    All weights equal (the usual case; known from ``cluster.state`` by one identity test per pick):
    the power of two choices, as Envoy's default ``choice_count`` of 2.  Two distinct endpoints are
    drawn uniformly at random and the one with fewer active requests wins (a tie: the first drawn).

    Weights that differ: :func:`_weighted_least_request`, Envoy's earliest-deadline-first schedule
    on each endpoint's effective weight ``weight / (active requests + 1)``.
    """
    if len(endpoints) == 1:
        return endpoints[0]
    if cluster.state.get("lr_p2c") is endpoints:
        count = len(endpoints)
        first = int(_random() * count)  # two distinct indexes, uniformly: random.sample costs 1 us more
        second = int(_random() * (count - 1))
        if second >= first:
            second += 1
        first, second = endpoints[first], endpoints[second]
        return first if first.active_requests <= second.active_requests else second
    return _weighted_least_request(ctx, cluster, endpoints)


#: the tie-break of equal deadlines: first scheduled, first picked (as Envoy's EDF scheduler)
_EDF_ORDER = itertools.count()


def _weighted_least_request(ctx, cluster, endpoints, _phase=random.random):
    """Envoy's least request when the endpoints' weights differ: an earliest-deadline-first schedule.

    Each endpoint has a deadline in a virtual time; a pick takes the endpoint with the earliest, moves
    the virtual time to it and schedules the endpoint again ``(active requests + 1) / weight`` later,
    its active requests counted at the pick, before the request it is picked for: that is, by its
    effective weight ``weight / (active requests + 1) ** active_request_bias`` with Envoy's default bias
    1.0.  Unloaded, an endpoint of weight 9 is picked 9 times as often as one of weight 1, interleaved,
    and within about one pick of its exact share at any time, not only on average; an endpoint that
    accumulates requests is scheduled later and later, so it gets less but, unlike with the power of
    two choices, never nothing.  As in Envoy, an endpoint's load is read only when it is picked, and
    under concurrency the ``+ 1`` softens the weights (9 and 1 with eight requests always in flight to
    endpoints of equal latency: about 78% and 22%).

    The schedule is rebuilt when the endpoint set changes (a config swap, an ejection), each endpoint
    at a random place within its first interval: as Envoy starts a new schedule after a random number
    of picks, so that sidecars started together do not all send their first requests to the same
    endpoint.  When the weights are all equal, ``cluster.state["lr_p2c"]`` is set to the endpoints instead,
    and :func:`least_request` takes its power of two choices from the next pick on.
    """
    state = cluster.state
    edf = state.get("lr_edf")
    if edf is None or edf[0] is not endpoints:
        weights = tuple(max(1, endpoint.spec.weight) for endpoint in endpoints)
        if len(set(weights)) == 1:
            state.pop("lr_edf", None)
            state["lr_p2c"] = endpoints
            return least_request(ctx, cluster, endpoints)
        state.pop("lr_p2c", None)
        heap = [(_phase() / weight, next(_EDF_ORDER), index) for index, weight in enumerate(weights)]
        heapify(heap)
        edf = state["lr_edf"] = (endpoints, weights, heap)
    _, weights, heap = edf
    deadline, _, index = heap[0]
    endpoint = endpoints[index]
    heapreplace(heap, (deadline + (endpoint.active_requests + 1) / weights[index], next(_EDF_ORDER), index))
    return endpoint


def pick_random(ctx, cluster, endpoints, _choice=random.choice):
    return _choice(endpoints)


def _hash(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")


def _hash_key(ctx, hash_on):
    kind, name = hash_on
    if kind == "header":
        return ctx.headers.get(name)
    if kind == "source_ip":
        return ctx.source_address
    if kind == "cookie":
        raw = ctx.headers.get("cookie")
        if raw:
            morsel = SimpleCookie(raw).get(name)
            return morsel.value if morsel is not None else None
        return None
    if kind == "query":
        values = parse_qs(ctx.path.partition("?")[2]).get(name)
        return values[0] if values else None
    return None


def consistent_hash(ctx, cluster, endpoints):
    key = _hash_key(ctx, cluster.spec.hash_on) if cluster.spec.hash_on else None
    if key is None:
        return round_robin(ctx, cluster, endpoints)
    state = cluster.state
    ring = state.get("ring")
    if ring is None or state.get("ring_for") is not endpoints:
        points = sorted(
            (_hash(f"{endpoint.host_port}#{replica}"), index)
            for index, endpoint in enumerate(endpoints)
            for replica in range(_RING_POINTS_PER_ENDPOINT * max(1, endpoint.spec.weight)))
        ring = state["ring"] = ([point for point, _ in points], [index for _, index in points])
        state["ring_for"] = endpoints
    hashes, owners = ring
    slot = bisect.bisect(hashes, _hash(key))
    return endpoints[owners[slot % len(owners)]]


POLICIES = {
    "ROUND_ROBIN": round_robin,
    "LEAST_REQUEST": least_request,
    "RANDOM": pick_random,
    "CONSISTENT_HASH": consistent_hash,
}


@hookimpl
def mesh_pick_endpoint(ctx, cluster, endpoints):
    """Pick by the cluster's ``lb_policy`` (round robin when unknown)."""
    return POLICIES.get(cluster.spec.lb_policy, round_robin)(ctx, cluster, endpoints)
