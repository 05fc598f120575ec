"""The guided tour of ``meshctl demo``: real requests through the mesh, checked and explained.

The tour mostly plays the frontend app: it sends plain HTTP from the
frontend's address to the frontend sidecar's outbound listener
(127.0.10.1:15001) and names the service it wants in the ``Host`` header,
exactly as the app would.  The frontend runs in namespace ``frontend`` and the
services in ``demo``, so it names them ``user-service.demo`` and
``payment-service.demo`` (a short name only resolves within its own
namespace).  Where a step needs another caller, it sends as that app would:
user-service v1 calls ``payment-service`` through 127.0.10.2:15001, from
127.0.10.2.  The demo app in each workload answers with its own name
(``x-demo-service``) and echoes the request it received as JSON, so every
response shows which workload served it and what it saw -- including the
``x-forwarded-client-cert`` header its sidecar adds, whose ``URI=`` is the
caller's verified SPIFFE id.

The tour is a list of :class:`Step` objects.  A step prints what it does and
what happened, checks each expectation with :meth:`Tour.expect` (a check mark
or a cross per line) and returns whether all of them held, or None when it had
nothing to show (skipped).  To extend the tour, write
``def my_step(tour: Tour) -> bool | None`` and add it to :data:`STEPS`.
"""

from __future__ import annotations

import collections
import http.client
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mesh.demo import grpc_app
from mesh.demo.runner import (
    ADMIN_ADDRESS,
    APP_PORT,
    CONTROL_ADMIN_PORT,
    INBOUND_PORT,
    METRICS_PATH,
    METRICS_PORT,
    OUTBOUND_PORT,
    DemoMesh,
    Reply,
    Workload,
    http_get,
)

#: The workload the tour speaks for.
CLIENT = "frontend"
#: How the frontend (namespace frontend) names the services of namespace demo.
USER_SERVICE = "user-service.demo"
PAYMENT_SERVICE = "payment-service.demo"
GREETER = "greeter.demo"
PINNED_REQUESTS = 20
BETA_REQUESTS = 10
CANARY_REQUESTS = 500
#: Accepted share of v2 for the 10% canary weight.  Over 500 requests, v2 expects 50 (standard
#: deviation 6.7); a correct split falls outside 25..80 about 3 times in 100,000 runs.
CANARY_V2_SHARE = (0.05, 0.16)
#: The live config change: the canary weights (v1, v2) written in turn, then 90/10 again.
LIVE_WEIGHTS = ((50, 50), (0, 100))
LIVE_REQUESTS = 200
#: Accepted share of v2 for a 50/50 split: over 200 requests (standard deviation 7.1), 60..140 is
#: more than 5.6 standard deviations either side, so a correct split practically never misses.
LIVE_V2_TOLERANCE = 0.2
#: Seconds every proxy gets to ACK a config change (file watch, debounce, push, compile).
SYNC_TIMEOUT = 15.0
#: The services the tour calls, by ``destination_service_name``: each must show requests in the metrics.
CALLED_SERVICES = ("user-service", "payment-service", "greeter")
#: Where Grafana dashboards would ship, relative to the source tree.
GRAFANA_DIR = Path(__file__).resolve().parents[2] / "deploy" / "grafana"


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
        #: When the tour began (monotonic seconds), for request rates over the tour.
        self.started = time.monotonic()

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

    def send(self, host: str, path: str = "/", headers: dict | None = None, caller: str = CLIENT) -> Reply:
        """GET *path* as the *caller* app would (default: the frontend): from its address, through its
        sidecar's outbound listener, routed by ``Host: host``."""
        address = self.mesh.workload(caller).address
        return http_get(address, OUTBOUND_PORT, path, {"Host": host, **(headers or {})}, source_address=address)

    def workload(self, name: str) -> Workload:
        return self.mesh.workload(name)

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


def _xfcc(reply: Reply) -> dict[str, str]:
    """The fields (By, Hash, Subject, URI) of the x-forwarded-client-cert the app echoed; {} if none."""
    try:
        value = reply.json()["headers"].get("x-forwarded-client-cert", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
    fields = {}
    for part in value.split(";"):
        key, sep, text = part.partition("=")
        if sep:
            fields[key.strip()] = text.strip()
    return fields


def pinned_v1(tour: Tour) -> bool:
    tour.say("user-service's VirtualService sends every path under /v1/ to subset v1 (rule pinned-v1).")
    tour.say(f"The frontend is in namespace frontend, user-service in demo: it asks for Host: {USER_SERVICE}.")
    served = tour.count_services(USER_SERVICE, "/v1/profile", PINNED_REQUESTS)
    tour.say(f"{PINNED_REQUESTS} x GET /v1/profile, Host: {USER_SERVICE} -> {_counts(served)}")
    return tour.expect(served == {"user-service-v1": PINNED_REQUESTS}, f"all {PINNED_REQUESTS} reached user-service v1")


def beta_to_v2(tour: Tour) -> bool:
    tour.say("Requests with the header x-user-group: beta go to subset v2 (rule beta-testers).")
    served = tour.count_services(USER_SERVICE, "/profile", BETA_REQUESTS, {"x-user-group": "beta"})
    tour.say(f"{BETA_REQUESTS} x GET /profile, Host: {USER_SERVICE}, x-user-group: beta -> {_counts(served)}")
    return tour.expect(served == {"user-service-v2": BETA_REQUESTS}, f"all {BETA_REQUESTS} reached user-service v2")


def canary_split(tour: Tour) -> bool:
    tour.say("Everything else is a canary release: weight 90 to v1, 10 to v2 (rule canary).")
    served = tour.count_services(USER_SERVICE, "/profile", CANARY_REQUESTS)
    v1, v2 = served["user-service-v1"], served["user-service-v2"]
    low, high = CANARY_V2_SHARE
    others = {name: count for name, count in served.items() if name not in ("user-service-v1", "user-service-v2")}
    tour.say(f"{CANARY_REQUESTS} x GET /profile, Host: {USER_SERVICE} -> v1: {v1}, v2: {v2}"
             + (f" (and {_counts(others)})" if others else ""))
    return all([
        tour.expect(v1 + v2 == CANARY_REQUESTS, f"all {CANARY_REQUESTS} answered by user-service v1 or v2"),
        tour.expect(low <= v2 / CANARY_REQUESTS <= high,
                    f"v2 got {v2 / CANARY_REQUESTS:.1%}: a 10% weight gives {low:.0%}-{high:.0%} "
                    f"over {CANARY_REQUESTS} requests (v1 {v1 / CANARY_REQUESTS:.1%})"),
    ])


def route_miss(tour: Tour) -> bool:
    tour.say("A Host that no ServiceEntry or VirtualService knows gets a 404 from the sidecar itself;")
    tour.say("so does a short name from another namespace: for the frontend, `user-service` is not user-service.demo.")
    results = []
    for host in ("nope", "user-service"):
        reply = tour.send(host, "/")
        flags = reply.headers.get("x-mesh-flags")
        tour.say(f"GET /, Host: {host} -> HTTP {reply.status}, x-mesh-flags: {flags}")
        tour.say(f"the sidecar says: {_text(reply)}")
        results.append(tour.expect(reply.status == 404 and flags == "NR", "404 with response flag NR (no route)"))
    return all(results)


def retry_flaky(tour: Tour) -> bool:
    tour.say("The user-service app fails /flaky/1 once per x-request-id (503), then succeeds;")
    tour.say("user-service's VirtualService pins /flaky/ to v1 and retries gateway errors (rule flaky-v1),")
    tour.say("so the frontend never sees the 503.")
    request_id = f"tour-{uuid.uuid4().hex[:12]}"
    reply = tour.send(USER_SERVICE, "/flaky/1", {"x-request-id": request_id})
    attempt = reply.json().get("attempt") if reply.status == 200 else None
    served_by = reply.headers.get("x-demo-service")
    tour.say(f"GET /flaky/1, Host: {USER_SERVICE}, x-request-id: {request_id} -> HTTP {reply.status}"
             + (f"; {served_by} served attempt {attempt}" if attempt else f": {_text(reply)}"))
    return all([
        tour.expect(reply.status == 200, "the frontend got 200"),
        tour.expect(attempt == 2 and served_by == "user-service-v1",
                    "the sidecar retried: user-service v1 saw 2 attempts (503, then 200)"),
    ])


def who_is_calling(tour: Tour) -> bool:
    tour.say("Every hop between sidecars is mTLS. The receiving sidecar verifies the caller's certificate and")
    tour.say("tells its app who called in x-forwarded-client-cert (URI= is the caller's SPIFFE id, By= its own).")
    frontend, user_v1 = tour.workload(CLIENT), tour.workload("user-service-v1")
    calls = [
        (CLIENT, USER_SERVICE, "/v1/whoami", {}, "user-service-v1"),
        (CLIENT, USER_SERVICE, "/whoami", {"x-user-group": "beta"}, "user-service-v2"),
        ("user-service-v1", "payment-service", "/whoami", {}, "payment-service"),
    ]
    results = []
    for caller, host, path, headers, callee in calls:
        reply = tour.send(host, path, headers, caller=caller)
        served_by = reply.headers.get("x-demo-service")
        via = f"{tour.workload(caller).address}:{OUTBOUND_PORT}"
        extra = "".join(f", {name}: {value}" for name, value in headers.items())
        tour.say(f"{caller} -> GET {path}, Host: {host}{extra} (via {via}) -> HTTP {reply.status} "
                 f"from {served_by or 'the sidecar'}")
        xfcc = _xfcc(reply) if reply.status == 200 else {}
        if xfcc:
            tour.say(f"  {callee} app sees URI={xfcc.get('URI')}")
            tour.say(f"  {' ' * len(callee)}      and By={xfcc.get('By')}")
        elif reply.status == 200:
            tour.say(f"  {callee} app got no x-forwarded-client-cert")
        else:
            tour.say(f"  the answer: {_text(reply)}")
        expected_caller = tour.workload(caller).spiffe_id
        expected_by = tour.workload(callee).spiffe_id
        results.append(tour.expect(
            reply.status == 200 and served_by == callee and xfcc.get("URI") == expected_caller
            and xfcc.get("By") == expected_by,
            f"{callee} knows it was called by {expected_caller}"))
    tour.say(f"(the frontend is {frontend.principal}, user-service is {user_v1.principal}: "
             "these principals are what AuthorizationPolicies match)")
    return all(results)


def authorization(tour: Tour) -> bool:
    tour.say("AuthorizationPolicies (security.yaml): user-service ALLOWs only the frontend's principal;")
    tour.say("payment-service ALLOWs only user-service's, so the frontend is refused by payment-service's sidecar.")
    payment = tour.workload("payment-service")
    authz = (tour.mesh.admin(payment, "/config_dump").json().get("config") or {}).get("authz") or {}
    for action in ("allow", "deny"):
        for policy in authz.get(action, []):
            sources = [condition for rule in policy.get("rules", []) for source in rule.get("from", [])
                       for condition in source]
            tour.say(f"payment-service's sidecar (/config_dump) enforces {action.upper()} {policy['name']}"
                     + (f": from {'; '.join(sources)}" if sources else ""))
    results = []
    checks = [
        (CLIENT, USER_SERVICE, "user-service", 200),
        (CLIENT, PAYMENT_SERVICE, "payment-service", 403),
        ("user-service-v1", "payment-service", "payment-service", 200),
    ]
    for caller, host, service, expected in checks:
        reply = tour.send(host, "/account", caller=caller)
        flags = reply.headers.get("x-mesh-flags")
        served_by = reply.headers.get("x-demo-service")
        line = f"{caller} -> GET /account, Host: {host} -> HTTP {reply.status}"
        if reply.status == 200:
            tour.say(f"{line} from {served_by}")
            results.append(tour.expect(expected == 200, f"{caller} may call {service}" if expected == 200
                                       else f"{caller} may not call {service}, yet it got 200"))
            continue
        tour.say(f"{line}, x-mesh-flags: {flags}")
        tour.say(f"  the sidecar says: {_text(reply)}")
        if flags == "RBAC":
            tour.say(f"  (the caller learns no policy name; {service}'s access log names the deciding one)")
        if expected == 200:
            results.append(tour.expect(False, f"{caller} may call {service}"))
            continue
        results.append(tour.expect(
            reply.status == 403 and _text(reply) == "RBAC: access denied" and flags == "RBAC"
            and served_by is None,
            f"{caller} may not call {service}: 403 \"RBAC: access denied\" from {service}'s sidecar, "
            "which never passed it to the app"))
    return all(results)


def grpc_call(tour: Tour, caller: str, method: str, name: str = "tour") -> tuple[str, str, dict]:
    """One unary gRPC call of ``GREETER`` as the *caller* app would make it: HTTP/2 without TLS to its
    sidecar's outbound listener, ``:authority`` naming the service.  Returns (status name, answer or
    error details, response metadata)."""
    import grpc

    address = tour.workload(caller).address
    options = [("grpc.default_authority", GREETER), ("grpc.enable_retries", 0)]
    with grpc.insecure_channel(f"{address}:{OUTBOUND_PORT}", options=options) as channel:
        try:
            answer, call = channel.unary_unary(method).with_call(name.encode(), timeout=10.0)
        except grpc.RpcError as error:
            metadata = {**dict(error.initial_metadata() or ()), **dict(error.trailing_metadata() or ())}
            return error.code().name, error.details() or "", metadata
    return "OK", answer.decode("utf-8", "replace"), dict(call.initial_metadata() or ())


def grpc_through_the_mesh(tour: Tour) -> bool | None:
    if not any(workload.grpc for workload in tour.mesh.workloads):
        tour.say("skipped: grpcio is not installed, so the demo runs no gRPC workload (pip install 'txmesh[demo]')")
        return None
    tour.say("greeter is a gRPC service (port protocol GRPC): the apps speak plaintext HTTP/2 to their sidecars,")
    tour.say("the sidecars mTLS to each other. Its VirtualService routes the gRPC service /demo.Greeter/, and only")
    tour.say("the frontend may call it; the errors a sidecar makes reach gRPC clients as gRPC statuses.")
    calls = [
        (CLIENT, grpc_app.SAY_HELLO, "OK"),
        ("user-service-v1", grpc_app.SAY_HELLO, "PERMISSION_DENIED"),
        (CLIENT, "/demo.Unknown/Call", "UNIMPLEMENTED"),
    ]
    results = []
    for caller, method, expected in calls:
        status, text, metadata = grpc_call(tour, caller, method)
        flags = metadata.get("x-mesh-flags")
        tour.say(f"{caller} -> gRPC {method}, :authority {GREETER} -> {status}: {text}"
                 + (f" (x-mesh-flags: {flags})" if flags else ""))
        if expected == "OK":
            results.append(tour.expect(
                status == "OK" and text.endswith(f"you are {tour.workload(caller).spiffe_id}"),
                "the greeter answered and knows the caller's verified identity"))
        elif expected == "PERMISSION_DENIED":
            results.append(tour.expect(status == expected and flags == "RBAC",
                                       "user-service may not call greeter: its AuthorizationPolicy, as gRPC status "
                                       "PERMISSION_DENIED from greeter's sidecar"))
        else:
            results.append(tour.expect(status == expected and flags == "NR",
                                       "no route for that gRPC service: UNIMPLEMENTED from the frontend's sidecar "
                                       "(the HTTP answer would be 404)"))
    return all(results)


def plaintext_refused(tour: Tour) -> bool:
    tour.say("PeerAuthentication istio-system/default sets mTLS STRICT for the whole mesh: a sidecar's inbound")
    tour.say("port takes mTLS only. Plain HTTP straight to payment-service's inbound port, as curl would send it:")
    payment = tour.workload("payment-service")
    mode = ((tour.mesh.admin(payment, "/config_dump").json().get("config") or {})
            .get("peer_authentication") or {}).get("mode")
    tour.say(f"payment-service's sidecar (/config_dump) reports peer authentication mode {mode}")
    try:
        reply = http_get(payment.address, INBOUND_PORT, "/charge", {"Host": "payment-service"}, timeout=5.0)
    except (OSError, http.client.HTTPException) as exc:
        reply, outcome = None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    else:
        outcome = f"HTTP {reply.status} {_text(reply)[:80]}"
    tour.say(f"GET http://{payment.address}:{INBOUND_PORT}/charge (plaintext) -> {outcome}")
    tour.say(f"(This loopback demo has no iptables redirect, so an app's own port {APP_PORT} can still be reached "
             "directly; in a pod, that traffic too goes through the sidecar's inbound port.)")
    return all([
        tour.expect(mode == "STRICT", "the inbound listener is in STRICT mode"),
        tour.expect(reply is None, "the connection was closed without an HTTP answer: no plaintext into the mesh"),
    ])


#: Where the certificate facts would be in a sidecar's /config_dump, if its admin exposes them.
CERTIFICATE_KEYS = ("certificate", "certificates", "workload_certificate", "identity")


def certificate_facts(tour: Tour) -> bool | None:
    client = tour.client
    url = f"http://{ADMIN_ADDRESS}:{client.admin_port}/config_dump"
    dump = tour.mesh.admin(client, "/config_dump").json()
    found = next(((key, dump[key]) for key in CERTIFICATE_KEYS if dump.get(key)), None)
    if found is None:
        tour.say(f"{client.name}'s sidecar admin does not expose its workload certificate ({url} has no "
                 f"{' / '.join(CERTIFICATE_KEYS)} section); skipped.")
        return None
    key, facts = found
    tour.say(f"{client.name}'s sidecar, {url} [{key}]:")
    if isinstance(facts, dict):
        for name, value in facts.items():
            tour.say(f"  {name}: {value}")
    else:
        tour.say(f"  {facts}")
    text = str(facts)
    return tour.expect(client.spiffe_id in text, f"the certificate is for {client.spiffe_id}")


def cluster_health(tour: Tour) -> bool:
    tour.say("Each sidecar's admin /clusters lists its upstream endpoints with health and request counts.")
    tour.say("An endpoint is shared by every cluster that contains it (the service, its subsets); "
             "idle ones are left out:")
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


_CANARY_WEIGHT = re.compile(r"(subset: (v1|v2)\}\s*\n\s*weight: )\d+")


def _with_weights(text: str, v1: int, v2: int) -> str:
    """The user-service YAML *text* with the canary rule's weights set to *v1* and *v2*."""
    new, count = _CANARY_WEIGHT.subn(lambda m: m[1] + str(v1 if m[2] == "v1" else v2), text)
    if count != 2:
        raise ValueError(f"expected 2 canary weights in the user-service config, found {count}")
    return new


def _write_atomically(path, text: str) -> None:
    """Replace *path* in one rename, so the control plane never reads half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _synced(tour: Tour, before: str) -> str | None:
    """The frontend sidecar's new config version once it differs from *before* and every proxy has
    ACKed what it was sent, else None."""
    rows = tour.mesh.control_admin("/proxies").json()
    if isinstance(rows, dict):
        rows = rows.get("proxies", [])
    by_workload = {row.get("workload"): row for row in rows}
    if set(by_workload) != {w.name for w in tour.mesh.workloads} or any(
            not row.get("connected") or row.get("stale") for row in rows):
        return None
    version = by_workload[CLIENT].get("version_acked")
    if not version or version == before:
        return None
    dumped = tour.mesh.admin(tour.client, "/config_dump").json().get("version")
    return version if dumped == version else None


def _client_version(tour: Tour) -> str:
    return tour.mesh.admin(tour.client, "/config_dump").json().get("version") or ""


def _change_weights(tour: Tour, path, original: str, v1: int, v2: int) -> tuple[str | None, float]:
    """Write weights *v1*/*v2* into *path*; wait until every proxy ACKed the new version.
    Return (the frontend's new version or None on timeout, seconds waited)."""
    before = _client_version(tour)
    started = time.monotonic()
    _write_atomically(path, _with_weights(original, v1, v2))
    deadline = started + SYNC_TIMEOUT
    while (version := _synced(tour, before)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return version, time.monotonic() - started


def _proxy_status(tour: Tour) -> None:
    """Print ``meshctl proxy-status`` (the control plane's /proxies as a table)."""
    meshctl = os.path.join(os.path.dirname(sys.executable), "meshctl")
    argv = [meshctl, "proxy-status", "--control-admin", f"{ADMIN_ADDRESS}:{CONTROL_ADMIN_PORT}"]
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
        lines = (result.stdout + result.stderr).rstrip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as exc:
        lines = [f"(could not run meshctl proxy-status: {exc})"]
    tour.say("$ meshctl proxy-status")
    for line in lines:
        if line.strip():
            tour.say(f"  {line}")


def live_config_change(tour: Tour) -> bool:
    path = tour.mesh.config_dir / "user-service.yaml"
    tour.say("The control plane watches the demo's config directory and pushes every change to the sidecars;")
    tour.say(f"this step rewrites the canary weights in {path}")
    tour.say("and sends traffic after every proxy has ACKed the new config (control plane admin /proxies).")
    original = path.read_text()
    _with_weights(original, 90, 10)  # the canary rule is where the step expects it
    results = []
    try:
        for v1_weight, v2_weight in LIVE_WEIGHTS:
            version, waited = _change_weights(tour, path, original, v1_weight, v2_weight)
            if not tour.expect(version is not None,
                               f"canary set to {v1_weight}/{v2_weight}: every proxy ACKed the new config"
                               + (f" in {waited:.2f}s (frontend now at version {version})" if version
                                  else f": not within {SYNC_TIMEOUT:g}s")):
                results.append(False)
                break
            served = tour.count_services(USER_SERVICE, "/profile", LIVE_REQUESTS)
            v1, v2 = served["user-service-v1"], served["user-service-v2"]
            others = {name: n for name, n in served.items() if name not in ("user-service-v1", "user-service-v2")}
            tour.say(f"weights {v1_weight}/{v2_weight}: {LIVE_REQUESTS} x GET /profile, Host: {USER_SERVICE} "
                     f"-> v1: {v1}, v2: {v2}" + (f" (and {_counts(others)})" if others else ""))
            share = v2_weight / (v1_weight + v2_weight)
            if share in (0.0, 1.0):
                results.append(tour.expect(v2 == share * LIVE_REQUESTS and v1 + v2 == LIVE_REQUESTS,
                                           f"exactly {v2_weight}% to v2: all {LIVE_REQUESTS} went to "
                                           f"{'v2' if share else 'v1'}"))
            else:
                low, high = share - LIVE_V2_TOLERANCE, share + LIVE_V2_TOLERANCE
                results.append(tour.expect(v1 + v2 == LIVE_REQUESTS and low <= v2 / LIVE_REQUESTS <= high,
                                           f"v2 got {v2 / LIVE_REQUESTS:.1%}: a {v2_weight}% weight gives "
                                           f"{low:.0%}-{high:.0%} over {LIVE_REQUESTS} requests"))
        _proxy_status(tour)
    finally:
        # Put the 90/10 canary back, unless the step failed before its first write. (An error still
        # propagates to run_tour, which fails the step with it.)
        restored = None if path.read_text() == original else _change_weights(tour, path, original, 90, 10)
    if restored is not None:
        version, waited = restored
        results.append(tour.expect(version is not None and path.read_text() == original,
                                   "canary restored to 90/10: every proxy ACKed it"
                                   + (f" in {waited:.2f}s (frontend at version {version})" if version else "")))
    return all(results)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The *q* quantile of a histogram given as cumulative ``[(le, count)]``, as Prometheus's
    ``histogram_quantile`` estimates it: linear interpolation within the bucket that holds rank
    ``q * count`` (from 0 for the first bucket); the highest finite bound if that bucket is +Inf.
    NaN for an empty histogram."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lower_bound = lower_count = 0.0
    for index, (bound, count) in enumerate(buckets):
        if count >= rank:
            if bound == float("inf"):
                return buckets[index - 1][0] if index else float("nan")
            if index == 0 and bound <= 0:
                return bound
            in_bucket = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / in_bucket if in_bucket else 1.0)
        lower_bound, lower_count = bound, count
    return buckets[-1][0]


@dataclass
class ServiceStats:
    """What the ``reporter="destination"`` side counted for one service, summed over its sidecars."""

    codes: collections.Counter = field(default_factory=collections.Counter)
    buckets: collections.Counter = field(default_factory=collections.Counter)  # le -> cumulative count
    workloads: set = field(default_factory=set)

    @property
    def requests(self) -> int:
        return sum(self.codes.values())

    @property
    def successes(self) -> int:
        """Requests not answered with a 5xx: Istio's dashboards count every non-5xx as a success."""
        return sum(count for code, count in self.codes.items() if not code.startswith("5"))

    def p99(self) -> float:
        return histogram_quantile(0.99, list(self.buckets.items()))


def scrape(workload: Workload) -> list:
    """The metric families *workload*'s sidecar serves on its metrics port."""
    reply = http_get(workload.address, METRICS_PORT, METRICS_PATH, timeout=5.0)
    if reply.status != 200:
        raise ValueError(f"{workload.address}:{METRICS_PORT}{METRICS_PATH} answered HTTP {reply.status}")
    return list(text_string_to_metric_families(reply.body.decode("utf-8")))


def _by_service(families_by_workload: dict[str, list]) -> tuple[dict[str, ServiceStats], collections.Counter]:
    """Destination-side stats per ``destination_service_name``, and the requests each sidecar reported
    as ``reporter="source"`` (what its app sent)."""
    services = collections.defaultdict(ServiceStats)
    sent = collections.Counter()
    for workload, families in families_by_workload.items():
        for family in families:
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "istio_requests_total":
                    if labels.get("reporter") == "source":
                        sent[workload] += int(sample.value)
                    elif labels.get("reporter") == "destination":
                        stats = services[labels.get("destination_service_name", "unknown")]
                        stats.codes[labels.get("response_code", "?")] += int(sample.value)
                        stats.workloads.add(labels.get("destination_workload", workload))
                elif (sample.name == "istio_request_duration_milliseconds_bucket"
                      and labels.get("reporter") == "destination"):
                    stats = services[labels.get("destination_service_name", "unknown")]
                    stats.buckets[float(labels["le"])] += sample.value
    return dict(services), sent


def _milliseconds(value: float) -> str:
    return "-" if value != value else f"{value:g} ms" if value >= 10 else f"{value:.2f} ms"


def _prometheus_config(tour: Tour) -> list[str]:
    targets = ", ".join(f"'{w.address}:{METRICS_PORT}'" for w in tour.mesh.workloads)
    return [
        "scrape_configs:",
        "  - job_name: txmesh-sidecars",
        f"    metrics_path: {METRICS_PATH}",
        "    static_configs:",
        f"      - targets: [{targets}]",
        "  - job_name: txmesh-control-plane",
        "    metrics_path: /metrics",
        "    static_configs:",
        f"      - targets: ['{ADMIN_ADDRESS}:{CONTROL_ADMIN_PORT}']",
    ]


def metrics_summary(tour: Tour) -> bool:
    tour.say(f"Each sidecar serves Istio's standard metrics at http://<its address>:{METRICS_PORT}{METRICS_PATH};")
    tour.say("this step scrapes them all and sums what the receiving side counted (reporter=\"destination\").")
    seconds = max(time.monotonic() - tour.started, 1e-6)
    families = {}
    for workload in tour.mesh.workloads:
        families[workload.name] = scrape(workload)
    services, sent = _by_service(families)
    tour.say(f"Over the tour so far ({seconds:.1f}s). Success = not 5xx, as Istio's dashboards count it (so a 403")
    tour.say("is a success); p99 is interpolated in the duration buckets, as Prometheus's histogram_quantile does:")
    rows = [("service", "requests", "rate", "success", "p99", "response codes")]
    for name in sorted(services):
        stats = services[name]
        total = stats.requests
        rows.append((name, str(total), f"{total / seconds:.2f}/s",
                     f"{stats.successes / total:.1%}" if total else "-", _milliseconds(stats.p99()),
                     ", ".join(f"{code}: {count}" for code, count in sorted(stats.codes.items()))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:5], widths[1:5])]
        tour.say(f"  {'  '.join(cells)}  {row[5]}".rstrip())
    callers = [w.name for w in tour.mesh.workloads if w.service not in services]
    for name in callers:
        tour.say(f"({name} only calls others: nothing reached its inbound side; its sidecar reported "
                 f"{sent[name]} requests sent, as reporter=\"source\")")
    results = [tour.expect(services.get(name) is not None and services[name].requests > 0,
                           f"{name}: {services[name].requests if name in services else 0} requests counted "
                           "by its sidecars") for name in CALLED_SERVICES
               if any(workload.service == name for workload in tour.mesh.workloads)]
    payment = services.get("payment-service")
    denied = payment.codes.get("403", 0) if payment else 0
    results.append(tour.expect(denied > 0, f"payment-service counted {denied} x 403: the frontend refused "
                                           "by its AuthorizationPolicy"))
    control = tour.mesh.control_admin("/metrics")
    connected = next((sample.value for family in text_string_to_metric_families(control.body.decode("utf-8"))
                      for sample in family.samples if sample.name == "mesh_control_connected_proxies"), None)
    results.append(tour.expect(control.status == 200 and connected == len(tour.mesh.workloads),
                               f"the control plane's http://{ADMIN_ADDRESS}:{CONTROL_ADMIN_PORT}/metrics: "
                               f"mesh_control_connected_proxies {connected:g}" if connected is not None else
                               f"the control plane's /metrics (HTTP {control.status}) has "
                               "mesh_control_connected_proxies"))
    tour.say("Point Prometheus at them with this prometheus.yml:")
    for line in _prometheus_config(tour):
        tour.say(f"  {line}")
    dashboards = sorted(GRAFANA_DIR.glob("*.json")) if GRAFANA_DIR.is_dir() else []
    if dashboards:
        for dashboard in dashboards:
            tour.say(f"Grafana: import {dashboard} (with that Prometheus as its data source).")
    else:
        tour.say(f"Grafana: txmesh ships no dashboards ({GRAFANA_DIR} is absent); the metric names and labels are")
        tour.say("Istio's, so Istio's own Grafana dashboards read them once that Prometheus is a data source.")
    return all(results)


@dataclass(frozen=True)
class Step:
    """One stop of the tour: *run* prints its own lines and returns whether every expectation held,
    or None if it was skipped (it had nothing to show)."""

    title: str
    run: Callable[[Tour], bool | None]


STEPS = (
    Step("Path-based routing: /v1/ is pinned to v1", pinned_v1),
    Step("Header-based routing: beta testers get v2", beta_to_v2),
    Step("Weighted routing: the 90/10 canary split", canary_split),
    Step("Live config change: shift the canary by editing a file", live_config_change),
    Step("A route miss", route_miss),
    Step("Retries hide a flaky upstream", retry_flaky),
    Step("Who is calling: mTLS identities", who_is_calling),
    Step("Authorization: who may call whom", authorization),
    Step("gRPC through the mesh", grpc_through_the_mesh),
    Step("mTLS everywhere: plaintext is refused", plaintext_refused),
    Step("A sidecar's certificate", certificate_facts),
    Step("What the sidecars saw", cluster_health),
    Step("What the metrics say", metrics_summary),
)


def run_tour(mesh: DemoMesh, steps=STEPS, out=None) -> bool:
    """Run every step, print a summary, and return whether none failed (skipped steps do not fail).

    A step that cannot talk to the mesh (connection error, bad response) fails
    with the error printed; the tour goes on with the next one.
    """
    tour = Tour(mesh, out)
    client = tour.client
    tour.heading()
    tour.heading(f"Tour: requests sent as the {client.name} app would (namespace {client.namespace}), to its "
                 f"sidecar at {client.address}:{OUTBOUND_PORT} with the service in the Host header.")
    passed = skipped = 0
    for number, step in enumerate(steps, 1):
        tour.heading()
        tour.heading(f"{number}. {step.title}")
        try:
            ok = step.run(tour)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            ok = tour.expect(False, f"the step could not complete: {type(exc).__name__}: {exc}")
        if ok is None:
            skipped += 1
        else:
            passed += bool(ok)
    ran = len(steps) - skipped
    ok = passed == ran
    tour.heading()
    tour.heading(f"{tour.passed_mark if ok else tour.failed_mark} {passed} of {ran} steps passed"
                 + (f" ({skipped} skipped)" if skipped else ""))
    return ok
