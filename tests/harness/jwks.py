"""End-user JWTs for the RequestAuthentication tests: keys, key sets, signed tokens, and a key-set server.

- :func:`public_jwk`: the public JWK of a ``cryptography`` private key (RSA or EC), with a ``kid``;
- :func:`sign`: a token signed with PyJWT, with default claims that a test overrides;
- :class:`JwksServer`: tests/apps/jwks_server.py as a real process: serves ``DIR/NAME.json`` and counts
  fetches (:meth:`JwksServer.fetches`); a test rotates keys with :meth:`JwksServer.publish`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from .net import free_port, http_request
from .processes import REPO_ROOT, ManagedProcess

ISSUER = "https://issuer.example"


def public_jwk(key, kid: str, **extra) -> dict:
    """The public JWK of a private key (RSA or EC), with ``kid`` and any ``extra`` members."""
    algorithm = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
    return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid, **extra}


def key_set(*jwks: dict) -> str:
    """A JSON Web Key Set of the given JWKs, as JSON text."""
    return json.dumps({"keys": list(jwks)})


def sign(key, kid: str | None = "k1", alg: str = "RS256", **claims) -> str:
    """A token signed with ``key``: ``iss`` :data:`ISSUER`, ``sub`` alice, ``aud`` shop, expiring in 5 minutes,
    unless ``claims`` say otherwise."""
    body = {"iss": ISSUER, "sub": "alice", "aud": "shop", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(body, key, alg, headers={"kid": kid} if kid else None)


class JwksServer(ManagedProcess):
    """``python tests/apps/jwks_server.py``: serves the key sets of ``keys_dir`` at ``/NAME.json``."""

    kind = "jwks-server"

    def __init__(self, keys_dir: Path, log_dir: Path, port: int | None = None):
        self.port = port or free_port()
        self.keys_dir = Path(keys_dir)
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(f"jwks-{self.port}", [sys.executable, REPO_ROOT / "tests" / "apps" / "jwks_server.py",
                                               "--port", self.port, "--keys-dir", self.keys_dir],
                         Path(log_dir) / f"jwks-server-{self.port}.log")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}.json"

    def publish(self, name: str, *jwks: dict) -> None:
        """Serve these keys at ``/NAME.json`` from now on (written whole, then renamed into place)."""
        tmp = self.keys_dir / f".{name}.tmp"
        tmp.write_text(key_set(*jwks))
        tmp.replace(self.keys_dir / f"{name}.json")

    def fetches(self, name: str) -> int:
        """How many times ``/NAME.json`` was served."""
        status, body = http_request("127.0.0.1", self.port, "/fetches")
        assert status == 200, body
        return json.loads(body).get(f"/{name}.json", 0)

    def is_ready(self) -> bool:
        return "listening" in self.log_path.read_text()
