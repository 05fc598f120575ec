"""What a denied caller learns, and what the operator does: flags for callers, details for the access log.

Issue #10, item 9: a denied caller got ``x-mesh-flags: RBAC:shop/deny-batch``, the name of the policy
that stopped it.  As with Envoy, the caller now gets the flag ``RBAC`` and the body ``RBAC: access
denied`` only; the access log keeps the policy, as ``authz_policy`` and as Envoy's response code details
(``rbac_access_denied_matched_policy[shop/deny-batch]``, ``[none]`` when no ALLOW policy matched), and
the ``response_flags`` metric label is just ``RBAC``.

Two sidecars in front of one demo app, in namespace ``shop``: ``batch`` has a DENY policy on
``/batch*``, ``locked`` an ALLOW policy for ``/ok`` only.  Requests are sent byte for byte to their
inbound listeners (plaintext: PERMISSIVE by default).
"""

from __future__ import annotations

import uuid

import pytest

from tests.harness import RawConnection, wait_for
from tests.integration.test_identity_support import authorization_policy
from tests.integration.test_proxy_support import write_config
from tests.integration.test_telemetry_support import access_log, scrape

NS = "shop"


@pytest.fixture(scope="module")
def app(backend_factory):
    return backend_factory("shop-app")


@pytest.fixture(scope="module")
def sidecars(app, proxy_factory, tmp_path_factory):
    config = write_config(
        tmp_path_factory.mktemp("details-config"),
        authorization_policy("deny-batch", NS, selector={"app": "batch"}, action="DENY",
                             rules=[{"to": [{"operation": {"paths": ["/batch*"]}}]}]),
        authorization_policy("only-ok", NS, selector={"app": "locked"},
                             rules=[{"to": [{"operation": {"paths": ["/ok"]}}]}]),
    )
    logs = tmp_path_factory.mktemp("details-logs")
    return {name: proxy_factory(config, name, namespace=NS, app_port=app.port, labels={"app": name},
                                extra_args=["--access-log", logs / f"{name}.log"])
            for name in ("batch", "locked")}, logs


def send(port: int, path: str, request_id: str, host: str = "shop-app"):
    """One GET on a new connection; the raw response."""
    with RawConnection("127.0.0.1", port) as conn:
        conn.send(b"GET %s HTTP/1.1\r\nHost: %s\r\nx-request-id: %s\r\nConnection: close\r\n\r\n"
                  % (path.encode(), host.encode(), request_id.encode()))
        return conn.read_response()


def logged(logs, name: str, request_id: str) -> dict:
    """The access-log entry of ``request_id`` in sidecar ``name``'s log, once it is written (1 s batches)."""
    path = logs / f"{name}.log"

    def entry():
        return next((line for line in access_log(path) if line["request_id"] == request_id), None)

    return wait_for(entry, 10, what=f"the access-log line of {request_id} in {path}")


def assert_told_nothing_more(response, *secrets):
    """The caller got 403, flag RBAC and Envoy's body, and none of ``secrets`` anywhere."""
    assert (response.status, response.headers.get("x-mesh-flags"), response.body) == \
        (403, "RBAC", b"RBAC: access denied\n"), response
    assert "x-demo-service" not in response.headers, "the app answered: the request reached it"
    everything = repr(response.headers).encode() + response.body
    for secret in secrets:
        assert secret.encode() not in everything, (secret, response)


def test_a_deny_policy_is_named_in_the_access_log_only(app, sidecars):
    proxies, logs = sidecars
    request_id = str(uuid.uuid4())
    response = send(proxies["batch"].inbound_port, "/batch/run", request_id)
    assert_told_nothing_more(response, "deny-batch", NS + "/")
    entry = logged(logs, "batch", request_id)
    assert (entry["response_code"], entry["response_flags"], entry["authz_policy"],
            entry["response_code_details"]) == \
        (403, "RBAC", "shop/deny-batch", "rbac_access_denied_matched_policy[shop/deny-batch]")
    assert "/batch/run" not in app.log_path.read_text()


def test_no_matching_allow_policy_is_none_in_the_details(sidecars):
    proxies, logs = sidecars
    request_id = str(uuid.uuid4())
    assert_told_nothing_more(send(proxies["locked"].inbound_port, "/other", request_id),
                             "only-ok", "allow-nothing")
    entry = logged(logs, "locked", request_id)
    assert (entry["response_flags"], entry["response_code_details"]) == \
        ("RBAC", "rbac_access_denied_matched_policy[none]")


def test_served_and_unrouted_requests_have_envoys_details(sidecars):
    proxies, logs = sidecars
    served, unrouted = str(uuid.uuid4()), str(uuid.uuid4())
    assert send(proxies["locked"].inbound_port, "/ok", served).status == 200
    response = send(proxies["locked"].outbound_port, "/", unrouted, host="nowhere.example")
    assert (response.status, response.headers.get("x-mesh-flags")) == (404, "NR")
    assert logged(logs, "locked", served)["response_code_details"] == "via_upstream"
    assert logged(logs, "locked", unrouted)["response_code_details"] == "route_not_found"


def test_the_metric_label_is_the_flag(sidecars):
    proxies, _ = sidecars
    send(proxies["batch"].inbound_port, "/batch/again", str(uuid.uuid4()))
    text = scrape(proxies["batch"].metrics_port, "/stats/prometheus").decode()
    denied = [line for line in text.splitlines() if line.startswith("istio_requests_total{")
              and 'response_code="403"' in line]
    assert denied and all('response_flags="RBAC"' in line for line in denied), denied
    assert "RBAC:" not in text
