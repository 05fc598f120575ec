"""Join tokens (mesh.identity.tokens): signed, bound to namespace, service account and trust domain, short-lived."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat

import pytest

from mesh.identity import credentials
from mesh.identity.credentials import CredentialRejected, JoinTokenVerifier
from mesh.identity.spiffe import SpiffeId
from mesh.identity.tokens import MAX_TOKEN_BYTES, TokenError, create_token, load_or_create_key, verify_token

KEY = bytes(range(32))
TD = "cluster.local"
NOW = 1_700_000_000.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _signed(claims_json: bytes, key: bytes = KEY) -> str:
    """A token whose claims are exactly ``claims_json``, correctly signed with ``key``."""
    payload = _b64(claims_json)
    signature = hmac.new(key, f"txm1.{payload}".encode(), hashlib.sha256).digest()
    return f"txm1.{payload}.{_b64(signature)}"


def test_round_trip():
    token = create_token(KEY, "shop", "frontend", TD, ttl=3600, now=NOW)
    claims = verify_token(KEY, token, TD, now=NOW + 10)
    assert (claims.namespace, claims.service_account, claims.trust_domain) == ("shop", "frontend", TD)
    assert claims.expires == NOW + 3600
    assert token.startswith("txm1.") and token.count(".") == 2
    raw = _claims(token)
    assert (raw["iat"], raw["exp"]) == (int(NOW), int(NOW + 3600)) and len(raw["jti"]) == 16


def test_tokens_are_unique_and_reusable_until_expiry():
    first = create_token(KEY, "shop", "frontend", TD, ttl=60, now=NOW)
    second = create_token(KEY, "shop", "frontend", TD, ttl=60, now=NOW)
    assert first != second  # a fresh jti each time
    for _ in range(3):  # sidecars restart: a token is not single-use
        verify_token(KEY, first, TD, now=NOW + 1)


def test_surrounding_whitespace_is_ignored():
    token = create_token(KEY, "shop", "frontend", TD, ttl=60, now=NOW)
    assert verify_token(KEY, f"  {token}\n", TD, now=NOW).service_account == "frontend"


@pytest.mark.parametrize("offset", [3600, 3601, 10 * 86400])
def test_expired(offset):
    token = create_token(KEY, "shop", "frontend", TD, ttl=3600, now=NOW)
    with pytest.raises(TokenError, match="expired.*meshctl token create"):
        verify_token(KEY, token, TD, now=NOW + offset)


def test_still_valid_just_before_expiry():
    token = create_token(KEY, "shop", "frontend", TD, ttl=3600, now=NOW)
    assert verify_token(KEY, token, TD, now=NOW + 3599.5)


def test_tampered_payload():
    """Another service account (or a later expiry) in the claims, with the original signature."""
    token = create_token(KEY, "shop", "frontend", TD, ttl=60, now=NOW)
    prefix, _, signature = token.split(".")
    for change in ({"sa": "admin"}, {"ns": "kube-system"}, {"exp": int(NOW) + 10 ** 8}):
        claims = {**_claims(token), **change}
        forged = f"{prefix}.{_b64(json.dumps(claims, separators=(',', ':'), sort_keys=True).encode())}.{signature}"
        with pytest.raises(TokenError, match="signature is invalid"):
            verify_token(KEY, forged, TD, now=NOW)


def test_tampered_signature():
    token = create_token(KEY, "shop", "frontend", TD, ttl=60, now=NOW)
    head, _, signature = token.rpartition(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    for bad in (flipped, signature[:-4], signature + "AAAA", "", _b64(b"\0" * 32)):
        with pytest.raises(TokenError, match="signature"):
            verify_token(KEY, f"{head}.{bad}", TD, now=NOW)


def test_signed_by_another_control_plane():
    token = create_token(os.urandom(32), "shop", "frontend", TD, ttl=60, now=NOW)
    with pytest.raises(TokenError, match="another control plane"):
        verify_token(KEY, token, TD, now=NOW)


def test_wrong_trust_domain():
    token = create_token(KEY, "shop", "frontend", "other.mesh", ttl=60, now=NOW)
    with pytest.raises(TokenError, match="trust domain 'other.mesh', not 'cluster.local'"):
        verify_token(KEY, token, TD, now=NOW)


@pytest.mark.parametrize("garbage", [
    "", " ", "hello", "txm1", "txm1.", "txm1..", "txm1.a.b.c", "txm2.e30.AAAA", "Bearer txm1.e30.AAAA",
    "txm1.!!!.@@@", "txm1.\u00e9\u00e9.\u00e9\u00e9", "\x00\x01\x02",
    "eyJhbGciOiJIUzI1NiJ9.e30.ZRrHA1JJJW8opsbCGfG_HACGpVUMN_a9IV7pAx_Zmeo",
])
def test_garbage(garbage):
    with pytest.raises(TokenError):
        verify_token(KEY, garbage, TD, now=NOW)


@pytest.mark.parametrize("value", [None, 42, b"txm1.e30.AAAA", ["txm1"], {"token": "x"}])
def test_not_a_string(value):
    with pytest.raises(TokenError, match="malformed"):
        verify_token(KEY, value, TD, now=NOW)


@pytest.mark.parametrize("claims_json", [
    b"not json", b"[]", b"{}", b'{"ns":"shop","sa":"frontend","td":"cluster.local"}',
    b'{"ns":"shop","sa":"frontend","td":"cluster.local","exp":"never"}', b"\xff\xfe",
])
def test_correctly_signed_but_malformed_claims(claims_json):
    with pytest.raises(TokenError, match="malformed token claims"):
        verify_token(KEY, _signed(claims_json), TD, now=NOW)


def test_oversized():
    token = create_token(KEY, "shop", "frontend", TD, ttl=60, now=NOW)
    padded = token + " " * (MAX_TOKEN_BYTES + 1 - len(token))  # valid once stripped, but too long
    with pytest.raises(TokenError, match="malformed"):
        verify_token(KEY, padded, TD, now=NOW)
    huge = _signed(json.dumps({"ns": "shop", "sa": "frontend", "td": TD, "exp": NOW + 60,
                               "pad": "x" * MAX_TOKEN_BYTES}).encode())
    with pytest.raises(TokenError, match="malformed"):
        verify_token(KEY, huge, TD, now=NOW)
    with pytest.raises(TokenError):
        verify_token(KEY, "txm1." + "A" * 10 ** 6 + ".AAAA", TD, now=NOW)


def test_error_messages_never_echo_the_token():
    token = create_token(KEY, "shop", "frontend", TD, ttl=60, now=NOW)
    head, _, signature = token.rpartition(".")
    for bad in (token[:-3] + "xyz", token + ".x", f"{head}.{signature[::-1]}"):
        with pytest.raises(TokenError) as info:
            verify_token(KEY, bad, TD, now=NOW)
        assert signature not in str(info.value) and head.split(".")[1] not in str(info.value)


def test_key_is_created_0600_and_reused(tmp_path):
    state = tmp_path / "state"
    key = load_or_create_key(str(state))
    assert len(key) == 32
    path = state / "token-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert load_or_create_key(str(state)) == key
    assert not list(state.glob("*.tmp"))


def test_join_token_verifier():
    verifier = JoinTokenVerifier(KEY, TD)
    token = create_token(KEY, "shop", "frontend", TD, ttl=60)
    assert verifier.verify(token) == SpiffeId(TD, "shop", "frontend")
    assert verifier.verify(token).uri == "spiffe://cluster.local/ns/shop/sa/frontend"
    with pytest.raises(CredentialRejected, match="expired"):
        verifier.verify(create_token(KEY, "shop", "frontend", TD, ttl=-1))
    with pytest.raises(CredentialRejected, match="malformed"):
        verifier.verify("garbage")


def test_join_token_verifier_keeps_a_checked_token_until_it_expires(monkeypatch):
    now = [1_000_000.0]
    verifier = JoinTokenVerifier(KEY, TD, clock=lambda: now[0])
    token = create_token(KEY, "shop", "frontend", TD, ttl=60, now=now[0])
    checks = []
    real = credentials.verify_token
    monkeypatch.setattr(credentials, "verify_token", lambda *args: checks.append(args) or real(*args))
    assert verifier.verify(token) == verifier.verify(token) == SpiffeId(TD, "shop", "frontend")
    assert len(checks) == 1
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    with pytest.raises(CredentialRejected, match="signature is invalid"):
        verifier.verify(tampered)
    now[0] += 60
    with pytest.raises(CredentialRejected, match="token expired; create a new one"):
        verifier.verify(token)
    with pytest.raises(CredentialRejected, match="token expired"):
        verifier.verify(token)
