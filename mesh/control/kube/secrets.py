"""Gateway credentials from Kubernetes Secrets (``credentialName``), as istiod serves them by SDS.

:class:`GatewaySecrets` list-watches Secrets (core v1, every namespace) and hands the
:class:`~mesh.control.distribution.Distributor` only their TLS material, after every change
(coalesced): per ``(namespace, name)`` the PEM texts under the file names a mounted Secret
has (``tls.crt``, ``tls.key``, ``ca.crt``).  A ``kubernetes.io/tls`` Secret's keys are
those; a generic Secret's ``cert``, ``key`` and ``cacert`` are read as them, as Istio does.
The cache keeps nothing else of a Secret (:class:`TLSSecretCache`); Secrets without such
keys (service-account tokens, anything else) are left out.  The
Distributor sends a gateway proxy only the Secrets its Gateways name, of its own namespace.
Nothing here logs a key.
"""

from __future__ import annotations

import base64
import binascii

from twisted.logger import Logger

from mesh.control.kube.watch import ObjectCache, WatchingService, object_key

log = Logger()

#: a Secret's data keys -> the file name the gateway reads (the ``kubernetes.io/tls`` names first)
SECRET_KEYS = (("tls.crt", "tls.crt"), ("tls.key", "tls.key"), ("ca.crt", "ca.crt"),
               ("cert", "tls.crt"), ("key", "tls.key"), ("cacert", "ca.crt"))


def tls_material(secret: dict) -> dict:
    """The PEM texts of ``secret`` (an API object) as ``{file name: text}``; empty if it holds none."""
    data = secret.get("data") or {}
    found = {}
    for key, file_name in SECRET_KEYS:
        value = data.get(key)
        if file_name in found or not isinstance(value, str):
            continue
        try:
            text = base64.b64decode(value, validate=True).decode("ascii")
        except (binascii.Error, ValueError):
            namespace, name = object_key(secret)
            log.warn("Secret {namespace}/{name}: key {key} is not base64 of PEM text; left out",
                     namespace=namespace, name=name, key=key)
            continue
        if "-----BEGIN " in text:
            found[file_name] = text
    return found


class TLSSecretCache(ObjectCache):
    """An :class:`ObjectCache` of Secrets that keeps only their TLS material (``{"metadata", "tls"}``):
    nothing else of a Secret (service-account tokens, passwords) stays in mesh-control's memory."""

    def replace(self, items) -> None:
        super().replace([_trimmed(item) for item in items])

    def apply(self, event_type: str, obj: dict) -> None:
        super().apply(event_type, _trimmed(obj))


def _trimmed(secret: dict) -> dict:
    """``secret``'s namespace, name and :func:`tls_material`."""
    namespace, name = object_key(secret)
    return {"metadata": {"namespace": namespace, "name": name}, "tls": tls_material(secret)}


class GatewaySecrets(WatchingService):
    """Secrets -> ``on_change({(namespace, name): {file name: PEM}})``, the TLS ones only.

    ``api_client``: a ``kubernetes`` ApiClient; ``on_change`` is called on the reactor thread
    after the first list and after every (coalesced) change.
    """

    name = "kubernetes:secrets"
    cache_class = TLSSecretCache

    def __init__(self, reactor, api_client, on_change, **kwargs):
        from kubernetes import client

        super().__init__(reactor, {"secrets": client.CoreV1Api(api_client).list_secret_for_all_namespaces},
                         **kwargs)
        self._on_change = on_change

    def settled(self) -> None:
        if not self.synced:
            return
        self._on_change({object_key(secret): secret["tls"] for secret in self.caches["secrets"].values()
                         if secret["tls"]})
