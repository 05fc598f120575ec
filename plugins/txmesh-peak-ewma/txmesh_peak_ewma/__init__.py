"""Peak-EWMA load balancing for txmesh.

Each endpoint keeps ``cost``: an exponentially weighted moving average of its
try latency (seconds) that takes a slower observation at once (peak) and
decays towards faster ones with time constant ``DECAY`` seconds.  As in
Finagle's and Linkerd's peak EWMA, a cost read later than its last
observation has decayed towards zero by the time elapsed, so an endpoint
that was slow once and then left idle becomes cheap again and is retried.
The pick is the power of two choices on ``cost x (active requests + 1)``.
Endpoints never measured start at the cluster's lowest known cost, so they
are tried soon.

It refines LEAST_REQUEST, Istio's default policy: clusters whose
DestinationRule asks for another policy (ROUND_ROBIN, RANDOM, consistentHash)
keep it.
"""

import math
import os
import random
import time

from mesh import hookimpl

DECAY = float(os.environ.get("MESH_PEAK_EWMA_DECAY", "10"))
_KEY = "peak_ewma"


def _cost(state, now):
    """A ``(cost, stamp)`` state's cost read at ``now``: decayed by the time since its last observation."""
    cost, stamp = state
    return cost * math.exp(-max(0.0, now - stamp) / DECAY)


def _score(endpoint, default, now):
    """``cost x (active requests + 1)``; ``default`` is the cost of an endpoint never measured."""
    state = endpoint.state.get(_KEY)
    return (default if state is None else _cost(state, now)) * (endpoint.active_requests + 1)


@hookimpl
def mesh_pick_endpoint(ctx, cluster, endpoints):
    """Power of two choices on peak-EWMA latency times load (LEAST_REQUEST clusters)."""
    if cluster.spec.lb_policy != "LEAST_REQUEST":
        return None
    if len(endpoints) == 1:
        chosen = endpoints[0]
    else:
        now = time.monotonic()
        known = [_cost(ep.state[_KEY], now) for ep in endpoints if _KEY in ep.state]
        default = min(known) if known else 0.001
        first, second = random.sample(endpoints, 2)
        chosen = first if _score(first, default, now) <= _score(second, default, now) else second
    ctx.extra[_KEY] = chosen
    return chosen


def observe(endpoint, rtt, now):
    """Fold one latency observation into the endpoint's peak EWMA."""
    state = endpoint.state.get(_KEY)
    if state is None or rtt > state[0]:
        endpoint.state[_KEY] = (rtt, now)
        return
    cost, stamp = state
    weight = math.exp(-max(0.0, now - stamp) / DECAY)
    endpoint.state[_KEY] = (cost * weight + rtt * (1.0 - weight), now)


@hookimpl
def mesh_request_complete(ctx, outcome):
    """Record how long the chosen endpoint took to answer."""
    endpoint = ctx.extra.get(_KEY)
    if endpoint is not None and ctx.upstream_time is not None:
        observe(endpoint, ctx.upstream_time, time.monotonic())
