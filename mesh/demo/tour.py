"""The guided tour of ``meshctl demo``: real requests through the mesh, checked and explained.

The tour plays the frontend app: it sends plain HTTP from the frontend's
address to the frontend sidecar's outbound listener (127.0.10.1:15001) and names
the service it wants in the ``Host`` header, exactly as the app would.  The
demo app in each workload answers with its own name (``x-demo-service``), so
every response shows which workload served it.

The tour is a list of :class:`Step` objects.  A step prints what it does and
what happened, checks each expectation with :meth:`Tour.expect` (a check mark
or a cross per line) and returns whether all of them held.  To extend the
tour, write ``def my_step(tour: Tour) -> bool`` and add it to :data:`STEPS`.
"""

from __future__ import annotations

import collections
import http.client
import sys
import uuid
from dataclasses import dataclass
from typing import Callable

from mesh.demo.runner import ADMIN_ADDRESS, OUTBOUND_PORT, DemoMesh, Reply, http_get

#: The workload the tour speaks for.
CLIENT = "frontend"
PINNED_REQUESTS = 20
BETA_REQUESTS = 10
CANARY_REQUESTS = 500
#: Accepted share of v2 for the 10% canary weight.  Over 500 requests, v2 expects 50 (standard
#: deviation 6.7); a correct split falls outside 25..80 about 3 times in 100,000 runs.
CANARY_V2_SHARE = (0.05, 0.16)


def _marks(stream) -> tuple[str, str]:
    """Check mark and cross, or ASCII stand-ins where the output cannot encode them."""
    try:
        "\u2714\u2718".encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "[ok]", "[FAIL]"
    return "\u2714", "\u2718"


class Tour:
    """What a step works with: the running mesh, a client acting as the frontend app, and the output."""

    def __init__(self, mesh: DemoMesh, out=None):
        self.mesh = mesh
        self.client = mesh.workload(CLIENT)
        self.out = out or sys.stdout
        self.passed_mark, self.failed_mark = _marks(self.out)

    def heading(self, text: str = "") -> None:
        """Print *text* unindented (step titles, summaries) or an empty line."""
        print(text, file=self.out, flush=True)

    def say(self, text: str) -> None:
        """Print one indented line of a step."""
        self.heading(f"   {text}")

    def expect(self, ok: bool, text: str) -> bool:
        """Print *text* with a check mark if *ok*, else with a cross; return *ok*."""
        self.say(f"{self.passed_mark if ok else self.failed_mark} {text}")
        return ok

    def send(self, host: str, path: str = "/", headers: dict | None = None) -> Reply:
        """GET *path* from the frontend's address through its sidecar, routed by ``Host: host``."""
        address = self.client.address
        return http_get(address, OUTBOUND_PORT, path, {"Host": host, **(headers or {})}, source_address=address)

    def count_services(self, host: str, path: str, count: int, headers: dict | None = None) -> collections.Counter:
        """Send *count* requests; count the answers by the workload that served them (or by HTTP status)."""
        served = collections.Counter()
        for _ in range(count):
            reply = self.send(host, path, headers)
            served[reply.headers.get("x-demo-service") if reply.status == 200 else f"HTTP {reply.status}"] += 1
        return served


def _counts(counter: collections.Counter) -> str:
    return ", ".join(f"{name}: {count}" for name, count in sorted(counter.items()))


def _text(reply: Reply) -> str:
    """The body of *reply* as one line of text (the sidecars' error messages are plain text)."""
    return " ".join(reply.body.decode("utf-8", "replace").split())


def pinned_v1(tour: Tour) -> bool:
    tour.say("user-service's VirtualService sends every path under /v1/ to subset v1 (rule pinned-v1).")
    served = tour.count_services("user-service", "/v1/profile", PINNED_REQUESTS)
    tour.say(f"{PINNED_REQUESTS} x GET /v1/profile, Host: user-service -> {_counts(served)}")
    return tour.expect(served == {"user-service-v1": PINNED_REQUESTS}, f"all {PINNED_REQUESTS} reached user-service v1")


def beta_to_v2(tour: Tour) -> bool:
    tour.say("Requests with the header x-user-group: beta go to subset v2 (rule beta-testers).")
    served = tour.count_services("user-service", "/profile", BETA_REQUESTS, {"x-user-group": "beta"})
    tour.say(f"{BETA_REQUESTS} x GET /profile, Host: user-service, x-user-group: beta -> {_counts(served)}")
    return tour.expect(served == {"user-service-v2": BETA_REQUESTS}, f"all {BETA_REQUESTS} reached user-service v2")


def canary_split(tour: Tour) -> bool:
    tour.say("Everything else is a canary release: weight 90 to v1, 10 to v2 (rule canary).")
    served = tour.count_services("user-service", "/profile", CANARY_REQUESTS)
    v1, v2 = served["user-service-v1"], served["user-service-v2"]
    low, high = CANARY_V2_SHARE
    others = {name: count for name, count in served.items() if name not in ("user-service-v1", "user-service-v2")}
    tour.say(f"{CANARY_REQUESTS} x GET /profile, Host: user-service -> v1: {v1}, v2: {v2}"
             + (f" (and {_counts(others)})" if others else ""))
    return all([
        tour.expect(v1 + v2 == CANARY_REQUESTS, f"all {CANARY_REQUESTS} answered by user-service v1 or v2"),
        tour.expect(low <= v2 / CANARY_REQUESTS <= high,
                    f"v2 got {v2 / CANARY_REQUESTS:.1%}: a 10% weight gives {low:.0%}-{high:.0%} "
                    f"over {CANARY_REQUESTS} requests (v1 {v1 / CANARY_REQUESTS:.1%})"),
    ])


def payment_answers(tour: Tour) -> bool:
    tour.say("payment-service has one workload; its sidecar's inbound listener passes requests to the app.")
    reply = tour.send("payment-service", "/charge")
    served_by = reply.headers.get("x-demo-service")
    tour.say(f"GET /charge, Host: payment-service -> HTTP {reply.status} from {served_by or 'the sidecar'}")
    if reply.status == 200:
        seen = reply.json()["headers"]
        tour.say(f"the app saw x-forwarded-for: {seen.get('x-forwarded-for')} (the frontend app, then the "
                 "frontend sidecar's connection)")
        tour.say(f"and the x-request-id the frontend sidecar generated: {seen.get('x-request-id')}")
    else:
        tour.say(f"the answer: {_text(reply)}")
    return tour.expect(reply.status == 200 and served_by == "payment-service",
                       "payment-service answered through its sidecar")


def route_miss(tour: Tour) -> bool:
    tour.say("A Host that no ServiceEntry or VirtualService knows gets a 404 from the sidecar itself.")
    reply = tour.send("nope", "/")
    flags = reply.headers.get("x-mesh-flags")
    tour.say(f"GET /, Host: nope -> HTTP {reply.status}, x-mesh-flags: {flags}")
    tour.say(f"the sidecar says: {_text(reply)}")
    return tour.expect(reply.status == 404 and flags == "NR", "404 with response flag NR (no route)")


def retry_flaky(tour: Tour) -> bool:
    tour.say("The payment app fails /flaky/1 once per x-request-id (503), then succeeds;")
    tour.say("payment-service's VirtualService retries gateway errors, so the frontend never sees the 503.")
    request_id = f"tour-{uuid.uuid4().hex[:12]}"
    reply = tour.send("payment-service", "/flaky/1", {"x-request-id": request_id})
    attempt = reply.json().get("attempt") if reply.status == 200 else None
    tour.say(f"GET /flaky/1, Host: payment-service, x-request-id: {request_id} -> HTTP {reply.status}"
             + (f"; the app served attempt {attempt}" if attempt else f": {_text(reply)}"))
    return all([
        tour.expect(reply.status == 200, "the frontend got 200"),
        tour.expect(attempt == 2, "the sidecar retried: the app saw 2 attempts (503, then 200)"),
    ])


def cluster_health(tour: Tour) -> bool:
    tour.say("Each sidecar's admin /clusters lists its upstream endpoints with health and request counts.")
    tour.say("An endpoint is shared by every cluster that contains it (the service, its subsets); idle ones are left out:")
    results = []
    for workload in tour.mesh.workloads:
        endpoints, member_of = {}, collections.defaultdict(list)
        for name, cluster in tour.mesh.admin(workload, "/clusters").json().items():
            for endpoint in cluster["endpoints"]:
                endpoints[endpoint["address"]] = endpoint
                member_of[endpoint["address"]].append(name)
        tour.say(f"{workload.name} sidecar, http://{ADMIN_ADDRESS}:{workload.admin_port}/clusters")
        for address, endpoint in endpoints.items():
            if endpoint["total_requests"]:
                tour.say(f"  {address:<17} {'healthy' if endpoint['healthy'] else 'EJECTED'}, "
                         f"{endpoint['total_requests']} requests, {endpoint['total_failures']} failed;"
                         f" in {', '.join(member_of[address])}")
        ejected = [address for address, endpoint in endpoints.items() if not endpoint["healthy"]]
        results.append(tour.expect(not ejected, f"every endpoint healthy in {workload.name}'s sidecar"
                                   + (f" (ejected: {', '.join(ejected)})" if ejected else "")))
    return all(results)


@dataclass(frozen=True)
class Step:
    """One stop of the tour: *run* prints its own lines and returns whether every expectation held."""

    title: str
    run: Callable[[Tour], bool]


STEPS = (
    Step("Path-based routing: /v1/ is pinned to v1", pinned_v1),
    Step("Header-based routing: beta testers get v2", beta_to_v2),
    Step("Weighted routing: the 90/10 canary split", canary_split),
    Step("Another service: payment-service", payment_answers),
    Step("A route miss", route_miss),
    Step("Retries hide a flaky upstream", retry_flaky),
    Step("What the sidecars saw", cluster_health),
)


def run_tour(mesh: DemoMesh, steps=STEPS, out=None) -> bool:
    """Run every step, print a summary, and return whether all passed.

    A step that cannot talk to the mesh (connection error, bad response) fails
    with the error printed; the tour goes on with the next one.
    """
    tour = Tour(mesh, out)
    client = tour.client
    tour.heading()
    tour.heading(f"Tour: requests sent as the {client.name} app would, to its sidecar at "
                 f"{client.address}:{OUTBOUND_PORT} with the service in the Host header.")
    passed = 0
    for number, step in enumerate(steps, 1):
        tour.heading()
        tour.heading(f"{number}. {step.title}")
        try:
            ok = step.run(tour)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            ok = tour.expect(False, f"the step could not complete: {type(exc).__name__}: {exc}")
        passed += bool(ok)
    ok = passed == len(steps)
    tour.heading()
    tour.heading(f"{tour.passed_mark if ok else tour.failed_mark} {passed} of {len(steps)} steps passed")
    return ok
