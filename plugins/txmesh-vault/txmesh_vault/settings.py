"""The plugin's command-line options (``twistd mesh-control --vault-...``) and their checked form.

:data:`OPTIONS` is what ``mesh_addoption`` adds; :meth:`VaultSettings.from_options` turns the parsed
values into one frozen object once ``--ca vault`` selected Vault, or raises :class:`SettingsError` saying
which option is missing or wrong and what to give.  No secret is ever an option value: the token, the
AppRole secret id and the Kubernetes service-account token are read from files (and re-read, so that
an operator or Vault Agent can replace them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from mesh.api import PluginConfigError, seconds_option

AUTH_METHODS = ("token", "approle", "kubernetes")
#: Where Kubernetes projects a pod's service-account token.
KUBERNETES_JWT = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class SettingsError(PluginConfigError):
    """An option is missing or inconsistent: the message names it and says what to give."""


def yes_no(value: str) -> bool:
    """``yes``/``no`` (also ``true``/``false``, ``1``/``0``, ``on``/``off``)."""
    lowered = value.strip().lower()
    if lowered in ("yes", "true", "1", "on"):
        return True
    if lowered in ("no", "false", "0", "off"):
        return False
    raise ValueError(f"{value!r}: give yes or no")


def auth_method(value: str) -> str:
    """One of :data:`AUTH_METHODS`."""
    if value not in AUTH_METHODS:
        raise ValueError(f"{value!r}: give one of {', '.join(AUTH_METHODS)}")
    return value


def concurrency(value: str) -> int:
    """The number of Vault calls in flight at once: 1 to 64."""
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise ValueError(f"{value!r}: give a number of calls from 1 to 64")
    return int(value)


class Option(NamedTuple):
    """One ``--vault-...`` option of mesh-control (see :meth:`mesh.api.OptionParser.addoption`)."""

    name: str
    default: Any
    help: str
    coerce: Any = None


#: Every option the plugin adds to ``twistd mesh-control``, in ``--help`` order.
OPTIONS = (
    Option("vault-addr", None, "With --ca vault: URL of Vault's API, e.g. https://vault.example:8200."),
    Option("vault-ca-cert", None, "PEM file of the CA that issued Vault's TLS certificate (default: the "
           "system's CAs)."),
    Option("vault-namespace", None, "Vault namespace (Vault Enterprise, OpenBao) the PKI mount and auth live in."),
    Option("vault-auth", "token", "How mesh-control logs in to Vault: token, approle or kubernetes.", auth_method),
    Option("vault-auth-mount", None, "Path the AppRole or Kubernetes auth method is mounted at "
           "(default: approle or kubernetes)."),
    Option("vault-token-file", None, "--vault-auth token: file holding the token (re-read when it changes, "
           "e.g. Vault Agent's token sink); renewed before it expires."),
    Option("vault-approle-role-id", None, "--vault-auth approle: the AppRole's role_id."),
    Option("vault-approle-secret-id-file", None, "--vault-auth approle: file holding a secret_id (read at "
           "each login)."),
    Option("vault-kubernetes-role", None, "--vault-auth kubernetes: the Vault role bound to mesh-control's "
           "service account."),
    Option("vault-kubernetes-jwt-file", KUBERNETES_JWT, "--vault-auth kubernetes: the service-account token "
           "(read at each login)."),
    Option("vault-pki-mount", "pki", "Path of the PKI secrets engine that signs workload certificates."),
    Option("vault-pki-role", "txmesh", "PKI role to sign with (pki/sign/ROLE); see docs/identity.md for its "
           "settings."),
    Option("vault-sign-verbatim", False, "yes: sign with pki/sign-verbatim/ROLE (the CSR as it is, already "
           "checked by mesh-control) instead of pki/sign/ROLE.", yes_no),
    Option("vault-timeout", 5.0, "Seconds one Vault call may take; a CSR waiting longer is answered 503.",
           seconds_option),
    Option("vault-refresh-interval", 5.0, "Seconds between two reads of the mount's issuers (the trust "
           "bundle) and of Vault's health.", seconds_option),
    Option("vault-concurrency", 8, "Vault calls in flight at once (threads); more CSRs wait their turn.",
           concurrency),
)


@dataclass(frozen=True)
class VaultSettings:
    """The checked options: where Vault is, how to log in, what signs."""

    addr: str
    auth: str = "token"
    auth_mount: str = ""
    token_file: str | None = None
    role_id: str | None = None
    secret_id_file: str | None = None
    kubernetes_role: str | None = None
    jwt_file: str = KUBERNETES_JWT
    mount: str = "pki"
    role: str = "txmesh"
    verbatim: bool = False
    ca_cert: str | None = None
    namespace: str | None = None
    timeout: float = 5.0
    refresh_interval: float = 5.0
    concurrency: int = 8
    trust_domain: str = "cluster.local"

    @classmethod
    def from_options(cls, option) -> VaultSettings:
        """The settings from ``option(name)`` (:meth:`mesh.api.Config.option`), checked together.

        :raises SettingsError: naming the option to fix.
        """
        addr = (option("vault-addr") or "").rstrip("/")
        url = urlsplit(addr)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise SettingsError("--ca vault needs --vault-addr URL, e.g. --vault-addr https://vault.example:8200"
                                if not addr else f"--vault-addr {addr!r} is not an http:// or https:// URL")
        auth = option("vault-auth") or "token"
        settings = cls(
            addr=addr, auth=auth, auth_mount=(option("vault-auth-mount") or auth).strip("/"),
            token_file=option("vault-token-file"), role_id=option("vault-approle-role-id"),
            secret_id_file=option("vault-approle-secret-id-file"),
            kubernetes_role=option("vault-kubernetes-role"),
            jwt_file=option("vault-kubernetes-jwt-file") or KUBERNETES_JWT,
            mount=(option("vault-pki-mount") or "pki").strip("/"), role=(option("vault-pki-role") or "").strip("/"),
            verbatim=bool(option("vault-sign-verbatim")), ca_cert=option("vault-ca-cert"),
            namespace=option("vault-namespace"), timeout=option("vault-timeout") or 5.0,
            refresh_interval=option("vault-refresh-interval") or 5.0,
            concurrency=option("vault-concurrency") or 8, trust_domain=option("trust-domain") or "cluster.local")
        settings._check()
        return settings

    def _check(self) -> None:
        needs = {"token": ("vault-token-file",), "approle": ("vault-approle-role-id", "vault-approle-secret-id-file"),
                 "kubernetes": ("vault-kubernetes-role",)}[self.auth]
        given = {"vault-token-file": self.token_file, "vault-approle-role-id": self.role_id,
                 "vault-approle-secret-id-file": self.secret_id_file, "vault-kubernetes-role": self.kubernetes_role}
        missing = [f"--{name}" for name in needs if not given[name]]
        if missing:
            raise SettingsError(f"--vault-auth {self.auth} needs {' and '.join(missing)}")
        if not self.role and not self.verbatim:
            raise SettingsError("--vault-pki-role is empty: name the PKI role that signs (pki/sign/ROLE), or sign "
                                "with --vault-sign-verbatim yes")
        if self.ca_cert is not None and not self.addr.startswith("https://"):
            raise SettingsError("--vault-ca-cert verifies Vault's TLS certificate: give an https:// --vault-addr")

    @property
    def sign_path(self) -> str:
        """The API path that signs: ``MOUNT/sign/ROLE`` or ``MOUNT/sign-verbatim[/ROLE]``."""
        if self.verbatim:
            return f"{self.mount}/sign-verbatim" + (f"/{self.role}" if self.role else "")
        return f"{self.mount}/sign/{self.role}"

    @property
    def issuer(self) -> str:
        """Who signs, in one line (``CAStatus.issuer``): ``vault https://vault:8200 pki/sign/txmesh``."""
        return f"vault {self.addr} {self.sign_path}"
