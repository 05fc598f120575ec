"""The injection webhook's ``caBundle``, kept equal to the mesh root (``--kubernetes --webhook-port``).

The API server verifies the webhook's serving certificate (issued by the mesh
CA, :mod:`mesh.control.injector`) with ``webhooks[*].clientConfig.caBundle``
of the MutatingWebhookConfiguration ``--webhook-config-name`` (default
``txmesh-sidecar-injector``, the name in
deploy/base/webhook/mutatingwebhookconfiguration.yaml).
:class:`WebhookCABundle` watches that one object (a ``metadata.name`` field
selector, which also lets RBAC restrict list/watch to it by resourceNames)
and sets every webhook's ``caBundle`` to the base64 trust bundle: at start,
after anyone changes it, and with a new bundle after a restart.

The write is a replace carrying the object's resourceVersion (409 Conflict:
read it again and retry), so a concurrent edit of the other fields is never
lost, and replicas with the same bundle do not write twice.  A configuration
that does not exist is logged once, with what to apply; it is set as soon as
the watch sees it appear.
"""

from __future__ import annotations

import base64
import copy
import functools

from twisted.logger import Logger

from mesh.control.kube.reconcile import API_TIMEOUT, ATTEMPTS, Reconciler, TooManyConflicts, api_status, read_object

log = Logger()

DEFAULT_NAME = "txmesh-sidecar-injector"
KIND = "mutatingwebhookconfigurations"


def with_ca_bundle(configuration: dict, ca_bundle: str) -> dict:
    """A copy of ``configuration`` whose every webhook has ``clientConfig.caBundle`` ``ca_bundle``."""
    patched = copy.deepcopy(configuration)
    for webhook in patched.get("webhooks") or []:
        webhook.setdefault("clientConfig", {})["caBundle"] = ca_bundle
    return patched


class WebhookCABundle(Reconciler):
    """Keeps the caBundle of the MutatingWebhookConfiguration ``name``; see the module docstring.

    ``bundle_pem()`` returns the trust bundle (PEM bytes).
    """

    name = "kubernetes:webhook-ca"
    what = "the caBundle of MutatingWebhookConfiguration {key}"

    def __init__(self, reactor, api_client, bundle_pem, configuration: str = DEFAULT_NAME, **kwargs):
        from kubernetes import client

        self._api = client.AdmissionregistrationV1Api(api_client)
        self._bundle_pem = bundle_pem
        self.configuration = configuration
        self._missing = False
        super().__init__(reactor, {KIND: functools.partial(self._api.list_mutating_webhook_configuration,
                                                           field_selector=f"metadata.name={configuration}")},
                         **kwargs)

    @property
    def ca_bundle(self) -> str:
        """The trust bundle, base64-encoded as ``caBundle`` wants it."""
        return base64.b64encode(self._bundle_pem()).decode("ascii")

    def _current(self):
        return self.caches[KIND].objects.get(("", self.configuration))

    def keys(self):
        return [self.configuration] if self._current() is not None else []

    def state(self, name) -> tuple:
        current = self._current()
        return current is not None and with_ca_bundle(current, self.ca_bundle) == current, current

    def cache_changed(self, cache) -> None:
        """Also say when the configuration is missing (once), and when it appears."""
        super().cache_changed(cache)
        missing = cache.synced and self._current() is None
        if missing and not self._missing and self.reflectors[0].last_error is None:
            log.warn("{name}: MutatingWebhookConfiguration {configuration} does not exist, so the API server cannot "
                     "call the injection webhook; apply deploy/base/webhook/mutatingwebhookconfiguration.yaml "
                     "(kubectl apply -k deploy/base), or pass its name as --webhook-config-name. Its caBundle is "
                     "set as soon as it exists", name=self.name, configuration=self.configuration)
        elif self._missing and not missing:
            log.info("{name}: MutatingWebhookConfiguration {configuration} appeared", name=self.name,
                     configuration=self.configuration)
        self._missing = missing

    def write(self, name, current):
        ca_bundle = self.ca_bundle
        for _ in range(ATTEMPTS):
            if current is None:
                return None  # deleted meanwhile: set when it comes back
            patched = with_ca_bundle(current, ca_bundle)
            if patched == current:
                return None
            try:
                self._api.replace_mutating_webhook_configuration(name, patched, _request_timeout=API_TIMEOUT)
                return "updated"
            except Exception as error:
                if api_status(error) not in (404, 409):
                    raise
            current = read_object(self._api.read_mutating_webhook_configuration, name)
        raise TooManyConflicts(f"the configuration changed under each of {ATTEMPTS} writes")
