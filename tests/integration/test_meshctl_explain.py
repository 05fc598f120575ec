"""meshctl describe and why against a real control plane and real sidecars.

The mesh is :func:`tests.integration.test_meshctl_observe_support.observed_mesh`: reviews-v1/v2
behind STRICT mTLS with a DENY policy on /admin/*, a 90/10 route, and a dead ``ghost`` service.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.harness import free_port, venv_bin
from tests.integration.test_meshctl_observe_support import access_log_lines, meshctl, observed_mesh


@pytest.fixture(scope="module")
def mesh(control_factory, backend_factory, process_log_dir, tmp_path_factory):
    mesh, stop = observed_mesh(control_factory, backend_factory, process_log_dir, tmp_path_factory.mktemp("mesh"))
    yield mesh
    stop()


# -- meshctl describe ---------------------------------------------------------------------------

def test_describe_pod_says_what_applies_and_why(mesh):
    code, out, err = meshctl("describe", "pod", "reviews-v1", "--control-admin", mesh["control_admin"])
    assert code == 0, err
    config = mesh["config"] / "mesh.yaml"
    assert out.startswith("Pod reviews-v1 (namespace default, node reviews-v1.default~")
    assert "  identity: spiffe://cluster.local/ns/default/sa/reviews" in out
    assert (f"  reviews.default.svc.cluster.local: ServiceEntry default/reviews ({config}:1): workloadSelector "
            "app=reviews matches its labels") in out
    assert "    port 80 subset v1: member (subset labels version=v1, DestinationRule default/reviews)" in out
    assert "    port 80 subset v2: not a member (subset labels version=v2, DestinationRule default/reviews)" in out
    assert ("  VirtualService/default/reviews/http[1] (match *): 90% to subset v1 (this workload); "
            "10% to subset v2 (not this workload)") in out
    assert "VirtualService/default/reviews/http[0] (match uri prefix '/v2/'): 100% to subset v2 (not this" in out
    assert "Inbound mTLS (PeerAuthentication): STRICT from namespace level default/strict" in out
    assert "  DENY  default/deny-admin: selector app=reviews matches; rules: to paths: /admin/*" in out
    assert ("  not applied: AuthorizationPolicy default/ratings-only: its selector app=ratings does not match "
            "the labels") in out


def test_describe_a_client_only_pod(mesh):
    code, out, err = meshctl("describe", "pod", "default/productpage", "--control-admin", mesh["control_admin"])
    assert code == 0, err
    assert "Services: none: it has no inbound listener (mesh-proxy without --app-port)" in out
    assert "AuthorizationPolicies: none applies: every request is allowed" in out
    assert "matches no selector of namespace default's policies" in out  # the compiler's warning, with FILE:LINE


def test_describe_service_lists_endpoints_subsets_routes_and_policies(mesh):
    code, out, err = meshctl("describe", "service", "reviews", "--control-admin", mesh["control_admin"])
    assert code == 0, err
    ports = {name: mesh[name].inbound_port for name in ("reviews-v1", "reviews-v2")}
    assert out.startswith("Service reviews.default.svc.cluster.local\n  defined by ServiceEntry default/reviews")
    assert f"  port 80: 127.0.0.1:{ports['reviews-v1']} (sidecar reviews-v1, mTLS)" in out
    assert f"  port 80: 127.0.0.1:{ports['reviews-v2']} (sidecar reviews-v2, mTLS)" in out
    assert (f"  v2 (port 80, version=v2, DestinationRule default/reviews): 127.0.0.1:{ports['reviews-v2']} "
            "(sidecar reviews-v2, mTLS)") in out
    assert "  VirtualService/default/reviews/http[1] (match *): 90% to subset v1; 10% to subset v2" in out
    assert ("  app=reviews, security.istio.io/tlsMode=istio, version=v1: mTLS STRICT; AuthorizationPolicies: "
            "DENY default/deny-admin") in out


def test_describe_from_files_without_a_control_plane(mesh):
    code, out, err = meshctl("describe", "pod", "reviews-canary", "--label", "app=reviews", "--label", "version=v2",
                             "-f", mesh["config"], "--control-admin", f"127.0.0.1:{free_port()}")
    assert code == 0, err
    assert "    port 80 subset v2: member (subset labels version=v2" in out
    assert "http[0] (match uri prefix '/v2/'): 100% to subset v2 (this workload)" in out
    code, out, err = meshctl("describe", "service", "reviews.default.svc.cluster.local", "-f", mesh["config"])
    assert code == 0 and "Endpoints:\n  port 80: none (no endpoint, no selected WorkloadEntry" in out, err


def test_describe_errors_say_what_to_do(mesh):
    code, out, err = meshctl("describe", "pod", "ratings", "--control-admin", mesh["control_admin"])
    assert code == 1 and out == "" and "no proxy named 'ratings' is known to the control plane" in err
    code, out, err = meshctl("describe", "service", "ratings", "--control-admin", mesh["control_admin"])
    assert code == 1 and "no service 'ratings' is visible to namespace default (known: " in err
    assert "ghost.default.svc.cluster.local" in err and "give -n NAMESPACE or the full host name" in err
    code, _, err = meshctl("describe", "pod", "x", "--label", "app", "-f", mesh["config"])
    assert code == 1 and "--label 'app': give KEY=VALUE" in err
    code, _, err = meshctl("describe", "service", "reviews", "-f", "/nonexistent/mesh")
    assert code == 1 and "/nonexistent/mesh: no such file or directory" in err
    port = free_port()
    code, _, err = meshctl("describe", "service", "reviews", "--control-admin", f"127.0.0.1:{port}")
    assert code == 1 and f"cannot reach the control plane's admin port at http://127.0.0.1:{port}/resources" in err


def test_control_plane_resources_page(mesh):
    listed = mesh["control"].admin("/resources")["resources"]
    kinds = sorted(item["document"]["kind"] for item in listed)
    assert kinds.count("AuthorizationPolicy") == 2 and "VirtualService" in kinds
    assert all(item["source"].startswith(str(mesh["config"] / "mesh.yaml") + ":") for item in listed)


# -- meshctl why --------------------------------------------------------------------------------

def why(*args, stdin=None):
    code, out, err = meshctl("why", *args, stdin=stdin)
    assert code == 0, err
    return out


def test_why_a_connect_failure(mesh):
    client = mesh["productpage"]
    assert client.curl("ghost", "/why-uf").status == 503
    [entry] = access_log_lines(mesh["logs"] / "productpage.log", "/why-uf")
    out = why("productpage", "--control-admin", mesh["control_admin"], "--log-line", json.dumps(entry))
    assert f"request:  GET ghost/why-uf (outbound, x-request-id {entry['request_id']})" in out
    assert "verdict:  the proxy ended it" in out
    # Istio's default retry policy: connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes
    assert ("route:    ServiceEntry/default/ghost (match *; no timeout; retries 2x on "
            "cancelled,connect-failure,refused-stream,retriable-status-codes,unavailable)") in out
    assert "cluster:  outbound|80||ghost.default.svc.cluster.local (127.0.0.1:" in out
    assert f"endpoint: {entry['upstream_host']}" in out
    for flag in entry["response_flags"].split(","):
        assert f"flag {flag} (" in out
    assert "flag UF (UpstreamConnectionFailure): the connection to the endpoint failed" in out
    assert "    what to do: is the endpoint's app (or its sidecar's inbound port) listening?" in out


def test_why_a_denied_request_from_both_sides(mesh):
    client = mesh["productpage"]
    assert client.curl("reviews", "/v2/admin/why").status == 403
    [inbound] = access_log_lines(mesh["logs"] / "reviews-v2.log", "/admin/why")
    [outbound] = access_log_lines(mesh["logs"] / "productpage.log", "/v2/admin/why")
    out = why("reviews-v2", "--control-admin", mesh["control_admin"],
              stdin=json.dumps(outbound) + "\n\n" + json.dumps(inbound) + "\n")
    client_side, server_side = out.split("\n\n")
    assert "verdict:  the upstream answered 403 (no response flags here). If it has a sidecar" in client_side
    assert "same x-request-id" in client_side
    assert "(inbound, x-request-id" in server_side and "verdict:  the proxy ended it (RBAC)" in server_side
    assert "policy:   AuthorizationPolicy default/deny-admin (DENY; rules: to paths: /admin/*)" in server_side
    assert "flag RBAC (AuthorizationDenied): an AuthorizationPolicy denied the request" in server_side


def test_why_no_route(mesh):
    client = mesh["productpage"]
    assert client.curl("nowhere", "/why-nr").status == 404
    [entry] = access_log_lines(mesh["logs"] / "productpage.log", "/why-nr")
    out = why("--log-line", json.dumps(entry))
    assert "route:    (none matched)" in out and "flag NR (NoRouteFound)" in out
    assert "meshctl proxy-config routes NAME shows the hosts this sidecar knows" in out


def test_why_flags_alone_and_bad_input(mesh):
    out = why("--flags", "UT,URX")
    assert out.startswith("flags UT,URX\nverdict:  the proxy ended it (UT, URX)")
    assert "flag UT (UpstreamRequestTimeout)" in out and "Raise the VirtualService http timeout" in out
    assert "flag ZZ (unknown)" in why("--flags", "ZZ")
    assert "verdict:  no failure: 200 without response flags" in why(
        "--log-line", json.dumps({"method": "GET", "path": "/", "response_code": 200, "response_flags": "-"}))
    code, out, err = meshctl("why", "--log-line", "GET / 503")
    assert code == 1 and out == "" and "line 1 is not a JSON access-log line" in err
    code, out, err = meshctl("why", stdin="")
    assert code == 1 and "no access-log line given (stdin was empty)" in err


def test_a_reader_that_leaves_gets_no_traceback():
    """meshctl why --flags UF | (a reader that closed its end at once), as with | head."""
    proc = subprocess.Popen([venv_bin("meshctl"), "why", "--flags", "UF"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    proc.stdout.close()
    assert proc.wait(timeout=30) == 1
    assert proc.stderr.read() == b""
