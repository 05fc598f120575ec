"""The control plane as a Twisted service: the CA on :15012, admin on :15014.

:class:`ControlService` owns the certificate authority, the token key and the
plugin manager (``mesh_sign_csr`` picks the signer: the built-in CA unless an
external-CA plugin is installed).  It serves its own TLS certificate, issued
by its CA for ``spiffe://<td>/ns/<namespace>/sa/mesh-control`` and renewed at
half its life, so sidecars verify it against the trust bundle like any peer.
With ``--kubernetes`` the CSR endpoint also accepts projected service-account
tokens (:mod:`mesh.control.kube.tokenreview`); with ``--ca-secret`` the CA and the
token key come from a Secret shared by every replica (:mod:`mesh.control.kube.ca_secret`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from cryptography import x509
from twisted.application import internet, service
from twisted.logger import Logger
from twisted.web import resource, server

from mesh import __version__
from mesh.control.admin_views import ResourcesPage, proxy_rows
from mesh.control.csr_api import CSRResource
from mesh.control.distribution import Distributor
from mesh.control.inject.sidecar import DEFAULT_IMAGE
from mesh.control.injector import InjectorService
from mesh.control.kube.client import make_api_client
from mesh.control.kube.webhook_ca import DEFAULT_NAME as DEFAULT_WEBHOOK_CONFIG
from mesh.control.portmux import PortMux
from mesh.control.serving_cert import ServingCertificate
from mesh.control.sources import attach_config
from mesh.identity.agent import make_csr
from mesh.identity.ca import CertificateAuthority
from mesh.identity.credentials import DispatchingVerifier, JoinTokenVerifier
from mesh.identity.spiffe import SpiffeId
from mesh.identity.tls import ServerTLS
from mesh.identity.tokens import load_or_create_key
from mesh.telemetry.control import ControlPlaneMetrics
from mesh.telemetry.exposition import metrics_page
from mesh.webpages import BytesPage, JSONPage, LimitedSite, SiteLimits

log = Logger()


@dataclass
class ControlSettings:
    """Everything ``twistd mesh-control`` was told on its command line."""

    state_dir: str
    config_dir: str = None
    trust_domain: str = "cluster.local"
    namespace: str = "mesh-system"
    address: str = "0.0.0.0"
    port: int = 15012
    admin_port: int = 15014
    admin_address: str = "127.0.0.1"  # 0.0.0.0 lets Prometheus in a cluster scrape /metrics
    workload_cert_ttl: float = 24 * 3600.0
    ca_cert: str = None
    ca_key: str = None
    ca_chain: str = None
    push_debounce: float = 0.1
    registry_grace: float = 5.0
    kubernetes: bool = False  # registry, CRDs and TokenReview from the Kubernetes API (mesh.control.kube)
    kubeconfig: str = None  # None: in-cluster credentials
    istio_crds: bool = False  # also read Istio's own API groups
    ca_secret: str = None  # Kubernetes Secret (in ``namespace``) holding the CA root and key, for HA
    webhook_port: int = 0  # the sidecar-injection webhook (0: off)
    webhook_dns_names: tuple = ()  # its certificate's names; () means mesh-control.<namespace>.svc
    proxy_image: str = DEFAULT_IMAGE  # the image the webhook injects
    webhook_config_name: str = DEFAULT_WEBHOOK_CONFIG  # MutatingWebhookConfiguration whose caBundle is kept


class CSRStats:
    """Counters of signed and rejected CSRs (exported as ``mesh_control_csr_*``)."""

    def __init__(self):
        self.signed_total = 0
        self.rejected_total = {}

    def signed(self):
        self.signed_total += 1

    def rejected(self, reason):
        self.rejected_total[reason] = self.rejected_total.get(reason, 0) + 1


class ControlService(service.MultiService):
    """CA, CSR endpoint and admin port of the control plane."""

    def __init__(self, settings: ControlSettings, plugin_manager, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.settings = settings
        self.plugins = plugin_manager
        self.kube_client = make_api_client(settings.kubeconfig) if settings.kubernetes else None
        if settings.ca_secret:
            from mesh.control.kube.ca_secret import install_ca_secret
            install_ca_secret(self.kube_client, settings.namespace, settings.ca_secret, settings.state_dir,
                              settings.trust_domain)
        self.ca = CertificateAuthority.load_or_create(settings.state_dir, settings.trust_domain, settings.ca_cert,
                                                      settings.ca_key, settings.ca_chain)
        self.identity = SpiffeId(settings.trust_domain, settings.namespace, "mesh-control")
        uri, ttl = self.identity.uri, settings.workload_cert_ttl

        def sign(key):
            return self.ca.sign(x509.load_pem_x509_csr(make_csr(key, uri)), uri, ttl)

        own = ServingCertificate(self.reactor, sign, self.ca.bundle, ttl, f"control plane certificate for {uri}")
        own.setServiceParent(self)
        self.credentials = own.credentials
        self.stats = CSRStats()
        self.config_errors = []  # ConfigError objects of the last load_config
        self.metrics = ControlPlaneMetrics(self)
        verifier = self._credential_verifier()
        root = resource.Resource()
        v1 = resource.Resource()
        root.putChild(b"v1", v1)
        v1.putChild(b"csr", CSRResource(verifier, self._sign, self.ca.bundle_pem, settings.workload_cert_ttl,
                                        settings.workload_cert_ttl, self.stats,
                                        trust_domain=settings.trust_domain))
        site = server.Site(root, timeout=30)
        site.displayTracebacks = False
        # one TLS port: the config stream (magic TXM1, docs/protocol.md) or the CSR API
        self.distributor = Distributor(reactor, self.ca.bundle_pem, self.metrics,
                                       debounce=settings.push_debounce, grace=settings.registry_grace,
                                       state_dir=settings.state_dir, trust_domain=settings.trust_domain)
        internet.SSLServer(settings.port, PortMux(self.distributor.factory, site, reactor),
                           ServerTLS(self.credentials), interface=settings.address).setServiceParent(self)
        admin_root = resource.Resource()
        admin_root.putChild(b"ready", JSONPage(self.readiness))
        admin_root.putChild(b"proxies", JSONPage(lambda: (200, proxy_rows(self.distributor))))
        admin_root.putChild(b"resources", ResourcesPage(self))
        admin_root.putChild(b"metrics", metrics_page(self.metrics.registry))
        ca_pages = resource.Resource()
        admin_root.putChild(b"ca", ca_pages)
        ca_pages.putChild(b"root-cert.pem", BytesPage(self.ca.bundle_pem, b"application/x-pem-file"))
        # loopback unless --admin-address says otherwise (Prometheus in a cluster): limits as for any such port
        admin = LimitedSite(admin_root, SiteLimits(), reactor)
        internet.TCPServer(settings.admin_port, admin, interface=settings.admin_address).setServiceParent(self)
        if settings.webhook_port:
            InjectorService.for_control_plane(self).setServiceParent(self)

    def _credential_verifier(self):
        """Join tokens; with ``--kubernetes`` also projected service-account tokens (TokenReview)."""
        join_tokens = JoinTokenVerifier(load_or_create_key(self.settings.state_dir), self.settings.trust_domain)
        if self.kube_client is None:
            return join_tokens
        from mesh.control.kube.tokenreview import TokenReviewVerifier
        return DispatchingVerifier(join_tokens, TokenReviewVerifier(self.kube_client, self.settings.trust_domain,
                                                                    self.reactor))

    def _sign(self, csr, identity, ttl):
        return self.plugins.hook.mesh_sign_csr(csr=csr, identity=identity, ttl=ttl)

    def set_resources(self, resources) -> list:
        """The config resources to distribute (Resource objects, validated objects or documents).

        Invalid ones are left out and their errors returned; proxies whose
        snapshot changes get a push after the debounce delay.
        """
        return self.distributor.set_resources(resources)

    def load_config(self):
        """Load the config sources (``--config-dir``, plugins) into the per-resource store, and watch them.

        See :mod:`mesh.control.sources` and :mod:`mesh.control.store`: each
        resource is validated alone; an invalid one is rejected (logged, kept
        in ``config_errors``) and its last good version stays in force.
        """
        if self.settings.config_dir and not os.path.isdir(self.settings.config_dir):
            sys.stderr.write(f"mesh-control: --config-dir {self.settings.config_dir} is not a directory; "
                             "create it or pass the directory that holds the YAML files\n")
            raise SystemExit(1)
        from mesh.control.kube.metrics import WatchCollector
        attach_config(self)
        # the Kubernetes sources, and the writers the Kubernetes plugins added as child services
        watching = self.config_sources + [child for child in self if child not in self.config_sources]
        self.metrics.registry.register(WatchCollector(watching))

    def stopService(self):
        """Stop the distributor and the child services, then ``mesh_unconfigure`` the plugins."""
        self.distributor.stop()
        stopped = super().stopService()
        stopped.addCallback(lambda _: self.plugins.unconfigure())
        return stopped

    def readiness(self):
        return 200, {"ready": bool(self.running), "control_plane_version": __version__,
                     "trust_domain": self.settings.trust_domain,
                     "identity": self.identity.uri, "ca_expires_in_s": round(self.ca.expires_in()),
                     "csr_signed": self.stats.signed_total, "csr_rejected": self.stats.rejected_total,
                     "config_errors": [str(error) for error in self.config_errors],
                     "config": self.config_store.summary() if getattr(self, "config_store", None) else None}
