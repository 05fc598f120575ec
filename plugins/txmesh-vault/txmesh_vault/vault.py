"""Blocking calls to Vault's HTTP API, with hvac: run them in worker threads only, never on the reactor.

:class:`VaultClient` keeps one ``hvac.Client`` (one keep-alive HTTP session) per thread and the token
they share; every failure leaves as :class:`mesh.api.CAUnavailable` with a reason that says what is
wrong and what to do, and never holds a secret (Vault's error messages echo no token, and neither do
these).  :class:`TokenKeeper` keeps the token valid: it logs in (AppRole, Kubernetes), adopts the
token of ``--vault-token-file`` (re-read when it changes), and renews before expiry.
"""

from __future__ import annotations

import re
import threading
import time

import hvac
import requests
from hvac import exceptions as hvac_errors

from mesh.api import CAUnavailable

#: Seconds a CSR caller is told to wait when Vault is down or sealed, and when it refused the request
#: itself (a setting to fix: no point in asking again at once).
RETRY_SOON = 5.0
RETRY_LATER = 30.0
#: Renew (or log in again) when this fraction of the token's time to live has passed, as Vault Agent does.
RENEW_AT = 2 / 3


class PermissionDenied(CAUnavailable):
    """Vault answered 403: the token is not (or no longer) allowed; a new login may help."""


def _message(error: hvac_errors.VaultError) -> str:
    return "; ".join(str(item) for item in (error.errors or ())) or str(error) or type(error).__name__


def _cause(error: requests.RequestException) -> str:
    """The short reason inside a requests error: ``[Errno 111] Connection refused``, ``certificate verify
    failed``, ``read timeout``."""
    text = str(error)
    for pattern in (r"\[Errno -?\d+\] [^'\")(]+", r"certificate verify failed[^'\")(]*", r"[Rr]ead timed out"):
        found = re.search(pattern, text)
        if found:
            return found.group(0).strip(" .")
    return type(error).__name__


def unavailable(error: Exception, addr: str, action: str, hint: str) -> CAUnavailable:
    """The :class:`CAUnavailable` that explains ``error``, raised while doing ``action`` (``"sign"``,
    ``"log in with approle"``); ``hint`` says what to do when Vault refused (403, 400)."""
    where = f"vault at {addr}"
    if isinstance(error, hvac_errors.VaultDown):
        message = _message(error)
        if "sealed" in message.lower():
            return CAUnavailable(f"{where} is sealed: unseal it (vault operator unseal)", RETRY_SOON)
        return CAUnavailable(f"{where} is unavailable ({message}) and cannot {action}", RETRY_SOON)
    if isinstance(error, hvac_errors.VaultNotInitialized):
        return CAUnavailable(f"{where} is not initialized: initialize and unseal it", RETRY_LATER)
    if isinstance(error, (hvac_errors.Forbidden, hvac_errors.Unauthorized)):
        # soon: a new login (or a new token in the file) may cure it at once
        return PermissionDenied(f"{where} refused to {action}: {_message(error)}: {hint}", RETRY_SOON)
    if isinstance(error, hvac_errors.RateLimitExceeded):
        return CAUnavailable(f"{where} is throttling requests (429) and cannot {action} now", RETRY_SOON)
    if isinstance(error, (hvac_errors.InvalidRequest, hvac_errors.InvalidPath)):
        return CAUnavailable(f"{where} refused to {action}: {_message(error)}: {hint}", RETRY_LATER)
    if isinstance(error, hvac_errors.VaultError):
        return CAUnavailable(f"{where} failed to {action}: {_message(error)}", RETRY_SOON)
    if isinstance(error, requests.exceptions.SSLError):
        return CAUnavailable(f"TLS to {where} failed ({_cause(error)}): give --vault-ca-cert the CA that issued "
                             "Vault's certificate", RETRY_LATER)
    if isinstance(error, requests.exceptions.Timeout):
        return CAUnavailable(f"{where} did not answer in time and cannot {action}: check its load, or raise "
                             "--vault-timeout", RETRY_SOON)
    if isinstance(error, requests.exceptions.RequestException):
        return CAUnavailable(f"{where} is unreachable ({_cause(error)}): start it, or check --vault-addr",
                             RETRY_SOON)
    raise TypeError(f"not a Vault error: {error!r}")


def read_secret_file(path: str, option: str) -> str:
    """The stripped content of a file holding a secret (never shown), or :class:`CAUnavailable` naming the
    option and the problem."""
    try:
        with open(path, encoding="utf-8") as handle:
            secret = handle.read().strip()
    except OSError as error:
        raise CAUnavailable(f"cannot read --{option} {path}: {error.strerror}", RETRY_LATER) from None
    if not secret:
        raise CAUnavailable(f"--{option} {path} is empty: write the secret into it", RETRY_LATER)
    return secret


class VaultClient:
    """Vault's API for one mesh-control: PKI calls and token calls, each raising :class:`CAUnavailable`.

    Blocking: call from worker threads.  ``token`` is shared by every thread (set by :class:`TokenKeeper`).
    """

    def __init__(self, settings):
        self.settings = settings
        self.token: str | None = None
        self._local = threading.local()

    def _client(self) -> hvac.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            settings = self.settings
            client = self._local.client = hvac.Client(
                url=settings.addr, verify=settings.ca_cert or True, timeout=settings.timeout,
                namespace=settings.namespace)
        client.token = self.token
        return client

    def call(self, action: str, hint: str, request):
        """``request(client)`` with this thread's ``hvac.Client``; Vault's and the network's errors become
        :class:`CAUnavailable` (see :func:`unavailable`)."""
        try:
            return request(self._client())
        except (hvac_errors.VaultError, requests.RequestException) as error:
            raise unavailable(error, self.settings.addr, action, hint) from None

    # -- PKI --------------------------------------------------------------------------------------------
    def sign(self, csr_pem: str, identity: str, ttl: float) -> dict:
        """``MOUNT/sign/ROLE`` (the SPIFFE id as the only URI SAN, no common name) or
        ``MOUNT/sign-verbatim[/ROLE]``: the answer's data (``certificate``, ``ca_chain``, ``issuing_ca``)."""
        settings = self.settings
        data = {"csr": csr_pem, "ttl": f"{max(1, int(ttl))}s", "format": "pem"}
        if settings.verbatim:
            data["ext_key_usage"] = ["ServerAuth", "ClientAuth"]
        else:
            data.update(uri_sans=identity, exclude_cn_from_sans=True)
        hint = f"give mesh-control's Vault token a policy with update on {settings.sign_path}"
        if not settings.verbatim:
            hint += f", and check the role's settings (docs/identity.md) with: vault read {settings.mount}/roles/" \
                    f"{settings.role}"
        answer = self.call("sign", hint, lambda client: client.write_data(settings.sign_path, data=data))
        return answer["data"]

    def issuers(self) -> dict:
        """Every issuer of the mount: id -> ``MOUNT/issuer/ID/json``'s data (``certificate``, ``ca_chain``)."""
        mount = self.settings.mount
        hint = f"is {mount} a PKI secrets engine (Vault 1.11 or later)? check --vault-pki-mount"
        listing = self.call("list the issuers", hint, lambda client: client.list(f"{mount}/issuers"))
        ids = (listing or {}).get("data", {}).get("keys", [])
        return {issuer: self.call("read an issuer", hint,
                                  lambda client, issuer=issuer: client.read(f"{mount}/issuer/{issuer}/json"))["data"]
                for issuer in ids}

    def role(self) -> dict | None:
        """``MOUNT/roles/ROLE``'s data, or None when the token may not read it (the check is optional)."""
        settings = self.settings
        if not settings.role:
            return None
        path = f"{settings.mount}/roles/{settings.role}"
        try:
            answer = self.call("read the role", "", lambda client: client.read(path))
        except PermissionDenied:
            return None
        if answer is None:
            raise CAUnavailable(f"vault at {settings.addr} has no PKI role {settings.role} in {settings.mount}: create "
                                f"it (docs/identity.md), or name yours with --vault-pki-role", RETRY_LATER)
        return answer["data"]

    def can_sign(self) -> bool:
        """Whether the token's policies allow ``update`` on the signing path (``sys/capabilities-self``)."""
        path = self.settings.sign_path
        answer = self.call("check the token's capabilities", "check mesh-control's Vault token",
                           lambda client: client.sys.get_capabilities(paths=[path]))
        capabilities = answer.get(path) or answer.get("capabilities") or answer.get("data", {}).get(path) or []
        return "root" in capabilities or "update" in capabilities

    # -- tokens -----------------------------------------------------------------------------------------
    def lookup_self(self) -> dict:
        return self.call("look up its token", "give mesh-control a valid token in --vault-token-file",
                         lambda client: client.auth.token.lookup_self())["data"]

    def renew_self(self) -> dict:
        return self.call("renew its token", "the token may have been revoked or reached its max TTL",
                         lambda client: client.auth.token.renew_self())["auth"]

    def login(self) -> dict:
        """Log in with AppRole or Kubernetes auth (secrets read from their files now); the answer's ``auth``."""
        settings = self.settings
        if settings.auth == "approle":
            secret_id = read_secret_file(settings.secret_id_file, "vault-approle-secret-id-file")
            hint = (f"check --vault-approle-role-id and the secret id in {settings.secret_id_file} (a secret id "
                    f"expires, or runs out of uses: issue a new one with vault write -f auth/{settings.auth_mount}/"
                    "role/ROLE/secret-id)")
            answer = self.call("log in with approle", hint, lambda client: client.auth.approle.login(
                settings.role_id, secret_id, use_token=False, mount_point=settings.auth_mount))
        else:
            jwt = read_secret_file(settings.jwt_file, "vault-kubernetes-jwt-file")
            hint = (f"check that the Vault role {settings.kubernetes_role} (auth/{settings.auth_mount}/role/"
                    f"{settings.kubernetes_role}) binds mesh-control's service account and namespace, and its "
                    "audience matches the token's")
            answer = self.call("log in with kubernetes auth", hint, lambda client: client.auth.kubernetes.login(
                settings.kubernetes_role, jwt, use_token=False, mount_point=settings.auth_mount))
        return answer["auth"]


class TokenKeeper:
    """Keeps :attr:`VaultClient.token` valid.  Blocking; one caller at a time (the status refresh).

    - ``token`` auth: the token is the content of ``--vault-token-file``, re-read at every
      :meth:`ensure` (so Vault Agent's sink, or an operator, can replace it); its time to live comes from
      ``lookup-self``.
    - ``approle`` and ``kubernetes`` auth: log in when there is no token or it was refused.

    A renewable token is renewed (``renew-self``) once two thirds of its time to live have passed; a
    token that cannot be renewed (any more: its max TTL is near) is replaced by a new login, or, with
    ``token`` auth, used until it expires (Vault then refuses it, which the status says).
    """

    def __init__(self, client: VaultClient, clock=time.monotonic):
        self.client = client
        self.settings = client.settings
        self.clock = clock
        self.renewable = False
        self.ttl = 0.0  # the token's time to live when last obtained or renewed (0: it never expires)
        self.due: float | None = None  # when to renew or log in again (None: never)
        self.expires: float | None = None
        self._file_token: str | None = None

    def ensure(self) -> list[str]:
        """Log in, adopt, renew as due; returns what happened, for the log (no secret in it)."""
        notes = []
        if self.settings.auth == "token":
            token = read_secret_file(self.settings.token_file, "vault-token-file")
            if token != self._file_token:
                self.client.token = token
                data = self.client.lookup_self()
                self._file_token = token
                self._obtained(float(data.get("ttl") or 0), bool(data.get("renewable")))
                notes.append(f"using the token in {self.settings.token_file} ({self._describe()})")
        elif self.client.token is None:
            notes.append(self._login())
        if self.due is not None and self.clock() >= self.due:
            notes.append(self._renew())
        return notes

    def seconds_until_due(self) -> float | None:
        """Seconds until the token must be renewed or replaced (None: never)."""
        return None if self.due is None else self.due - self.clock()

    def invalidate(self) -> None:
        """Vault refused the token: look it up (``token`` auth) or log in again at the next :meth:`ensure`."""
        self._file_token = None
        if self.settings.auth != "token":
            self.client.token = None

    def _login(self) -> str:
        auth = self.client.login()
        self.client.token = auth["client_token"]
        self._obtained(float(auth.get("lease_duration") or 0), bool(auth.get("renewable")))
        return f"logged in with {self.settings.auth} auth ({self._describe()})"

    def _renew(self) -> str:
        can_login = self.settings.auth != "token"
        if not self.renewable:
            if can_login:
                return self._login()
            self.due = None  # nothing to do until the file holds a new token (then ensure() adopts it)
            left = (self.expires or self.clock()) - self.clock()
            return (f"the token in {self.settings.token_file} cannot be renewed and expires in {left:.0f}s: write a "
                    "new token into the file before then")
        wanted = self.ttl
        try:
            auth = self.client.renew_self()
        except PermissionDenied:
            if not can_login:
                raise
            return self._login()
        granted = float(auth.get("lease_duration") or 0)
        if can_login and granted < wanted / 2:  # capped by the token's max TTL: start afresh
            return self._login()
        self._obtained(granted, bool(auth.get("renewable")))
        return f"token renewed ({self._describe()})"

    def _obtained(self, ttl: float, renewable: bool) -> None:
        now = self.clock()
        self.ttl, self.renewable = ttl, renewable
        self.expires = now + ttl if ttl > 0 else None
        self.due = now + ttl * RENEW_AT if ttl > 0 else None

    def _describe(self) -> str:
        if self.expires is None:
            return "no expiry"
        return f"valid {self.ttl:.0f}s, {'renewable' if self.renewable else 'not renewable'}"
