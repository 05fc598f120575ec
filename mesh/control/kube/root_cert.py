"""The trust bundle in every namespace: ConfigMap ``txmesh-ca-root-cert`` (``mesh-control --kubernetes``).

Injected sidecars mount ConfigMap ``txmesh-ca-root-cert`` (key
``root-cert.pem``) of their namespace as their ``--ca-bundle``
(:mod:`mesh.control.inject.sidecar`).  :class:`RootCertPublisher` keeps it there, as
Istio's istiod keeps ``istio-ca-root-cert``:

- it watches Namespaces and the ConfigMaps named ``txmesh-ca-root-cert``
  that carry its label ``app.kubernetes.io/managed-by: mesh-control`` (field
  and label selector, so it reads no other ConfigMap);
- every namespace except ``kube-system``, ``kube-public`` and
  ``kube-node-lease`` (and those being deleted) gets the ConfigMap with
  ``data: {root-cert.pem: BUNDLE}`` and the label, new namespaces too;
- a ConfigMap deleted, edited (another bundle) or stripped of its label is
  written back; other keys and labels someone added are kept;
- the bundle is the control plane's (``control.ca.bundle_pem()``): a
  mesh-control started with another bundle (a root rotation) brings every
  ConfigMap to it.

Writes go through :class:`~mesh.control.kube.reconcile.Reconciler` (threads, pacing,
idempotent): create, and on 409 AlreadyExists read the object and replace it
only if it is not right yet; a replace with the object's resourceVersion
that gets 409 Conflict reads it again.  Replicas with the same bundle
therefore never write the same content twice, whoever comes first.
"""

from __future__ import annotations

import functools

from mesh.control.kube.reconcile import API_TIMEOUT, ATTEMPTS, Reconciler, TooManyConflicts, api_status, read_object

NAME = "txmesh-ca-root-cert"
KEY = "root-cert.pem"
LABELS = {"app.kubernetes.io/part-of": "txmesh", "app.kubernetes.io/managed-by": "mesh-control"}
SELECTOR = "app.kubernetes.io/managed-by=mesh-control"
#: Namespaces that get no ConfigMap (as Istio skips them).
SKIPPED = frozenset({"kube-system", "kube-public", "kube-node-lease"})


def in_sync(config_map, bundle: str) -> bool:
    """Whether ``config_map`` (a dict, or None) holds ``bundle`` under :data:`KEY` and carries :data:`LABELS`."""
    if config_map is None:
        return False
    labels = (config_map.get("metadata") or {}).get("labels") or {}
    return (config_map.get("data") or {}).get(KEY) == bundle and LABELS.items() <= labels.items()


def wanted(namespace: str, bundle: str, current=None) -> dict:
    """The ConfigMap to write: ``current`` (kept: its resourceVersion, other keys and labels) with the bundle."""
    body = dict(current or {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": NAME,
                                                                                 "namespace": namespace}})
    metadata = body["metadata"] = dict(body["metadata"])
    metadata["labels"] = {**(metadata.get("labels") or {}), **LABELS}
    body["data"] = {**(body.get("data") or {}), KEY: bundle}
    return body


def _terminating(error) -> bool:
    """A create refused because the namespace is being deleted (403 with cause NamespaceTerminating)."""
    return api_status(error) == 403 and "NamespaceTerminating" in str(getattr(error, "body", "") or "")


class RootCertPublisher(Reconciler):
    """ConfigMap ``txmesh-ca-root-cert`` with the trust bundle in every namespace; see the module docstring.

    ``bundle_pem()`` returns the trust bundle (PEM bytes).
    """

    name = "kubernetes:root-cert"
    what = "ConfigMap {key}/" + NAME

    def __init__(self, reactor, api_client, bundle_pem, **kwargs):
        from kubernetes import client

        self._core = client.CoreV1Api(api_client)
        self._bundle_pem = bundle_pem
        super().__init__(reactor, {
            "namespaces": self._core.list_namespace,
            "configmaps": functools.partial(self._core.list_config_map_for_all_namespaces, label_selector=SELECTOR,
                                            field_selector=f"metadata.name={NAME}"),
        }, **kwargs)

    @property
    def bundle(self) -> str:
        """The trust bundle as text."""
        return self._bundle_pem().decode()

    def keys(self):
        return [namespace for (_, namespace), obj in self.caches["namespaces"].objects.items()
                if namespace not in SKIPPED and (obj.get("status") or {}).get("phase") != "Terminating"]

    def state(self, namespace) -> tuple:
        current = self.caches["configmaps"].objects.get((namespace, NAME))
        return in_sync(current, self.bundle), current

    def write(self, namespace, current):
        bundle = self.bundle
        for _ in range(ATTEMPTS):
            if current is None:
                try:
                    self._core.create_namespaced_config_map(namespace, wanted(namespace, bundle),
                                                            _request_timeout=API_TIMEOUT)
                    return "created"
                except Exception as error:
                    if api_status(error) == 404 or _terminating(error):
                        return None  # the namespace is gone or going
                    if api_status(error) != 409:
                        raise
                current = read_object(self._core.read_namespaced_config_map, NAME, namespace)
                continue
            if in_sync(current, bundle):
                return None
            try:
                self._core.replace_namespaced_config_map(NAME, namespace, wanted(namespace, bundle, current),
                                                         _request_timeout=API_TIMEOUT)
                return "updated"
            except Exception as error:
                if api_status(error) not in (404, 409):
                    raise
            current = read_object(self._core.read_namespaced_config_map, NAME, namespace)
        raise TooManyConflicts(f"the ConfigMap changed under each of {ATTEMPTS} writes")
