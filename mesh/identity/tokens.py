"""Join tokens: the bootstrap credential of a sidecar outside Kubernetes.

``meshctl token create`` prints a token bound to a namespace and service
account, signed with the control plane's token key (HMAC-SHA256, a random
256-bit secret in the state directory, mode 0600).  A token is short-lived but
may be used any number of times before it expires, because sidecars restart.

Format: ``txm1.<base64url(JSON claims)>.<base64url(HMAC)>`` with claims
``ns``, ``sa``, ``td`` (trust domain), ``iat``, ``exp`` and ``jti``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass

from mesh.identity.files import write_private

TOKEN_KEY = "token-key"
_PREFIX = "txm1"
MAX_TOKEN_BYTES = 4096


class TokenError(Exception):
    """A token is malformed, tampered with, expired or for another mesh."""


@dataclass(frozen=True)
class TokenClaims:
    namespace: str
    service_account: str
    trust_domain: str
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_or_create_key(state_dir: str) -> bytes:
    """The token signing secret of ``state_dir``, created (0600) if missing."""
    path = os.path.join(state_dir, TOKEN_KEY)
    if not os.path.exists(path):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        write_private(path, secrets.token_bytes(32))
    with open(path, "rb") as handle:
        return handle.read()


def is_join_token(credential) -> bool:
    """Whether ``credential`` claims to be a join token (``txm1.`` prefix), valid or not."""
    return isinstance(credential, str) and credential.strip().startswith(_PREFIX + ".")


def create_token(key: bytes, namespace: str, service_account: str, trust_domain: str, ttl: float,
                 now=None) -> str:
    now = time.time() if now is None else now
    claims = {"ns": namespace, "sa": service_account, "td": trust_domain,
              "iat": int(now), "exp": int(now + ttl), "jti": secrets.token_hex(8)}
    payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signature = hmac.new(key, f"{_PREFIX}.{payload}".encode(), hashlib.sha256).digest()
    return f"{_PREFIX}.{payload}.{_b64(signature)}"


def verify_token(key: bytes, token: str, trust_domain: str, now=None) -> TokenClaims:
    """Check signature, expiry and trust domain; return the claims or raise TokenError."""
    now = time.time() if now is None else now
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise TokenError("malformed token")
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != _PREFIX:
        raise TokenError("malformed token: expected txm1.<claims>.<signature> from `meshctl token create`")
    try:
        signature = _unb64(parts[2])
    except ValueError:
        raise TokenError("malformed token signature") from None
    expected = hmac.new(key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        raise TokenError("token signature is invalid (tampered, or from another control plane)")
    try:
        claims = json.loads(_unb64(parts[1]))
        result = TokenClaims(str(claims["ns"]), str(claims["sa"]), str(claims["td"]), float(claims["exp"]))
    except (ValueError, KeyError, TypeError):
        raise TokenError("malformed token claims") from None
    if result.trust_domain != trust_domain:
        raise TokenError(f"token is for trust domain {result.trust_domain!r}, not {trust_domain!r}")
    if result.expires <= now:
        raise TokenError("token expired; create a new one with `meshctl token create`")
    return result
