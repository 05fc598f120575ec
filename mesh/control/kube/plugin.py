"""The built-in plugins that make Kubernetes a config source of ``mesh-control --kubernetes``.

Two plugins, so either can be switched off with ``--disable-plugin``:

- ``builtin.kubernetes_registry``: :class:`mesh.control.kube.registry.RegistrySource`
  (Services, EndpointSlices, Pods -> ServiceEntries);
- ``builtin.kubernetes_crds``: :class:`mesh.control.kube.crds.CRDSource` (txmesh's
  CRDs, and Istio's with ``--istio-crds``).

Both implement ``mesh_config_sources(options)`` and return None unless
``options["kubernetes"]`` is set.  They use the control plane's API client
(``ControlService.kube_client``); registered without one, they build it from
``options["kubeconfig"]`` or the in-cluster service account
(:func:`mesh.control.kube.client.make_api_client`, which raises
:class:`~mesh.control.kube.client.KubeConfigError` with what to do when neither
works).  Nothing imports the ``kubernetes`` package before that.

Two more built-ins write to the API instead of reading config from it.  They
hook into no plugin call: they are child services of the control plane
(:func:`control_services`), and ``--disable-plugin NAME`` switches them off
like the others:

- ``builtin.kubernetes_root_cert``: :class:`mesh.control.kube.root_cert.RootCertPublisher`
  (the trust-bundle ConfigMap in every namespace);
- ``builtin.kubernetes_webhook_ca``: :class:`mesh.control.kube.webhook_ca.WebhookCABundle`
  (the webhook configuration's caBundle; only with ``--webhook-port``).
"""

from __future__ import annotations

import mesh
from mesh.control.kube.client import make_api_client

REGISTRY_PLUGIN = "builtin.kubernetes_registry"
CRDS_PLUGIN = "builtin.kubernetes_crds"
ROOT_CERT_PLUGIN = "builtin.kubernetes_root_cert"
WEBHOOK_CA_PLUGIN = "builtin.kubernetes_webhook_ca"


class KubernetesSourcePlugin:
    """One built-in plugin: ``make(reactor, api_client, options)`` builds its source in Kubernetes mode.

    ``api_client`` is the control plane's client; without one, the first
    call makes one from ``options["kubeconfig"]`` (or in-cluster).
    """

    def __init__(self, reactor, make, api_client=None):
        self.reactor = reactor
        self.make = make
        self.api_client = api_client

    @mesh.hookimpl
    def mesh_config_sources(self, options):
        if not options.get("kubernetes"):
            return None
        if self.api_client is None:
            self.api_client = make_api_client(options.get("kubeconfig"))
        return self.make(self.reactor, self.api_client, options)


def _registry_source(reactor, api_client, options):
    from mesh.control.kube.registry import RegistrySource
    return RegistrySource(reactor, api_client)


def _crd_source(reactor, api_client, options):
    from mesh.control.kube.crds import CRDSource
    return CRDSource(reactor, api_client, istio=bool(options.get("istio_crds")))


def register(plugin_manager, reactor, api_client=None) -> None:
    """Register both plugins (unless registered already or disabled with ``--disable-plugin``)."""
    for name, make in ((REGISTRY_PLUGIN, _registry_source), (CRDS_PLUGIN, _crd_source)):
        if plugin_manager.get_plugin(name) is None and not plugin_manager.is_blocked(name):
            plugin_manager.register(KubernetesSourcePlugin(reactor, make, api_client), name=name)


def control_services(control) -> list:
    """The writing services of a ``--kubernetes`` :class:`~mesh.control.service.ControlService` not disabled.

    None without ``--kubernetes``; the webhook's caBundle only with ``--webhook-port``.
    """
    settings = control.settings
    if control.kube_client is None:
        return []
    services = []
    if not control.plugins.is_blocked(ROOT_CERT_PLUGIN):
        from mesh.control.kube.root_cert import RootCertPublisher
        services.append(RootCertPublisher(control.reactor, control.kube_client, control.ca.bundle_pem))
    if settings.webhook_port and not control.plugins.is_blocked(WEBHOOK_CA_PLUGIN):
        from mesh.control.kube.webhook_ca import WebhookCABundle
        services.append(WebhookCABundle(control.reactor, control.kube_client, control.ca.bundle_pem,
                                        settings.webhook_config_name))
    return services
