"""RequestAuthentication: validation (every rejection naming its line and field), merging, the
AuthorizationPolicy request-principal fields, and token verification with inline keys (no fetch)."""

from __future__ import annotations

import json
import textwrap
import time
from types import SimpleNamespace

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm
from twisted.internet.task import Clock

from mesh.config.authz_predicates import compile_rule
from mesh.config.compile import Workload, compile_proxy_config
from mesh.config.loader import load_documents
from mesh.config.request_authn import JwtRule, RequestAuthentication, parse_jwks
from mesh.config.security_compile import compile_tcp_authz
from mesh.config.validate import validate
from mesh.proxy.authn import TOKEN_CACHE_SIZE, Authenticator, RequestAuth
from mesh.proxy.context import RequestContext
from mesh.proxy.outcome import LocalReply
from tests.harness.config_yaml import validate_yaml
from tests.harness.jwks import key_set, public_jwk, sign

_HEAD = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: ra, namespace: shop}\n"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


JWKS = key_set(public_jwk(RSA_KEY, "k1"), public_jwk(EC_KEY, "e1"))


def token(key=RSA_KEY, **claims) -> str:
    return sign(key, **claims)


def _validate(tmp_path, spec):
    objects, errors, path = validate_yaml(tmp_path, _HEAD + textwrap.dedent(spec).lstrip("\n"), name="ra.yaml")
    return objects, [str(error) for error in errors], path


def _errors(tmp_path, spec, expected):
    """Assert the errors of ``spec``, given as ``(line, "field: reason")`` pairs."""
    _, errors, path = _validate(tmp_path, spec)
    assert errors == [f"{path}:{line}: RequestAuthentication/shop/ra: {text}" for line, text in expected]


# -- validation ---------------------------------------------------------------------------------

def test_every_field(tmp_path):
    objects, errors, _ = _validate(tmp_path, f"""
        spec:
          selector: {{matchLabels: {{app: api}}}}
          jwtRules:
          - issuer: https://issuer.example
            audiences: [shop, shop]
            jwksUri: https://issuer.example/.well-known/jwks.json
            fromHeaders: [{{name: X-Jwt, prefix: "Token "}}, {{name: x-other}}]
            fromParams: [jwt]
            fromCookies: [session]
            outputPayloadToHeader: X-Jwt-Payload
            outputClaimToHeaders: [{{header: x-group, claim: org.group}}]
            forwardOriginalToken: true
            timeout: 2s
            spaceDelimitedClaims: [roles, roles]
          - issuer: other
            jwks: '{JWKS}'
        """)
    assert errors == []
    [policy] = objects
    assert policy == RequestAuthentication("ra", "shop", (("app", "api"),), (
        JwtRule(issuer="https://issuer.example", audiences=("shop",),
                jwks_uri="https://issuer.example/.well-known/jwks.json",
                from_headers=(("x-jwt", "Token "), ("x-other", "")), from_params=("jwt",), from_cookies=("session",),
                output_payload_to_header="x-jwt-payload", output_claim_to_headers=(("x-group", ("org", "group")),),
                forward_original_token=True, timeout=2.0, space_delimited_claims=("roles",)),
        JwtRule(issuer="other", jwks=JWKS)), source=None)


def test_rejections_name_their_line_and_field(tmp_path):
    oct_key = json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]})
    private = json.dumps({"keys": [json.loads(RSAAlgorithm.to_jwk(RSA_KEY))]})
    _errors(tmp_path, f"""
        spec:
          targetRef: {{kind: Gateway, name: gw}}
          jwtRules:
          - audiences: [a]
            jwks: '{JWKS}'
          - issuer: no-keys
          - issuer: both
            jwksUri: https://a.example/jwks
            jwks: '{JWKS}'
          - issuer: bad-uri
            jwksUri: ftp://a.example/jwks
          - issuer: bad-json
            jwks: '{{"keys": ['
          - issuer: symmetric
            jwks: '{oct_key}'
          - issuer: private
            jwks: '{private}'
          - issuer: headers
            jwksUri: http://a.example/jwks
            fromHeaders: [{{prefix: "Bearer "}}, {{name: "bad header"}}, {{name: Host}}]
            outputClaimToHeaders: [{{header: x-a, claim: a}}, {{header: x-a, claim: b}}, {{header: x-b, claim: a..b}}]
            timeout: 5
            forward: true
        """, [
        (5, "spec.targetRef: 'targetRef' is not supported by txmesh; policies attached to Gateway API resources "
            "are not supported; use selector"),
        (7, "spec.jwtRules[0].issuer: 'issuer' is required"),
        (9, "spec.jwtRules[1]: set jwksUri (the URL of the issuer's JSON Web Key Set) or jwks (the key set "
            "itself): txmesh does not discover keys from the issuer (OpenID Connect discovery)"),
        (12, "spec.jwtRules[2].jwks: set only one of jwksUri and jwks (Istio ignores jwksUri when both are set); "
             "remove one"),
        (14, "spec.jwtRules[3].jwksUri: invalid jwksUri 'ftp://a.example/jwks': use an http:// or https:// URL "
             "with a host, like https://issuer.example.com/.well-known/jwks.json"),
        (16, "spec.jwtRules[4].jwks: not a JSON Web Key Set: invalid JSON (Expecting value: line 1 column 11 "
             "(char 10))"),
        (18, "spec.jwtRules[5].jwks: keys[0]: symmetric keys (kty oct, HS256/384/512) are not supported: whoever "
             "reads the key can sign tokens; use an asymmetric key (RSA, EC or Ed25519)"),
        (20, "spec.jwtRules[6].jwks: keys[0]: the key has its private part ('d'): publish only the public key, "
             "and replace this one"),
        (23, "spec.jwtRules[7].fromHeaders[0].name: 'name' is required"),
        (23, "spec.jwtRules[7].fromHeaders[1].name: invalid header name 'bad header'"),
        (23, "spec.jwtRules[7].fromHeaders[2].name: 'Host' cannot carry a token or a claim; use another header"),
        (24, "spec.jwtRules[7].outputClaimToHeaders[1].header: header 'x-a' is listed twice; each header takes "
             "one claim"),
        (24, "spec.jwtRules[7].outputClaimToHeaders[2].claim: invalid claim 'a..b': name a claim, or a nested one "
             "as outer.inner"),
        (25, 'spec.jwtRules[7].timeout: invalid duration 5 (a number without a unit); use a number and a unit, '
             'like "1s", "0.5s", "100ms", "1m" or "1h"'),
        (26, "spec.jwtRules[7].forward: unknown field 'forward'; supported: audiences, forwardOriginalToken, "
             "fromCookies, fromHeaders, fromParams, issuer, jwks, jwksUri, outputClaimToHeaders, "
             "outputPayloadToHeader, spaceDelimitedClaims, timeout"),
    ])


# -- merging, and the AuthorizationPolicy side ------------------------------------------------------

def _compiled(*documents, labels=None):
    loaded = load_documents(list(documents), "test")
    assert loaded.errors == []
    objects, errors = validate(loaded.resources)
    assert errors == []
    return compile_proxy_config(objects, Workload("api", "shop", labels=labels or {"app": "api"}, app_port=8080))


def _document(kind, name, namespace, spec):
    return {"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


def test_the_rules_of_every_applicable_policy_are_merged():
    config = _compiled(
        _document("RequestAuthentication", "mesh", "istio-system", {"jwtRules": [{"issuer": "root", "jwks": JWKS}]}),
        _document("RequestAuthentication", "api", "shop", {"selector": {"matchLabels": {"app": "api"}},
                                                            "jwtRules": [{"issuer": "a", "jwksUri": "http://k/a",
                                                                          "fromHeaders": [{"name": "x-jwt"}]}]}),
        _document("RequestAuthentication", "web", "shop", {"selector": {"matchLabels": {"app": "web"}},
                                                            "jwtRules": [{"issuer": "w", "jwks": JWKS}]}),
        _document("RequestAuthentication", "other", "other-ns", {"jwtRules": [{"issuer": "o", "jwks": JWKS}]}))
    table = config.request_authn
    assert [(p.name, p.issuer, p.headers, p.params, p.cookies) for p in table.providers] == [  # sorted by issuer
        ("shop/api[0]", "a", (("x-jwt", ""),), (), ()),
        ("istio-system/mesh[0]", "root", (("authorization", "Bearer "),), ("access_token",), ())]
    assert table.jwks_uris == (("http://k/a", 5.0, ("a",)),)
    assert [rule["name"] for rule in config.dump["request_authn"]] == ["shop/api[0]", "istio-system/mesh[0]"]
    assert _compiled().request_authn is None


def _rule(when=None, source=None):
    spec = {"rules": [{**({"from": [{"source": source}]} if source else {}), **({"when": when} if when else {})}]}
    config = _compiled(_document("AuthorizationPolicy", "ap", "shop", spec))
    [policy] = config.authz.allow
    [rule] = policy.rules
    return rule


def _ctx(claims=None):
    ctx = RequestContext.for_test()
    ctx.request_auth = None if claims is None else RequestAuth(claims)
    return ctx


CLAIMS = {"iss": "https://issuer.example", "sub": "alice", "aud": ["shop", "web"], "azp": "cli",
          "groups": ["dev", "admins"], "org": {"team": "payments", "level": 3}}


@pytest.mark.parametrize("source, when, matches, without_token", [
    ({"requestPrincipals": ["*"]}, None, True, False),
    ({"requestPrincipals": ["https://issuer.example/*"]}, None, True, False),
    ({"requestPrincipals": ["*/bob"]}, None, False, False),
    ({"notRequestPrincipals": ["*"]}, None, False, True),
    (None, [{"key": "request.auth.principal", "values": ["https://issuer.example/alice"]}], True, False),
    (None, [{"key": "request.auth.audiences", "values": ["web"]}], True, False),
    (None, [{"key": "request.auth.audiences", "notValues": ["web"]}], False, True),
    (None, [{"key": "request.auth.presenter", "values": ["cl*"]}], True, False),
    (None, [{"key": "request.auth.claims[groups]", "values": ["admin*"]}], True, False),
    (None, [{"key": "request.auth.claims[org][team]", "values": ["payments"]}], True, False),
    (None, [{"key": "request.auth.claims[org][level]", "values": ["3"]}], False, False),  # not a string
    (None, [{"key": "request.auth.claims[missing][x]", "values": ["*"]}], False, False),
])
def test_request_principal_fields_and_claim_conditions(source, when, matches, without_token):
    rule = _rule(when, source)
    assert rule(_ctx(CLAIMS), None) is matches
    assert rule(_ctx(), None) is without_token


def test_request_principals_are_http_only_for_tcp():
    loaded = load_documents([_document("AuthorizationPolicy", "ap", "shop",
                                       {"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]})], "t")
    objects, _ = validate(loaded.resources)
    policies = compile_tcp_authz(objects, Workload("api", "shop", app_port=8080), "istio-system")
    assert policies.allow[0].rules == ()  # Istio ignores the ALLOW rule for TCP: it never matches
    assert compile_rule(objects[0].rules[0], 8080, False) is not True


# -- verification with inline keys ------------------------------------------------------------------

TABLE_SPEC = {"jwtRules": [
    {"issuer": "https://issuer.example", "jwks": JWKS, "audiences": ["shop"],
     "outputPayloadToHeader": "x-jwt-payload", "outputClaimToHeaders": [{"header": "x-team", "claim": "org.team"}]},
    {"issuer": "cookie-issuer", "jwks": JWKS, "fromCookies": ["session"], "fromParams": ["t"],
     "fromHeaders": [{"name": "x-token", "prefix": "Token "}], "forwardOriginalToken": True},
]}


@pytest.fixture(scope="module")
def table():
    return _compiled(_document("RequestAuthentication", "ra", "shop", TABLE_SPEC)).request_authn


#: A reactor whose clock is the wall clock, as Twisted's (the tokens are signed at the wall time).
WALL_CLOCK = SimpleNamespace(seconds=time.time)


def authenticate(table, headers=None, path="/orders", method="GET"):
    """``(ctx, None)`` after authentication, or ``(ctx, LocalReply)``."""
    ctx = RequestContext.for_test(method=method, path=path, headers=headers, host="api.shop")
    try:
        Authenticator(reactor=WALL_CLOCK, agent=object()).authenticate(ctx, table)
    except LocalReply as reply:
        return ctx, reply
    return ctx, None


@pytest.mark.parametrize("bad, message", [
    (lambda: token(exp=int(time.time()) - 61), "Jwt is expired"),
    (lambda: token(nbf=int(time.time()) + 120), "Jwt not yet valid"),
    (lambda: token(iss="https://other.example"), "Jwt issuer is not configured"),
    (lambda: token(aud="web"), "Audiences in Jwt are not allowed"),
    (lambda: token(kid="unknown"), "Jwks doesn't have key to match kid or alg from Jwt"),
    (lambda: token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)), "Jwt verification fails"),
    (lambda: token(key=EC_KEY, alg="ES256", kid="k1"), "Jwks doesn't have key to match kid or alg from Jwt"),
    (lambda: jwt.encode({"iss": "https://issuer.example", "aud": "shop"}, "k" * 32, "HS256"),
     "Jwks doesn't have key to match kid or alg from Jwt"),
    (lambda: "not-a-jwt", "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"),
    (lambda: "bm90.anNvbg.c2ln", "Jwt verification fails"),
], ids=["expired", "not-yet-valid", "issuer", "audience", "kid", "signature", "alg", "hs256", "format", "json"])
def test_a_token_that_fails_gets_envoys_401(table, bad, message):
    ctx, reply = authenticate(table, {"authorization": f"Bearer {bad()}"})
    status = 403 if message == "Audiences in Jwt are not allowed" else 401  # Envoy's only 403
    assert (reply.status, reply.message, reply.flag) == (status, message, "")
    assert reply.headers == ((b"www-authenticate", b'Bearer realm="http://api.shop/orders", error="invalid_token"'),)
    assert reply.details == "jwt_authn_access_denied{" + message.replace(" ", "_") + "}"
    assert ctx.request_auth is None


def test_a_valid_token_sets_the_principal_and_the_headers(table):
    good = token(org={"team": "payments"}, exp=int(time.time()) - 30)  # expired, within the 60 s clock skew
    ctx, reply = authenticate(table, {"authorization": f"Bearer {good}", "x-jwt-payload": "forged", "x-keep": "1"})
    assert reply is None
    assert (ctx.request_auth.principal, ctx.request_auth.audiences) == ("https://issuer.example/alice", ["shop"])
    assert ctx.headers == {"x-keep": "1", "x-jwt-payload": good.split(".")[1], "x-team": "payments"}
    assert sorted(ctx.raw_headers) == sorted((name.encode(), value.encode()) for name, value in ctx.headers.items())


def test_no_token_passes_without_a_principal_and_forged_outputs_are_removed(table):
    ctx, reply = authenticate(table, {"x-jwt-payload": "forged", "authorization": "Basic dXNlcjpwdw=="})
    assert (reply, ctx.request_auth) == (None, None)
    assert ctx.headers == {"authorization": "Basic dXNlcjpwdw=="}  # not a Bearer token: not a token at all


@pytest.mark.parametrize("headers, path", [
    ({"cookie": "a=1; session=TOKEN"}, "/"),
    ({"cookie": 'session="TOKEN"; session=other'}, "/"),  # Envoy unquotes a cookie and takes the first
    ({}, "/x?t=TOKEN&b=2"),
    ({"x-token": "Token TOKEN"}, "/"),
    ({"x-token": "v=1; Token  TOKEN"}, "/"),  # the prefix anywhere, then from the first JWT character
])
def test_tokens_in_cookies_params_and_custom_headers_are_kept_when_forwarded(table, headers, path):
    good = token(iss="cookie-issuer", aud="anything")
    headers = {name: value.replace("TOKEN", good) for name, value in headers.items()}
    ctx, reply = authenticate(table, headers, path.replace("TOKEN", good))
    assert reply is None and ctx.request_auth.principal == "cookie-issuer/alice"
    assert ctx.headers == headers  # forwardOriginalToken: true


def test_every_token_must_be_valid(table):
    ctx, reply = authenticate(table, {"authorization": f"Bearer {token()}"}, f"/?access_token={token(aud='x')}")
    assert reply.message == "Audiences in Jwt are not allowed"


# -- scope, permission and spaceDelimitedClaims ---------------------------------------------------------

SCOPES_SPEC = {"jwtRules": [
    {"issuer": "https://issuer.example", "jwks": JWKS, "spaceDelimitedClaims": ["roles"],
     "outputClaimToHeaders": [{"header": "x-scope", "claim": "scope"}]},
]}


@pytest.fixture(scope="module")
def scopes_table():
    return _compiled(_document("RequestAuthentication", "ra", "shop", SCOPES_SPEC)).request_authn


def _claim_rule(claim, values):
    return _rule([{"key": f"request.auth.claims[{claim}]", "values": values}])


def test_scope_permission_and_space_delimited_claims_are_lists_of_words(scopes_table):
    """Istio has Envoy split scope, permission and the rule's spaceDelimitedClaims on spaces in the payload
    that authorization reads; the output headers and the principal keep the token's claims."""
    good = token(scope="read  write", permission="orders:get", roles="a b", groups="x y", tab="p\tq", empty=" ")
    ctx, reply = authenticate(scopes_table, {"authorization": f"Bearer {good}"})
    assert reply is None
    claims = ctx.request_auth.claims
    assert (claims["scope"], claims["permission"], claims["roles"]) == (["read", "write"], ["orders:get"], ["a", "b"])
    assert (claims["groups"], claims["tab"], claims["empty"]) == ("x y", "p\tq", " ")  # not listed; spaces only
    assert ctx.headers["x-scope"] == "read  write" and ctx.request_auth.principal == "https://issuer.example/alice"
    assert _claim_rule("scope", ["read"])(ctx, None) is True
    assert _claim_rule("scope", ["wri*"])(ctx, None) is True
    assert _claim_rule("scope", ["read  write"])(ctx, None) is False  # a list now, as in Istio
    assert _claim_rule("roles", ["b"])(ctx, None) is True
    assert _claim_rule("groups", ["x"])(ctx, None) is False


def test_the_default_split_needs_no_space_delimited_claims(table):
    ctx, reply = authenticate(table, {"authorization": f"Bearer {token(scope='read write')}"})
    assert reply is None and ctx.request_auth.claims["scope"] == ["read", "write"]
    assert _claim_rule("scope", ["read"])(ctx, None) is True


# -- audiences as Envoy compares them -------------------------------------------------------------------------

@pytest.mark.parametrize("configured, sent, allowed", [
    ("shop", "https://shop", True),
    ("shop", "http://shop/", True),
    ("shop", "shop/", True),
    ("https://shop.example.com/", "shop.example.com", True),
    ("http://shop.example.com", ["other", "https://shop.example.com/"], True),
    ("shop", "https://shop//", False),  # one slash only
    ("shop", "ftp://shop", False),
    ("shop", "HTTPS://shop", False),  # the scheme as written
    ("shop", "shops", False),
])
def test_audiences_are_compared_without_scheme_and_trailing_slash(configured, sent, allowed):
    spec = {"jwtRules": [{"issuer": "https://issuer.example", "jwks": JWKS, "audiences": [configured]}]}
    table = _compiled(_document("RequestAuthentication", "ra", "shop", spec)).request_authn
    ctx, reply = authenticate(table, {"authorization": f"Bearer {token(aud=sent)}"})
    assert (reply is None) is allowed
    if not allowed:
        assert (reply.status, reply.message) == (403, "Audiences in Jwt are not allowed")


def test_time_limits_are_checked_before_the_audience_and_the_signature(table):
    """Envoy's order: an expired token is "expired" (401) whatever its audience or signature."""
    expired = int(time.time()) - 120
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for bad in (token(aud="web", exp=expired), token(key=other_key, exp=expired)):
        _, reply = authenticate(table, {"authorization": f"Bearer {bad}"})
        assert (reply.status, reply.message) == (401, "Jwt is expired")


# -- a token in the query string ------------------------------------------------------------------------------

@pytest.mark.parametrize("path, forwarded", [
    ("/x?a=1&access_token=TOKEN&b=%2F&c", "/x?a=1&b=%2F&c"),
    ("/x?access_token=TOKEN", "/x"),
    ("/x?z=1&access%5Ftoken=TOKEN&a=2&access_token=TOKEN", "/x?z=1&a=2"),  # every one, its name decoded
])
def test_a_verified_token_in_the_query_is_removed_unless_forwarded(table, path, forwarded):
    good = token()
    ctx, reply = authenticate(table, {"x-keep": "1"}, path.replace("TOKEN", good))
    assert reply is None and ctx.request_auth.principal == "https://issuer.example/alice"
    assert (ctx.path, ctx.uri_path) == (forwarded, "/x")


def test_an_empty_token_parameter_is_a_bad_token(table):
    _, reply = authenticate(table, {}, "/x?access_token=&a=1")
    assert (reply.status, reply.message) == (401, "Jwt is not in the form of Header.Payload.Signature with two dots "
                                                  "and 3 sections")


# -- several rules: Istio's requirement -------------------------------------------------------------------------

MULTI_SPEC = {"jwtRules": [
    {"issuer": "b-other", "jwks": JWKS, "fromHeaders": [{"name": "x-other"}], "outputPayloadToHeader": "x-b"},
    {"issuer": "a-main", "jwks": JWKS, "audiences": ["shop"], "outputPayloadToHeader": "x-a"},
    {"issuer": "c-shared", "jwks": JWKS},
]}


@pytest.fixture(scope="module")
def multi():
    return _compiled(_document("RequestAuthentication", "ra", "shop", MULTI_SPEC)).request_authn


def test_several_rules_are_sorted_by_issuer(multi):
    assert [provider.issuer for provider in multi.providers] == ["a-main", "b-other", "c-shared"]


@pytest.mark.parametrize("case, headers, path, outcome", [
    ("valid A beside garbage in B's header", {"authorization": "Bearer {A}", "x-other": "garbage.not.jwt"}, "/",
     "a-main/alice"),
    ("valid B beside a garbage A token", {"authorization": "Bearer not-a-jwt", "x-other": "{B}"}, "/", "b-other/bob"),
    ("a token of the second rule in a shared place", {"authorization": "Bearer {C}"}, "/", "c-shared/carol"),
    ("garbage in B's header alone", {"x-other": "garbage"}, "/",
     (401, "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")),
    ("an issuer no rule names", {"authorization": "Bearer {NOPE}"}, "/", (401, "Jwt issuer is not configured")),
    ("a real error wins over an unknown issuer", {"authorization": "Bearer {EXPIRED_A}"}, "/",
     (401, "Jwt is expired")),
    ("A's audience", {"authorization": "Bearer {WRONG_AUD_A}"}, "/", (403, "Audiences in Jwt are not allowed")),
    ("two valid tokens of one rule: the first place gives the principal",
     {"authorization": "Bearer {A}"}, "/?access_token={A2}", "a-main/alice"),
    ("two tokens of one rule, one bad", {"authorization": "Bearer {A}"}, "/?access_token={WRONG_AUD_A}",
     (403, "Audiences in Jwt are not allowed")),
    ("no token", {}, "/", None),
])
def test_several_rules_follow_istios_requirement(multi, case, headers, path, outcome):
    tokens = {"A": token(iss="a-main", aud="shop"), "A2": token(iss="a-main", aud="shop", sub="alice2"),
              "B": token(iss="b-other", sub="bob"), "C": token(iss="c-shared", sub="carol"),
              "NOPE": token(iss="nope"), "EXPIRED_A": token(iss="a-main", aud="shop", exp=int(time.time()) - 120),
              "WRONG_AUD_A": token(iss="a-main", aud="web")}

    headers = {name: value.format_map(tokens) for name, value in headers.items()}
    ctx, reply = authenticate(multi, headers, path.format_map(tokens))
    if isinstance(outcome, tuple):
        assert (reply.status, reply.message) == outcome, case
    else:
        assert reply is None, (case, reply)
        assert (ctx.request_auth.principal if ctx.request_auth else None) == outcome, case


def test_the_rule_that_passes_a_request_is_the_only_one_that_changes_it(multi):
    a, b = token(iss="a-main", aud="shop"), token(iss="b-other", sub="bob")
    ctx, reply = authenticate(multi, {"authorization": f"Bearer {a}", "x-other": b})
    assert reply is None and ctx.request_auth.principal == "a-main/alice"
    assert ctx.headers == {"x-a": a.split(".")[1], "x-other": b}  # B was never verified, so never removed


# -- CORS preflight -------------------------------------------------------------------------------------------

def test_a_cors_preflight_passes_whatever_its_token(table):
    preflight = {"authorization": "Bearer bad.token.here", "origin": "http://a.example",
                 "access-control-request-method": "GET", "x-jwt-payload": "forged"}
    ctx, reply = authenticate(table, preflight, method="OPTIONS")
    assert (reply, ctx.request_auth) == (None, None)
    assert "x-jwt-payload" not in ctx.headers and ctx.headers["authorization"] == "Bearer bad.token.here"
    for missing in ("origin", "access-control-request-method"):
        headers = {name: value for name, value in preflight.items() if name != missing}
        assert authenticate(table, headers, method="OPTIONS")[1].status == 401
    assert authenticate(table, preflight, method="GET")[1].status == 401
    assert authenticate(table, {**preflight, "origin": ""}, method="OPTIONS")[1].status == 401


# -- output claim headers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, header", [
    (1.5, "1.500000"), (3, "3"), (3.0, "3"), (0, "0"), (-2, "-2.000000"), (0.1, "0.100000"),
    (12345678901234567891, "12345678901234567168"), (2 ** 64, "18446744073709551616.000000"),
    (True, "true"), (False, "false"), ("payments", "payments"), ("", None), (["a"], None), ({"a": 1}, None),
])
def test_claims_are_written_to_headers_as_envoy_formats_them(table, value, header):
    ctx, reply = authenticate(table, {"authorization": f"Bearer {token(org={'team': value})}"})
    assert reply is None and ctx.headers.get("x-team") == header


# -- the cache of verified tokens ----------------------------------------------------------------------

URI_SPEC = {"jwtRules": [{"issuer": "https://issuer.example", "jwksUri": "https://issuer.example/jwks"}]}


def _cached_authenticator(table, keys_json=JWKS):
    """An Authenticator on a clock at the wall time, its jwksUri's key set already fetched (``keys_json``)."""
    clock = Clock()
    clock.advance(time.time())
    authenticator = Authenticator(reactor=clock, agent=object())
    [(uri, _, _)] = table.jwks_uris
    authenticator.sources[uri] = SimpleNamespace(keys=parse_jwks(keys_json)[0], start_for_token=lambda *_, **__: False)
    return authenticator, clock


def _auth(authenticator, table, good):
    ctx = RequestContext.for_test(path="/", headers={"authorization": f"Bearer {good}"}, host="api.shop")
    try:
        authenticator.authenticate(ctx, table)
    except LocalReply as reply:
        return reply.message
    return ctx.request_auth.principal


def test_a_cached_token_still_expires_on_time():
    """The second request takes the cached verification (the clock, not PyJWT's wall time, decides its expiry)."""
    table = _compiled(_document("RequestAuthentication", "ra", "shop", URI_SPEC)).request_authn
    authenticator, clock = _cached_authenticator(table)
    good = token(aud="any", exp=int(clock.seconds()) + 10)
    assert _auth(authenticator, table, good) == "https://issuer.example/alice"
    clock.advance(10 + 61)
    assert _auth(authenticator, table, good) == "Jwt is expired"


def test_a_new_key_set_is_not_answered_from_the_cache():
    table = _compiled(_document("RequestAuthentication", "ra", "shop", URI_SPEC)).request_authn
    authenticator, _ = _cached_authenticator(table)
    good = token(aud="any")
    assert _auth(authenticator, table, good) == "https://issuer.example/alice"
    [source] = authenticator.sources.values()
    source.keys = parse_jwks(key_set(public_jwk(EC_KEY, "e1")))[0]  # the issuer rotated k1 out
    assert _auth(authenticator, table, good) == "Jwks doesn't have key to match kid or alg from Jwt"


def test_the_cache_keeps_the_newest_tokens_only():
    table = _compiled(_document("RequestAuthentication", "ra", "shop", URI_SPEC)).request_authn
    authenticator, _ = _cached_authenticator(table)
    tokens = [token(aud="any", jti=str(index)) for index in range(TOKEN_CACHE_SIZE + 5)]
    for good in tokens:
        assert _auth(authenticator, table, good) == "https://issuer.example/alice"
    assert len(authenticator._verified) == TOKEN_CACHE_SIZE
    assert tokens[0] not in authenticator._verified and tokens[-1] in authenticator._verified
