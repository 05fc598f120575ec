"""Built-in load balancing: Istio's ``loadBalancer`` policies.

- ROUND_ROBIN: in turn, honouring endpoint weights (smooth weighted
  round robin when weights differ), from a random first place.
- LEAST_REQUEST: the power of two choices on active requests, so a slow
  endpoint, which accumulates requests, is picked less.
- RANDOM: uniformly at random.
- CONSISTENT_HASH: a ring of virtual nodes keyed by header, cookie, query
  parameter or source IP, so a key keeps its endpoint while the set is stable.

Per-cluster state (cursor, ring) lives in ``cluster.state`` and is rebuilt when
the healthy endpoint set changes.
"""

import bisect
import hashlib
import random
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


def least_request(ctx, cluster, endpoints, _sample=random.sample):
    if len(endpoints) == 1:
        return endpoints[0]
    first, second = _sample(endpoints, 2)
    return first if first.active_requests <= second.active_requests else second


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
