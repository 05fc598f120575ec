"""The mesh CA kept in a Kubernetes Secret, shared by every replica (``--kubernetes --ca-secret NAME``).

The Secret ``NAME`` in ``--namespace`` (type Opaque) holds three keys, and
one optional key:

- ``ca-cert.pem``: the self-signed root (PEM),
- ``ca-key.pem``: its private key (PEM, PKCS#8, unencrypted),
- ``token-key``: the join-token HMAC secret (32 random bytes), so a join token
  from ``meshctl token create`` verifies on every replica,
- ``extra-roots.pem`` (optional): more root certificates for the trust bundle,
  the ``STATE/extra-roots.pem`` of a root rotation (docs/kubernetes.md, "Rotating
  the root with --ca-secret").

At start, :func:`install_ca_secret` reads the Secret; if there is none, it
generates a root (:func:`mesh.identity.ca.generate_root`) and a token key and
creates the Secret; if that create gets 409 AlreadyExists, another replica won
the race and its Secret is read instead, so all replicas end up with the same
CA.  The material is then written into the state directory (keys mode 0600,
replacing whatever was there: the Secret is the source of truth) where
:class:`mesh.identity.ca.CertificateAuthority` and the token key loader (and
``meshctl token create --state-dir``) read it.

Key material is never logged: the log names the Secret and the root's
subject and SHA-256 fingerprint only.  A Secret that lacks a key or holds a
bad one stops the control plane with a :class:`CASecretError` naming the
Secret and the key.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.logger import Logger

from mesh.identity.ca import CA_CERT, CA_KEY, EXTRA_ROOTS, CAError, generate_root, to_pem
from mesh.identity.files import write_private, write_public
from mesh.identity.tokens import TOKEN_KEY

log = Logger()

API_TIMEOUT = 10.0
MIN_TOKEN_KEY_BYTES = 32
SECRET_KEYS = (CA_CERT, CA_KEY, TOKEN_KEY)


class CASecretError(CAError):
    """The CA Secret cannot be read, created or used; the message names it and says what to do."""


@dataclass(frozen=True)
class CAMaterial:
    """What the Secret holds: the root certificate and key (PEM), the token key (raw bytes) and extra roots (PEM)."""

    cert_pem: bytes
    key_pem: bytes
    token_key: bytes
    extra_roots_pem: bytes = b""

    @classmethod
    def generate(cls, trust_domain: str) -> CAMaterial:
        """A new root for ``trust_domain`` and a new token key."""
        key, cert = generate_root(trust_domain)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cls(to_pem([cert]), key_pem, secrets.token_bytes(MIN_TOKEN_KEY_BYTES))

    @classmethod
    def from_secret_data(cls, data: dict, where: str) -> CAMaterial:
        """From a Secret's ``data`` (base64 values); checks every key. ``where``: ``Secret NS/NAME``."""
        raw = {}
        for name in SECRET_KEYS:
            value = (data or {}).get(name)
            if not value:
                raise CASecretError(f"{where} has no {name!r} key; delete the Secret to have mesh-control "
                                    f"generate a new CA, or add the key (keys: {', '.join(SECRET_KEYS)})")
            try:
                raw[name] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise CASecretError(f"{where}: key {name!r} is not base64") from None
        try:
            extra = base64.b64decode((data or {}).get(EXTRA_ROOTS) or "", validate=True)
        except (binascii.Error, ValueError):
            raise CASecretError(f"{where}: key {EXTRA_ROOTS!r} is not base64") from None
        material = cls(raw[CA_CERT], raw[CA_KEY], raw[TOKEN_KEY], extra)
        material.check(where)
        return material

    def check(self, where: str) -> None:
        """Raise :class:`CASecretError` unless the certificate is a CA whose key is ``key_pem``."""
        try:
            cert = x509.load_pem_x509_certificate(self.cert_pem)
        except ValueError:
            raise CASecretError(f"{where}: key {CA_CERT!r} is not a PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError):
            raise CASecretError(f"{where}: key {CA_KEY!r} is not an unencrypted PEM private key") from None
        if not _is_ca(cert):
            raise CASecretError(f"{where}: key {CA_CERT!r} is not a CA certificate (basicConstraints CA:TRUE)")
        if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
                != cert.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo):
            raise CASecretError(f"{where}: key {CA_KEY!r} does not belong to the certificate in {CA_CERT!r}")
        try:
            extra = self.extra_roots()
        except ValueError:
            raise CASecretError(f"{where}: key {EXTRA_ROOTS!r} is not a list of PEM certificates") from None
        for root in extra:
            if not _is_ca(root):
                raise CASecretError(f"{where}: key {EXTRA_ROOTS!r} holds {root.subject.rfc4514_string()}, "
                                    "which is not a CA certificate (basicConstraints CA:TRUE)")
        if len(self.token_key) < MIN_TOKEN_KEY_BYTES:
            raise CASecretError(f"{where}: key {TOKEN_KEY!r} has {len(self.token_key)} bytes; it needs at least "
                                f"{MIN_TOKEN_KEY_BYTES} random bytes")

    def extra_roots(self) -> list:
        """The extra trusted roots (certificates); ValueError if they are not PEM certificates."""
        return x509.load_pem_x509_certificates(self.extra_roots_pem) if self.extra_roots_pem.strip() else []

    def secret_data(self) -> dict:
        """The Secret's ``data``: every key base64-encoded."""
        values = {CA_CERT: self.cert_pem, CA_KEY: self.key_pem, TOKEN_KEY: self.token_key}
        if self.extra_roots_pem.strip():
            values[EXTRA_ROOTS] = self.extra_roots_pem
        return {name: base64.b64encode(value).decode() for name, value in values.items()}

    def fingerprint(self) -> str:
        """SHA-256 fingerprint of the root (hex), for logs: it identifies the CA without revealing it."""
        return x509.load_pem_x509_certificate(self.cert_pem).fingerprint(hashes.SHA256()).hex()

    def install(self, state_dir: str) -> None:
        """Write the material where the CA and the token key are loaded from (keys 0600)."""
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        write_private(os.path.join(state_dir, CA_KEY), self.key_pem)
        write_public(os.path.join(state_dir, CA_CERT), self.cert_pem)
        write_private(os.path.join(state_dir, TOKEN_KEY), self.token_key)
        extra_path = os.path.join(state_dir, EXTRA_ROOTS)
        if self.extra_roots_pem.strip():
            write_public(extra_path, self.extra_roots_pem)
        elif os.path.exists(extra_path):
            os.unlink(extra_path)  # the Secret has none: a root rotation's last step


def _is_ca(cert) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


class CASecret:
    """The Secret ``name`` in ``namespace``, read and created with the Kubernetes API."""

    def __init__(self, api_client, namespace: str, name: str):
        from kubernetes import client

        self._core = client.CoreV1Api(api_client)
        self._host = api_client.configuration.host
        self.namespace = namespace
        self.name = name
        self.where = f"Secret {namespace}/{name}"

    def load_or_create(self, trust_domain: str) -> CAMaterial:
        """The CA of the Secret; generated and stored first if there is none (a lost race reads the winner's)."""
        data = self._read()
        if data is not None:
            material = CAMaterial.from_secret_data(data, self.where)
            log.info("CA root loaded from {secret} (SHA-256 {fingerprint}; {extra} extra trusted root(s))",
                     secret=self.where, fingerprint=material.fingerprint(), extra=len(material.extra_roots()))
            return material
        material = CAMaterial.generate(trust_domain)
        if self._create(material):
            log.info("generated a new CA root and stored it in {secret} (SHA-256 {fingerprint})",
                     secret=self.where, fingerprint=material.fingerprint())
            return material
        data = self._read()
        if data is None:
            raise CASecretError(f"{self.where} was created by someone else and then deleted; start mesh-control "
                                "again")
        material = CAMaterial.from_secret_data(data, self.where)
        log.info("another replica created {secret} first; using its CA root (SHA-256 {fingerprint})",
                 secret=self.where, fingerprint=material.fingerprint())
        return material

    def _read(self):
        """The Secret's data, or None if it does not exist."""
        secret = self._request("read", 404, self._core.read_namespaced_secret, self.name, self.namespace)
        return None if secret is None else (secret.data or {})

    def _create(self, material: CAMaterial) -> bool:
        """Create the Secret; False if it exists already (another replica was first)."""
        from kubernetes import client

        body = client.V1Secret(
            api_version="v1", kind="Secret", type="Opaque", data=material.secret_data(),
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace,
                                         labels={"app.kubernetes.io/part-of": "txmesh",
                                                 "app.kubernetes.io/component": "ca"}))
        return self._request("create", 409, self._core.create_namespaced_secret, self.namespace, body) is not None

    def _request(self, verb: str, absent_status: int, call, *args):
        """``call(*args)``'s answer, or None when the API server answers ``absent_status``.

        Any other failure is a :class:`CASecretError` saying what to do.
        """
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return call(*args, _request_timeout=API_TIMEOUT)
        except ApiException as error:
            if error.status == absent_status:
                return None
            raise self._api_error(verb, error) from None
        except (HTTPError, OSError) as error:
            raise CASecretError(f"cannot {verb} {self.where}: the Kubernetes API server at {self._host} is "
                                f"unreachable ({type(error).__name__}); mesh-control needs it to load its CA") \
                from None

    def _api_error(self, verb: str, error) -> CASecretError:
        if error.status in (401, 403):
            return CASecretError(f"mesh-control may not {verb} {self.where} ({error.status} {error.reason}); "
                                 f"grant its service account `get` on this Secret and `create` on secrets in "
                                 f"{self.namespace} (deploy/base/control-plane/rbac.yaml)")
        if error.status == 404:  # create: the namespace does not exist
            return CASecretError(f"cannot {verb} {self.where}: namespace {self.namespace} does not exist; "
                                 "create it or pass the control plane's namespace as --namespace")
        return CASecretError(f"cannot {verb} {self.where}: the Kubernetes API server answered {error.status} "
                             f"{error.reason}")


def install_ca_secret(api_client, namespace: str, name: str, state_dir: str, trust_domain: str) -> CAMaterial:
    """Load (or create) the CA Secret and write its material into ``state_dir``; see the module docstring."""
    material = CASecret(api_client, namespace, name).load_or_create(trust_domain)
    material.install(state_dir)
    return material
