"""Peak-EWMA load balancing for txmesh.

Each endpoint keeps ``cost``: an exponentially weighted moving average of its
try latency (seconds) that takes a slower observation at once (peak) and
decays towards faster ones with time constant ``DECAY`` seconds.  As in
Finagle's and Linkerd's peak EWMA, a cost read later than its last
observation has decayed towards zero by the time elapsed, so an endpoint
that was slow once and then left idle becomes cheap again and is retried.
When the endpoints' weights are all equal, the pick is the power of two
choices on ``cost x (active requests + 1)``.  When they differ (ServiceEntry or
WorkloadEntry ``weight``), an endpoint is drawn at random with probability
proportional to ``weight / (cost x (active requests + 1))``: the weight divides
the cost, as it divides the load in Envoy's weighted least request
(``weight / (active requests + 1)``).  Endpoints of similar latency then share
the traffic in proportion to their weights (9 and 1: about 90% and 10%), and a
slow or loaded endpoint still gets less, in proportion to its latency and load.
(The power of two choices on weight-divided costs would not do: it always takes
the lower of the two costs it compares, so of two endpoints of similar latency
the heavier would get all the traffic.  Nor would Envoy's earliest-deadline-first
schedule: it reads a cost only when it picks that endpoint, and a cost here
decays while the endpoint is idle, so every pick reads every cost afresh.)
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
_WEIGHTS_KEY = "peak_ewma_weights"


def _cost(state, now):
    """A ``(cost, stamp)`` state's cost read at ``now``: decayed by the time since its last observation."""
    cost, stamp = state
    return cost * math.exp(-max(0.0, now - stamp) / DECAY)


def _score(endpoint, default, now):
    """``cost x (active requests + 1)``; ``default`` is the cost of an endpoint never measured."""
    state = endpoint.state.get(_KEY)
    return (default if state is None else _cost(state, now)) * (endpoint.active_requests + 1)


#: the least score a weighted draw divides by (a cost decayed to 0.0 must not divide by zero)
_MIN_SCORE = 1e-9


def _weights(cluster, endpoints):
    """The endpoints' weights (at least 1 each), or None when they are all equal.

    Cached in ``cluster.state`` for this endpoint set (a config swap or an ejection makes a new one).
    """
    cached = cluster.state.get(_WEIGHTS_KEY)
    if cached is not None and cached[0] is endpoints:
        return cached[1]
    weights = tuple(max(1, endpoint.spec.weight) for endpoint in endpoints)
    if len(set(weights)) == 1:
        weights = None
    cluster.state[_WEIGHTS_KEY] = (endpoints, weights)
    return weights


@hookimpl
def mesh_pick_endpoint(ctx, cluster, endpoints):
    """Peak-EWMA latency times load, divided by the weight (LEAST_REQUEST clusters).

    Equal weights: the power of two choices on ``cost x (active + 1)``.  Weights that differ: a
    draw in proportion to ``weight / (cost x (active + 1))`` (see the module's docstring).
    """
    if cluster.spec.lb_policy != "LEAST_REQUEST":
        return None
    if len(endpoints) == 1:
        chosen = endpoints[0]
    else:
        now = time.monotonic()
        known = [_cost(ep.state[_KEY], now) for ep in endpoints if _KEY in ep.state]
        default = min(known) if known else 0.001
        weights = _weights(cluster, endpoints)
        if weights is None:
            first, second = random.sample(endpoints, 2)
            chosen = first if _score(first, default, now) <= _score(second, default, now) else second
        else:
            shares = [weight / max(_score(ep, default, now), _MIN_SCORE) for ep, weight in zip(endpoints, weights)]
            chosen = random.choices(endpoints, shares)[0]
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
