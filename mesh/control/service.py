"""The control plane as a Twisted service: the CA on :15012, admin on :15014.

:class:`ControlService` owns the built-in certificate authority, the token key
and the plugin manager.  ``--ca NAME`` selects the CA that signs workloads
(:mod:`mesh.control.ca_select`): the built-in one (the default) or an external
CA a plugin provides (Vault, AWS PCA); ``mesh_sign_csr`` reaches it, and its
roots are the trust bundle every sidecar gets.  The control plane serves its
own TLS certificate, issued by that same CA for
``spiffe://<td>/ns/<namespace>/sa/mesh-control`` and renewed at half its life,
so sidecars verify it against the trust bundle like any peer; the CSR/config
port opens once it is issued.  (The injection webhook's certificate comes from
the built-in CA whatever ``--ca`` says: the Kubernetes API server trusts it
through the webhook's caBundle, sidecars never do.)
With ``--kubernetes`` the CSR endpoint also accepts projected service-account
tokens (:mod:`mesh.control.kube.tokenreview`); with ``--ca-secret`` the CA and the
token key come from a Secret shared by every replica (:mod:`mesh.control.kube.ca_secret`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from cryptography import x509
from OpenSSL import SSL
from twisted.application import internet, service
from twisted.logger import Logger
from twisted.web import resource

from mesh import __version__
from mesh.control.admin_views import ResourcesPage, proxy_rows
from mesh.control.ca_select import CAMonitor, ask_plugins
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
from mesh.identity.ca import TRUST_BUNDLE, CertificateAuthority
from mesh.identity.ca_workers import CAWorkers, worker_argv
from mesh.identity.credentials import DispatchingVerifier, JoinTokenVerifier
from mesh.identity.csr import check_csr
from mesh.identity.files import write_public
from mesh.identity.spiffe import SpiffeId
from mesh.identity.tls import ServerTLS
from mesh.identity.tokens import load_or_create_key
from mesh.telemetry.control import ControlPlaneMetrics
from mesh.telemetry.exposition import metrics_page
from mesh.webpages import BytesPage, JSONPage, LimitedSite, QuietSite, SiteLimits

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
    ca: str = "builtin"  # the CA that signs workloads: builtin, or one a plugin provides (vault, awspca)
    ca_status_interval: float = 5.0  # seconds between two mesh_ca_status polls
    ca_cert: str = None
    ca_key: str = None
    ca_chain: str = None
    ca_workers: int = 0  # CA worker processes (mesh.identity.ca_workers); 0: CSRs are checked and signed here
    push_debounce: float = 0.1
    push_max_delay: float = 1.0  # a push at most this long after a change, even while changes keep coming
    registry_grace: float = 5.0
    kubernetes: bool = False  # registry, CRDs and TokenReview from the Kubernetes API (mesh.control.kube)
    kubeconfig: str = None  # None: in-cluster credentials
    istio_crds: bool = False  # also read Istio's own API groups
    ca_secret: str = None  # Kubernetes Secret (in ``namespace``) holding the CA root and key, for HA
    webhook_port: int = 0  # the sidecar-injection webhook (0: off)
    webhook_dns_names: tuple = ()  # its certificate's names; () means mesh-control.<namespace>.svc
    proxy_image: str = DEFAULT_IMAGE  # the image the webhook injects
    webhook_config_name: str = DEFAULT_WEBHOOK_CONFIG  # MutatingWebhookConfiguration whose caBundle is kept


class IdleServerTLS(ServerTLS):
    """:class:`~mesh.identity.tls.ServerTLS` whose connections free OpenSSL's buffers while idle.

    The control plane holds one mostly idle config stream per proxy; ``SSL_MODE_RELEASE_BUFFERS``
    (nginx sets it too) saves about 30 KiB per connection (docs/performance.md, control plane).
    """

    _prepared = None  # the last context given the mode

    def serverConnectionForTLS(self, tlsProtocol):
        context = self.store.current.server_context
        if context is not self._prepared:  # a new context (first use, or the certificate was renewed)
            self._prepared = context
            try:
                context.set_mode(SSL.MODE_RELEASE_BUFFERS)  # adds to the context's modes
            except ValueError:  # pyOpenSSL: another port made a connection with it first; it keeps its buffers
                log.info("control plane TLS context already in use: its connections keep their idle buffers")
        return super().serverConnectionForTLS(tlsProtocol)


#: The results of ``mesh_ca_csr_total{ca,result}``.
CSR_RESULTS = ("signed", "unavailable", "rejected", "error")


class CSRStats:
    """What the CSR endpoint counts: signed and rejected CSRs (``mesh_control_csr_*``, read at scrape time),
    every result and the signing latency by CA (``mesh_ca_csr_total``, ``mesh_ca_csr_duration_seconds``).

    :param metrics: the :class:`~mesh.telemetry.control.ControlPlaneMetrics` (None: counters only).
    :param ca: the CA ``--ca`` selected, the ``ca`` label.
    """

    def __init__(self, metrics=None, ca: str = "builtin"):
        self.signed_total = 0
        self.rejected_total = {}
        self._results = {}
        self._latency = None
        if metrics is not None:  # children bound once: nothing is looked up per CSR
            self._results = {result: metrics.ca_csr.labels(ca, result) for result in CSR_RESULTS}
            self._latency = metrics.ca_csr_duration.labels(ca)

    def signed(self):
        self.signed_total += 1
        self._count("signed")

    def rejected(self, reason, status: int = 400):
        """A CSR refused before it reached the CA: 4xx (``rejected``) or 503 (credential not verified now)."""
        self.rejected_total[reason] = self.rejected_total.get(reason, 0) + 1
        self._count("unavailable" if status == 503 else "rejected")

    def unavailable(self):
        """The CA could not sign now (``CAUnavailable``): 503."""
        self._count("unavailable")

    def error(self):
        """Signing failed with an unexpected error: 500."""
        self._count("error")

    def signing_took(self, seconds: float):
        """The CA answered (or failed) after ``seconds``."""
        if self._latency is not None:
            self._latency.observe(seconds)

    def _count(self, result):
        counter = self._results.get(result)
        if counter is not None:
            counter.inc()


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
        # the built-in CA; with another --ca it signs only the webhook's certificate (mesh.control.injector)
        self.ca = CertificateAuthority.load_or_create(settings.state_dir, settings.trust_domain, settings.ca_cert,
                                                      settings.ca_key, settings.ca_chain, write_bundle=False)
        #: CSR checks and built-in signing in worker processes (--ca-workers), started before the own certificate
        self.ca_workers = None
        if settings.ca_workers:
            self.ca_workers = CAWorkers(reactor, worker_argv(settings.state_dir, settings.trust_domain,
                                                             settings.ca_cert, settings.ca_key, settings.ca_chain),
                                        settings.ca_workers, self.ca.chain_pem())
            self.ca_workers.setServiceParent(self)
        self.identity = SpiffeId(settings.trust_domain, settings.namespace, "mesh-control")
        self.config_errors = []  # ConfigError objects of the last load_config
        self.metrics = ControlPlaneMetrics(self)
        self.stats = CSRStats(self.metrics, settings.ca)
        #: called with no argument after the trust bundle changed (e.g. the Kubernetes ConfigMap writer)
        self.trust_bundle_listeners = []
        self.ca_monitor = CAMonitor(reactor, settings.ca, self._ca_statuses, settings.ca_status_interval,
                                    self._trust_bundle_changed, self.metrics.ca_ready.labels(settings.ca))
        self.ca_monitor.setServiceParent(self)
        # issued by the selected CA when the service starts (mesh_sign_csr: plugins are configured by then)
        self.own_certificate = ServingCertificate(self.reactor, self._sign_own, (), settings.workload_cert_ttl,
                                                  f"control plane certificate for {self.identity.uri}",
                                                  issue_now=False)
        self.own_certificate.setServiceParent(self)
        self.credentials = self.own_certificate.credentials
        verifier = self._credential_verifier()
        root = resource.Resource()
        v1 = resource.Resource()
        root.putChild(b"v1", v1)
        v1.putChild(b"csr", CSRResource(verifier, self._sign, self.trust_bundle_pem, settings.workload_cert_ttl,
                                        settings.workload_cert_ttl, self.stats,
                                        trust_domain=settings.trust_domain, ca_issuer=self._ca_issuer,
                                        check=self.ca_workers.csr_check(settings.ca == "builtin") if self.ca_workers
                                        else check_csr))
        # no access log (the CSR endpoint logs what it signs and refuses), no form parsing of the JSON body
        site = QuietSite(root, timeout=30, parsePOSTFormSubmission=False)
        # one TLS port: the config stream (magic TXM1, docs/protocol.md) or the CSR API
        self.distributor = Distributor(reactor, self.trust_bundle_pem, self.metrics,
                                       debounce=settings.push_debounce, max_delay=settings.push_max_delay,
                                       grace=settings.registry_grace,
                                       state_dir=settings.state_dir, trust_domain=settings.trust_domain)
        # opened once the control plane's own certificate is issued (startService)
        self._tls_port = internet.SSLServer(settings.port, PortMux(self.distributor.factory, site, reactor),
                                            IdleServerTLS(self.credentials), interface=settings.address)
        admin_root = resource.Resource()
        admin_root.putChild(b"ready", JSONPage(self.readiness))
        admin_root.putChild(b"proxies", JSONPage(lambda: (200, proxy_rows(self.distributor))))
        admin_root.putChild(b"resources", ResourcesPage(self))
        admin_root.putChild(b"metrics", metrics_page(self.metrics.registry))
        ca_pages = resource.Resource()
        admin_root.putChild(b"ca", ca_pages)
        ca_pages.putChild(b"root-cert.pem", BytesPage(self.trust_bundle_pem, b"application/x-pem-file"))
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

    # -- the CA --ca selected ------------------------------------------------------------------
    def select_ca(self) -> None:
        """Check that a plugin reports the CA ``--ca`` names and take its roots; once, after ``mesh_configure``.

        :raises mesh.control.ca_select.CASelectionError: naming the CAs available and what to install.
        """
        self.ca_monitor.select()

    def _ca_statuses(self) -> tuple:
        """``(statuses, errors)``: ``mesh_ca_status`` of every plugin, each asked alone."""
        return ask_plugins(self.plugins.hook.mesh_ca_status)

    def trust_bundle_pem(self) -> bytes:
        """The trust bundle sidecars get: the selected CA's roots (PEM)."""
        return self.ca_monitor.bundle_pem

    def _ca_issuer(self) -> str:
        return self.ca_monitor.issuer

    def _trust_bundle_changed(self, bundle_pem: bytes, roots: list) -> None:
        """The selected CA reported other roots: write STATE/root-cert.pem, trust them, push them to the sidecars."""
        write_public(os.path.join(self.settings.state_dir, TRUST_BUNDLE), bundle_pem)
        self.own_certificate.set_bundle(roots)
        self.distributor.changed()
        for listener in self.trust_bundle_listeners:
            listener()

    def _sign(self, csr, identity, ttl):
        return self.plugins.hook.mesh_sign_csr(csr=csr, identity=identity, ttl=ttl)

    def _sign_own(self, key):
        """The control plane's own certificate, from the selected CA like a workload's."""
        uri = self.identity.uri
        return self._sign(x509.load_pem_x509_csr(make_csr(key, uri)), uri, self.settings.workload_cert_ttl)

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

    def startService(self):
        """Start the child services; the CSR/config port opens once the control plane's certificate is issued."""
        super().startService()
        self.own_certificate.issued.addCallback(self._open_tls_port)

    def _open_tls_port(self, _credentials):
        if self.running and self._tls_port.parent is None:
            self._tls_port.setServiceParent(self)

    def stopService(self):
        """Stop the distributor and the child services, then ``mesh_unconfigure`` the plugins."""
        self.distributor.stop()
        stopped = super().stopService()
        stopped.addCallback(lambda _: self.plugins.unconfigure())
        return stopped

    def not_ready_reason(self) -> str | None:
        """Why the control plane cannot serve sidecars now (the selected CA, its own certificate), or None."""
        monitor = self.ca_monitor
        if not monitor.ready:
            return f"CA {monitor.name!r} not ready: {monitor.reason}"
        if self.credentials.current is None:
            return f"the control plane's own certificate is not issued yet by CA {monitor.name!r}"
        if not self.running:
            return "starting"
        return None

    def readiness(self):
        """``/ready``: 200 when ready, else 503 with ``reason``; the CA, CSR counts and config state either way."""
        reason = self.not_ready_reason()
        monitor = self.ca_monitor
        return (200 if reason is None else 503), {
            "ready": reason is None, "reason": reason, "control_plane_version": __version__,
            "trust_domain": self.settings.trust_domain,
            "identity": self.identity.uri, "ca_expires_in_s": round(self.ca.expires_in()),
            "ca": {"name": monitor.name, "ready": monitor.ready, "reason": monitor.reason or None,
                   "issuer": monitor.issuer, "roots": monitor.bundle_pem.count(b"-----BEGIN CERTIFICATE-----")},
            "csr_signed": self.stats.signed_total, "csr_rejected": self.stats.rejected_total,
            "config_errors": [str(error) for error in self.config_errors],
            "config": self.config_store.summary() if getattr(self, "config_store", None) else None}
