"""End-user authentication (RequestAuthentication, JWT) through a real sidecar, a real app and a real
key-set server (tests/apps/jwks_server.py, which counts its fetches).

One sidecar (standalone, plaintext inbound) in front of the demo app, which echoes the headers it gets.
Its RequestAuthentication has four rules: the main issuer (keys fetched from ``main.json``; audience
``shop``; payload and ``org.team`` written to headers), a rotating issuer (``rotate.json``), an issuer
whose key-set server is down when the sidecar starts (``late.json``, on a port nothing listens on yet),
and inline keys read from ``x-inline-token`` (forwarded).  Its ALLOW AuthorizationPolicy lets anyone
reach ``/public``, callers with a request principal ``/private``, alice ``/alice``, the ``admins``
group ``/admin``, and tokens with the ``read`` scope ``/scope``: Istio's split of the job, where a missing
token is authorization's business.
"""

from __future__ import annotations

import base64
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.harness import curl, free_port, wait_for
from tests.harness.jwks import ISSUER, JwksServer, key_set, public_jwk, sign
from tests.harness.plugin import ProcessFactory
from tests.integration.test_identity_support import authorization_policy
from tests.integration.test_proxy_support import write_config

NS = "shop"
SELECTOR = {"app": "api"}
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ROTATED = rsa.generate_private_key(public_exponent=65537, key_size=2048)
INLINE = ec.generate_private_key(ec.SECP256R1())
ROTATING, LATE, INLINE_ISSUER = "https://rotating.example", "https://late.example", "inline-issuer"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, backend_factory, proxy_factory, process_log_dir):
    work = tmp_path_factory.mktemp("request-authn")
    servers = ProcessFactory(JwksServer, process_log_dir)
    keys = servers(work / "keys")
    keys.publish("main", public_jwk(KEY, "k1"))
    keys.publish("rotate", public_jwk(KEY, "k1"))
    late_port = free_port()
    authn = {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
             "metadata": {"name": "jwt", "namespace": NS},
             "spec": {"selector": {"matchLabels": SELECTOR}, "jwtRules": [
                 {"issuer": ISSUER, "jwksUri": keys.url("main"), "audiences": ["shop"],
                  "outputPayloadToHeader": "x-jwt-payload",
                  "outputClaimToHeaders": [{"header": "x-team", "claim": "org.team"}]},
                 {"issuer": ROTATING, "jwksUri": keys.url("rotate")},
                 {"issuer": LATE, "jwksUri": f"http://127.0.0.1:{late_port}/late.json", "timeout": "1s"},
                 {"issuer": INLINE_ISSUER, "jwks": key_set(public_jwk(INLINE, "i1")),
                  "fromHeaders": [{"name": "x-inline-token"}], "forwardOriginalToken": True}]}}
    allow = authorization_policy("api", NS, selector=SELECTOR, rules=[
        {"to": [{"operation": {"paths": ["/public*"]}}]},
        {"from": [{"source": {"requestPrincipals": ["*"]}}], "to": [{"operation": {"paths": ["/private*"]}}]},
        {"from": [{"source": {"requestPrincipals": [f"{ISSUER}/alice"]}}],
         "to": [{"operation": {"paths": ["/alice*"]}}]},
        {"to": [{"operation": {"paths": ["/admin*"]}}],
         "when": [{"key": "request.auth.claims[groups]", "values": ["admins"]}]},
        {"to": [{"operation": {"paths": ["/scope*"]}}],
         "when": [{"key": "request.auth.claims[scope]", "values": ["read"]}]},
    ])
    app = backend_factory("api")
    proxy = proxy_factory(write_config(work / "config", authn, allow), "api", namespace=NS, app_port=app.port,
                          labels=SELECTOR)
    yield {"proxy": proxy, "keys": keys, "late_port": late_port, "work": work, "servers": servers}
    servers.stop_all()


def call(mesh, path: str, token: str | None = None, header: str = "authorization", prefix: str = "Bearer "):
    headers = {header: prefix + token} if token else {}
    return curl(f"{mesh['proxy'].inbound_url}{path}", headers=headers)


def test_without_a_token_only_authorization_decides(mesh):
    assert call(mesh, "/public").status == 200  # RequestAuthentication alone lets it through
    denied = call(mesh, "/private")
    assert denied.status == 403 and denied.body.strip() == b"RBAC: access denied"


def test_a_valid_token_reaches_the_app_with_its_payload_and_without_the_token(mesh):
    token = sign(KEY, org={"team": "payments"})
    result = call(mesh, "/private/orders", token)
    assert result.status == 200, result
    received = result.json()["headers"]
    assert "authorization" not in received  # forwardOriginalToken defaults to false
    payload = received["x-jwt-payload"]
    assert payload == token.split(".")[1]  # base64url, as Envoy forwards it
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert (claims["iss"], claims["sub"]) == (ISSUER, "alice")
    assert received["x-team"] == "payments"


def test_the_request_principal_and_claims_reach_authorization(mesh):
    assert call(mesh, "/alice", sign(KEY)).status == 200
    assert call(mesh, "/alice", sign(KEY, sub="bob")).status == 403
    assert call(mesh, "/admin", sign(KEY, groups=["dev", "admins"])).status == 200
    assert call(mesh, "/admin", sign(KEY, groups=["dev"])).status == 403


def test_a_forged_payload_header_never_reaches_the_app(mesh):
    result = curl(f"{mesh['proxy'].inbound_url}/public", headers={"x-jwt-payload": "eyJzdWIiOiJhZG1pbiJ9"})
    assert result.status == 200 and "x-jwt-payload" not in result.json()["headers"]


@pytest.mark.parametrize("case, token, status, body", [
    ("expired", lambda: sign(KEY, exp=int(time.time()) - 120), 401, "Jwt is expired"),
    ("wrong issuer", lambda: sign(KEY, iss="https://evil.example"), 401, "Jwt issuer is not configured"),
    ("wrong audience", lambda: sign(KEY, aud="other"), 403, "Audiences in Jwt are not allowed"),  # Envoy's 403
    ("bad signature", lambda: sign(ROTATED), 401, "Jwt verification fails"),
])
def test_an_invalid_token_gets_envoys_reply_with_www_authenticate(mesh, case, token, status, body):
    result = call(mesh, "/public/x", token())  # a public path: the refusal comes before authorization
    assert result.status == status, result
    assert result.body.strip() == body.encode()
    realm = f'Bearer realm="http://127.0.0.1:{mesh["proxy"].inbound_port}/public/x", error="invalid_token"'
    assert result.headers["www-authenticate"] == realm
    assert "x-demo-service" not in result.headers  # the app never saw it


def test_scope_is_a_space_delimited_list_for_authorization(mesh):
    """Istio has Envoy split ``scope`` on spaces: ``when: claims[scope] in [read]`` matches "read write"."""
    granted = call(mesh, "/scope", sign(KEY, scope="read write"))
    assert granted.status == 200, granted
    assert call(mesh, "/scope", sign(KEY, scope="write admin")).status == 403
    assert call(mesh, "/scope", sign(KEY, scope="readwrite")).status == 403


def test_a_verified_token_in_the_query_is_removed_before_the_app(mesh):
    token = sign(KEY)
    result = call(mesh, f"/private/q?a=1&access_token={token}&b=%2Fx&c")
    assert result.status == 200, result
    assert result.json()["path"] == "/private/q?a=1&b=%2Fx&c"  # forwardOriginalToken: false; the rest as sent
    alone = call(mesh, f"/private/q?access_token={token}")
    assert alone.status == 200 and alone.json()["path"] == "/private/q"


def test_a_cors_preflight_passes_the_jwt_stage_whatever_its_token(mesh):
    preflight = {"authorization": "Bearer bad.token.here", "origin": "http://app.example",
                 "access-control-request-method": "GET"}
    result = curl(f"{mesh['proxy'].inbound_url}/public/x", method="OPTIONS", headers=preflight)
    assert result.status == 200, result  # authorization still decides: /public is open
    assert result.json()["method"] == "OPTIONS"
    assert curl(f"{mesh['proxy'].inbound_url}/private", method="OPTIONS", headers=preflight).status == 403
    not_preflight = {name: value for name, value in preflight.items() if name != "origin"}
    assert curl(f"{mesh['proxy'].inbound_url}/public/x", method="OPTIONS", headers=not_preflight).status == 401


def test_a_grpc_call_with_an_invalid_token_gets_unauthenticated_with_www_authenticate(mesh):
    """As with Envoy's jwt_authn, a gRPC call gets the 401 as UNAUTHENTICATED (HTTP 200, Trailers-Only)
    that keeps its ``www-authenticate``."""
    token = sign(KEY, exp=int(time.time()) - 120)
    result = curl(f"{mesh['proxy'].inbound_url}/public/x", method="POST", data=b"\0\0\0\0\0",
                  headers={"authorization": f"Bearer {token}", "content-type": "application/grpc", "te": "trailers"},
                  extra_args=["--http2-prior-knowledge"])
    assert result.status == 200, result
    assert (result.headers["grpc-status"], result.headers["grpc-message"]) == ("16", "Jwt is expired"), result
    realm = f'Bearer realm="http://127.0.0.1:{mesh["proxy"].inbound_port}/public/x", error="invalid_token"'
    assert result.headers["www-authenticate"] == realm


def test_key_sets_are_cached_and_an_unknown_kid_refetches_at_most_once_per_interval(mesh):
    keys = mesh["keys"]
    before = keys.fetches("main")
    for _ in range(3):
        assert call(mesh, "/private", sign(KEY)).status == 200
    assert keys.fetches("main") == before  # verified with the cached keys
    first = call(mesh, "/public", sign(KEY, kid="nope"))
    second = call(mesh, "/public", sign(KEY, kid="still-nope"))
    assert (first.status, second.status) == (401, 401)
    assert first.body.strip() == b"Jwks doesn't have key to match kid or alg from Jwt"
    assert keys.fetches("main") == before + 1  # the second miss came within the rate limit


def test_a_rotated_key_is_picked_up_by_its_new_kid(mesh):
    keys = mesh["keys"]
    assert call(mesh, "/private", sign(KEY, iss=ROTATING)).status == 200
    keys.publish("rotate", public_jwk(KEY, "k1"), public_jwk(ROTATED, "k2"))
    fetched = keys.fetches("rotate")
    result = call(mesh, "/private", sign(ROTATED, kid="k2", iss=ROTATING))
    assert result.status == 200, result  # the unknown kid fetched the set again; the request waited for it
    assert keys.fetches("rotate") == fetched + 1


def test_inline_keys_and_a_forwarded_token_in_a_custom_header(mesh):
    token = sign(INLINE, kid="i1", alg="ES256", iss=INLINE_ISSUER)
    result = call(mesh, "/private", token, header="x-inline-token", prefix="")
    assert result.status == 200, result
    assert result.json()["headers"]["x-inline-token"] == token  # forwardOriginalToken: true


def test_a_key_set_server_down_at_start_rejects_its_tokens_then_recovers(mesh):
    proxy = mesh["proxy"]
    token = sign(KEY, iss=LATE)
    rejected = call(mesh, "/private", token)
    assert rejected.status == 401 and rejected.body.strip() == b"Jwks remote fetch is failed"
    logged = proxy.log_path.read_text()
    assert f"cannot fetch JWKS http://127.0.0.1:{mesh['late_port']}/late.json" in logged
    assert f"requests with a token of {LATE} get 401" in logged
    late = mesh["servers"](mesh["work"] / "late-keys", port=mesh["late_port"])
    late.publish("late", public_jwk(KEY, "k1"))
    wait_for(lambda: call(mesh, "/private", token).status == 200, 10.0, what="the late key set to be fetched")
    jwks = {entry["jwks_uri"]: entry for entry in proxy.admin("/config_dump")["jwks"]}
    assert jwks[late.url("late")]["keys"] == ["k1"] and jwks[late.url("late")]["last_error"] is None
