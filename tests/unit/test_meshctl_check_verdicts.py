"""The verdicts of ``meshctl check`` (pure functions over what it read) and the redaction of ``meshctl
bug-report``.  The integration tests (tests/integration/test_meshctl_check.py) run both against a real mesh;
these cover the cases a healthy mesh cannot show: skewed clocks, NACKs, certificates near their end,
and every kind of secret."""

from __future__ import annotations

import datetime

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mesh.cli.bug_report import SECRET_FILE, redact
from mesh.cli.check import FAIL, PASS, WARN, certificate_check, check_clock, check_config, check_sync
from mesh.identity.tokens import create_token


@pytest.mark.parametrize("offset, status, words", [
    (0.4, PASS, "agree"),
    (-2.5, PASS, "agree"),          # within 2 s plus the round trip (1 s here)
    (12, WARN, "12s ahead of this host's; synchronise the clocks (NTP"),
    (-90, WARN, "90s behind this host's"),
    (400, FAIL, "more than the 300s certificates are backdated by: new certificates are not yet valid"),
])
def test_clock_skew(offset, status, words):
    check = check_clock((offset, 1.0))
    assert check.status == status and words in check.detail, check


def test_clock_skew_without_a_date_header_is_a_warning_saying_how_to_compare():
    check = check_clock(None)
    assert check.status == WARN and "`date -u` on both hosts" in check.detail


def _row(node, sent="v2", acked="v2", **extra):
    return {"node": node, "version_sent": sent, "version_acked": acked, "stale": sent != acked,
            "last_nack": None, "connected": True, **extra}


def test_config_sync():
    assert check_sync([_row("a"), _row("b")]).status == PASS
    assert "2 proxies, all SYNCED (version v2)" in check_sync([_row("a"), _row("b")]).detail
    stale = check_sync([_row("a"), _row("b", acked="v1")])
    assert stale.status == WARN and "1 of 2 proxies have not applied the latest config (b)" in stale.detail
    nacked = check_sync([_row("a"), _row("b", acked="v1", last_nack="spec.http[0]: bad weight")])
    assert nacked.status == FAIL and "b: spec.http[0]: bad weight; fix the resource it names" in nacked.detail
    empty = check_sync([])
    assert empty.status == WARN and "start one (`meshctl run" in empty.detail


def test_config_errors_fail_and_name_the_resource():
    ready = {"config": {"version": "abc", "resources": 3},
             "config_errors": ["/cfg/bad.yaml:4: VirtualService/default/x: spec.http: required"]}
    check = check_config(ready)
    assert check.status == FAIL
    assert "1 resource(s) rejected: /cfg/bad.yaml:4: VirtualService/default/x: spec.http: required; fix them" \
        in check.detail
    assert check_config({"config": {"version": "abc", "resources": 3}, "config_errors": []}).status == PASS


def _cert(left_s, life_s=86400.0, error=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    not_after = now + datetime.timedelta(seconds=left_s)
    return {"identity": "spiffe://cluster.local/ns/default/sa/web", "expires_in_s": left_s,
            "not_before": (not_after - datetime.timedelta(seconds=life_s)).isoformat(),
            "not_after": not_after.isoformat(), "last_renewal_error": error}


def test_certificate_verdicts():
    assert certificate_check("proxy web", _cert(80000)).status == PASS
    assert "valid 22h13m more" in certificate_check("proxy web", _cert(80000)).detail
    late = certificate_check("proxy web", _cert(3600))
    assert late.status == WARN and "renewal overdue (not renewed at half-life)" in late.detail
    failing = certificate_check("proxy web", _cert(50000, error="control plane unreachable"))
    assert failing.status == WARN and "control plane unreachable" in failing.detail
    assert certificate_check("proxy web", _cert(-1)).status == FAIL
    plaintext = certificate_check("proxy web", None)
    assert plaintext.status == WARN and "give it --control or --cert" in plaintext.detail


def _pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def test_redaction_removes_every_kind_of_secret():
    ec_key = _pem(ec.generate_private_key(ec.SECP256R1()))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()).decode()
    token = create_token(b"k" * 32, "default", "web", "cluster.local", 3600)
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDp3ZWIifQ.c2lnbmF0dXJl"
    text = "\n".join([
        "log line before", ec_key, "json: " + ec_key.replace("\n", "\\n"), rsa_key,
        f"token file says {token}", f"Authorization: Bearer {jwt}", 'headers {"authorization": "Basic dXNlcjpwdw=="}',
        "proxy-authorization: Basic cHJveHk6cHc=", "cookie: session=abcdef123", '"password": "hunter2"',
        "client_secret=s3cr3t&x=1", f"truncated {ec_key[:120]}", "the certificate is fine",
    ])
    redacted = redact(text)
    secrets = [line for key in (ec_key, rsa_key) for line in key.splitlines() if "-----" not in line]
    secrets += [token, token.split(".")[2], jwt, "dXNlcjpwdw==", "cHJveHk6cHc=", "abcdef123", "hunter2", "s3cr3t"]
    for secret in secrets:
        assert secret not in redacted, secret
    assert "PRIVATE KEY-----\n" not in redacted
    assert redacted.count("[REDACTED PRIVATE KEY]") >= 4
    assert "txm1.[REDACTED JOIN TOKEN]" in redacted and "Authorization: [REDACTED]" in redacted
    assert "log line before" in redacted and "the certificate is fine" in redacted and "x=1" in redacted


def test_redaction_leaves_ordinary_config_alone():
    text = ('{"token_file": "/state/tokens/web.token", "identity": "spiffe://cluster.local/ns/default/sa/web", '
            '"not_after": "2026-01-01T00:00:00+00:00", "--token-file": "x", "tokens": 3}')
    assert redact(text) == text


@pytest.mark.parametrize("name, secret", [
    ("ca-key.pem", True), ("key.pem", True), ("web.token", True), ("token-key", True), ("tls.key", True),
    ("root-cert.pem", False), ("control-plane.log", False), ("web-access.log", False), ("keys.yaml", False),
])
def test_secret_files_by_name(name, secret):
    assert bool(SECRET_FILE.search(name)) is secret
