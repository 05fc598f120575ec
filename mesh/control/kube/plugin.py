"""The built-in plugins of ``mesh-control --kubernetes``, one per job so each can be switched off.

All four are in :data:`mesh.plugins.DEFAULT_PLUGINS`.  In ``mesh_configure``
each takes the control plane (``config.service``: its ``kube_client``,
``reactor``, ``ca`` and ``settings``); without ``--kubernetes``, and in a
sidecar, each stays idle.  ``--disable-plugin NAME`` leaves one out.

Two are config sources (``mesh_config_sources``):

- ``builtin.kubernetes_registry``: :class:`mesh.control.kube.registry.RegistrySource`
  (Services, EndpointSlices, Pods -> ServiceEntries);
- ``builtin.kubernetes_crds``: :class:`mesh.control.kube.crds.CRDSource` (txmesh's
  CRDs, and Istio's with ``--istio-crds``); it also adds the Secrets watch
  :class:`mesh.control.kube.secrets.GatewaySecrets` (the Gateways' ``credentialName``).

Two write to the API instead: in ``mesh_configure`` they add a child service
to the control plane (it starts and stops with it):

- ``builtin.kubernetes_root_cert``: :class:`mesh.control.kube.root_cert.RootCertPublisher`
  (the trust-bundle ConfigMap in every namespace);
- ``builtin.kubernetes_webhook_ca``: :class:`mesh.control.kube.webhook_ca.WebhookCABundle`
  (the webhook configuration's caBundle; idle without ``--webhook-port``).

Nothing here imports the ``kubernetes`` package: the control plane made its
client (:func:`mesh.control.kube.client.make_api_client`) before.
"""

from __future__ import annotations

import mesh

REGISTRY_PLUGIN = "builtin.kubernetes_registry"
CRDS_PLUGIN = "builtin.kubernetes_crds"
ROOT_CERT_PLUGIN = "builtin.kubernetes_root_cert"
WEBHOOK_CA_PLUGIN = "builtin.kubernetes_webhook_ca"


class KubernetesPlugin:
    """What the four plugins share: idle unless the process is ``mesh-control --kubernetes``.

    ``control`` is the :class:`~mesh.control.service.ControlService` once
    configured; a subclass does its own setup in :meth:`start`.
    """

    def __init__(self):
        self.control = None

    @mesh.hookimpl
    def mesh_configure(self, config):
        control = config.service if config.role == "control" else None
        if control is None or control.kube_client is None:
            config.set_idle(self, "mesh-control --kubernetes only")
            return
        self.control = control
        self.start(config, control)

    @mesh.hookimpl
    def mesh_unconfigure(self, config):
        self.control = None

    def start(self, config, control) -> None:
        """Set up for ``control`` (nothing by default)."""


class RegistryPlugin(KubernetesPlugin):
    """``builtin.kubernetes_registry``: Services, EndpointSlices and Pods as ServiceEntries."""

    @mesh.hookimpl
    def mesh_config_sources(self, options):
        from mesh.control.kube.registry import RegistrySource
        return RegistrySource(self.control.reactor, self.control.kube_client)


class CRDsPlugin(KubernetesPlugin):
    """``builtin.kubernetes_crds``: txmesh's CRDs (and Istio's with ``--istio-crds``), and the Gateways' Secrets."""

    secret_access = None  # the SubjectAccessReview cache, once started

    @mesh.hookimpl
    def mesh_config_sources(self, options):
        from mesh.control.kube.crds import CRDSource
        return CRDSource(self.control.reactor, self.control.kube_client, istio=bool(options.get("istio_crds")))

    def start(self, config, control) -> None:
        """Also watch Secrets: the gateways' ``credentialName`` certificates (:mod:`mesh.control.kube.secrets`),
        sent to a gateway once a SubjectAccessReview allows its service account (:mod:`.secretaccess`)."""
        from mesh.control.kube.secretaccess import DEFAULT_TTL, SecretAccess
        from mesh.control.kube.secrets import GatewaySecrets
        distributor = control.distributor
        self.secret_access = SecretAccess(control.reactor, control.kube_client, distributor.changed,
                                          ttl=config.option("secret-review-ttl", DEFAULT_TTL))
        distributor.secret_access = self.secret_access
        GatewaySecrets(control.reactor, control.kube_client, distributor.set_credentials).setServiceParent(control)

    @mesh.hookimpl
    def mesh_unconfigure(self, config):
        """Cancel the SubjectAccessReview cache's expiry timers."""
        self.secret_access.stop()
        super().mesh_unconfigure(config)


class RootCertPlugin(KubernetesPlugin):
    """``builtin.kubernetes_root_cert``: the trust-bundle ConfigMap in every namespace."""

    def start(self, config, control) -> None:
        from mesh.control.kube.root_cert import RootCertPublisher
        # the trust bundle of the CA --ca selected, rewritten when it changes (the webhook's caBundle, below,
        # stays the built-in CA's: it signs the webhook's certificate)
        publisher = RootCertPublisher(control.reactor, control.kube_client, control.trust_bundle_pem)
        publisher.setServiceParent(control)
        control.trust_bundle_listeners.append(publisher.settled)


class WebhookCAPlugin(KubernetesPlugin):
    """``builtin.kubernetes_webhook_ca``: the injection webhook configuration's caBundle (with ``--webhook-port``)."""

    def start(self, config, control) -> None:
        settings = control.settings
        if not settings.webhook_port:
            config.set_idle(self, "needs --webhook-port")
            return
        from mesh.control.kube.webhook_ca import WebhookCABundle
        WebhookCABundle(control.reactor, control.kube_client, control.ca.bundle_pem,
                        settings.webhook_config_name).setServiceParent(control)
