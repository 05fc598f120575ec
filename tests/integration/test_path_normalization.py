"""Path tricks against AuthorizationPolicies, under each of Istio's path normalization options.

One demo app sits behind four sidecars (inbound, plaintext: PeerAuthentication is PERMISSIVE by
default) that carry the label ``app: deny`` and differ only in ``--path-normalization`` (NONE, BASE,
MERGE_SLASHES, DECODE_AND_MERGE_SLASHES); a DENY policy refuses ``/private`` and ``/private/*``
there.  Another demo app sits behind a fifth sidecar (``app: allow``, default options) with the
policy of issue #10: ALLOW ``/public*`` only.

Each case is sent byte for byte (curl would clean the path up first) and the test checks what
happened: which status the proxy answered, or, when the request went through, the path the app
received (the demo app echoes its request target).  At the end the app's own log must list exactly
the requests expected to reach it: a refused request never got there.

The rule behind every expectation: whatever the mode, the app receives the path the policy checked.
Modes differ in how much they rewrite first; NONE rewrites nothing, as Istio documents (it is open
to ``/public/../private`` when the app resolves dot segments itself).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.harness import RawConnection, wait_for
from tests.integration.test_identity_support import authorization_policy
from tests.integration.test_proxy_support import write_config

MODES = ("NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")
SAME = "same"  # the request reached the app with its path unchanged

#: path sent -> outcome under NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES: a status the proxy
#: answered with itself, SAME, or the path the app must receive.
CASES = {
    "/public/x": (SAME, SAME, SAME, SAME),
    "/private": (403, 403, 403, 403),
    # dot segments with parameters: Tomcat and Jetty read '..;' as '..'
    "/public/..;/private": (SAME, 400, 400, 400),
    "/public/%2e%2e;/private": (SAME, 400, 400, 400),
    "/public/.;/private": (SAME, 400, 400, 400),
    "/private/.;x/y": (403, 400, 400, 400),
    # dot segments, plain or %-encoded in either case, and backslashes
    "/public/../private": (SAME, 403, 403, 403),
    "/public/%2e%2e/private": (SAME, 403, 403, 403),
    "/public/%2E%2E/private": (SAME, 403, 403, 403),
    "/public/./../private/x": (SAME, 403, 403, 403),
    "/public\\..\\private": (SAME, 403, 403, 403),
    "/%70rivate": (SAME, 403, 403, 403),
    "/public/a/../../../x": (SAME, "/x", "/x", "/x"),
    # repeated slashes: merged from MERGE_SLASHES on
    "//private": (SAME, SAME, 403, 403),
    "/public/..//private": (SAME, "//private", 403, 403),
    # %-encoded slashes and backslashes: decoded by DECODE_AND_MERGE_SLASHES only
    "/%2Fprivate": (SAME, SAME, SAME, 403),
    "/%2fprivate": (SAME, SAME, SAME, 403),
    "/public%2F..%2Fprivate": (SAME, SAME, SAME, 403),
    "/public%5C..%5Cprivate": (SAME, SAME, SAME, 403),
    "/public%5c%2e%2e%5cprivate": (SAME, "/public%5c..%5cprivate", "/public%5c..%5cprivate", 403),
    # case: paths match case-sensitively in Istio; the app gets the case it was sent
    "/PRIVATE": (SAME, SAME, SAME, SAME),
    "/Private/x": (SAME, SAME, SAME, SAME),
    # an encoded NUL: always refused, as in Istio
    "/private%00": (400, 400, 400, 400),
    "/public/x%00.html": (400, 400, 400, 400),
}


@pytest.fixture(scope="module")
def app(backend_factory):
    return backend_factory("app")


@pytest.fixture(scope="module")
def public_app(backend_factory):
    return backend_factory("public-app")


@pytest.fixture(scope="module")
def sidecars(app, public_app, proxy_factory, tmp_path_factory):
    config = write_config(
        tmp_path_factory.mktemp("paths-config"),
        authorization_policy("deny-private", "default", selector={"app": "deny"}, action="DENY",
                             rules=[{"to": [{"operation": {"paths": ["/private", "/private/*"]}}]}]),
        authorization_policy("allow-public", "default", selector={"app": "allow"},
                             rules=[{"to": [{"operation": {"paths": ["/public*"]}}]}]),
    )
    by_mode = {mode: proxy_factory(config, f"deny-{mode.lower().replace('_', '-')}", app_port=app.port,
                                   labels={"app": "deny"}, extra_args=["--path-normalization", mode])
               for mode in MODES}
    allow = proxy_factory(config, "allow-public", app_port=public_app.port, labels={"app": "allow"})
    return by_mode, allow


def send(proxy, path: str):
    """One GET of ``path`` exactly as given, on a new connection to the inbound listener; the response."""
    with RawConnection("127.0.0.1", proxy.inbound_port) as conn:
        conn.send(b"GET %s HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n" % path.encode("latin-1"))
        return conn.read_response()


def received_path(response):
    """The request target the demo app saw, or None if the proxy answered by itself."""
    if "x-demo-service" not in response.headers:
        return None
    return json.loads(response.body)["path"]


def app_log_targets(app) -> list:
    """The request targets the demo app logged (``NAME GET /x -> 200``), readiness checks left out."""
    text = app.log_path.read_text(errors="replace")
    targets = re.findall(rf"^{re.escape(app.name)} GET (\S+) -> \d+$", text, re.MULTILINE)
    return [target for target in targets if target != "/"]


def test_each_mode_sends_the_app_the_path_its_policy_checked(app, sidecars):
    by_mode, _ = sidecars
    reached = []
    failures = []
    for path, outcomes in CASES.items():
        for mode, expected in zip(MODES, outcomes):
            response = send(by_mode[mode], path)
            got = received_path(response)
            if isinstance(expected, int):
                ok = response.status == expected and got is None
                seen = f"{response.status} from the proxy" if got is None else f"the app got {got!r}"
            else:
                want = path if expected is SAME else expected
                ok = response.status == 200 and got == want
                seen = f"{response.status}, the app got {got!r}"
                reached.append(want)
            if not ok:
                failures.append(f"{mode:>24} {path!r}: expected {expected!r}, {seen} ({response.body[:160]!r})")
    assert not failures, "\n".join(failures)
    # the requests refused above never reached the app: its log holds exactly the ones expected
    wait_for(lambda: len(app_log_targets(app)) >= len(reached), 10, what="the app to log every request it got")
    assert sorted(app_log_targets(app)) == sorted(reached)


def test_dot_dot_semicolon_does_not_pass_allow_public(public_app, sidecars):
    """Issue #10, item 4: ``/public/..;/private`` matched ALLOW ``/public*`` and reached the app, which, as
    Tomcat does, may serve ``/private`` for it.  Refused with 400 now, naming the segment."""
    _, allow = sidecars
    assert received_path(send(allow, "/public/ok")) == "/public/ok"
    for path in ("/public/..;/private", "/public/..;jsessionid=1/private", "/public/%2E%2E;/private"):
        response = send(allow, path)
        assert response.status == 400 and received_path(response) is None, (path, response)
        assert b"dot segment with parameters" in response.body, response.body
    assert send(allow, "/private").status == 403
    wait_for(lambda: app_log_targets(public_app), 10, what="the app to log /public/ok")
    assert app_log_targets(public_app) == ["/public/ok"]


def test_config_dump_shows_the_normalization(sidecars):
    by_mode, allow = sidecars
    assert allow.admin("/config_dump")["path_normalization"] == "BASE"
    assert by_mode["NONE"].admin("/config_dump")["path_normalization"] == "NONE"
