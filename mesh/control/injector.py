"""The sidecar-injection webhook inside ``twistd mesh-control`` (``--webhook-port``, Istio's 15017).

:class:`InjectorService` serves :func:`mesh.control.webhook.webhook_site`
(``POST /inject``, ``GET /healthz``) over TLS on the control plane's
``--address``.  Its serving certificate is issued by the mesh CA for the DNS
names the API server calls it by (``--webhook-dns-names``, by default
``mesh-control.<namespace>.svc``), with a key that never leaves memory, and is
renewed at half its life (``--workload-cert-ttl``, as the control plane's own
certificate): new connections get the new certificate, open ones keep theirs.
The API server trusts it through the webhook's ``caBundle``, which is the
mesh root (``STATE/root-cert.pem``, or the admin port's ``/ca/root-cert.pem``);
with two replicas, each issues its own certificate from the shared CA.

The sidecars it injects get ``--control FIRST_DNS_NAME:PORT`` (the same
Service serves the webhook and the CA/config port), the control plane's
trust domain and ``--proxy-image``.
"""

from __future__ import annotations

from twisted.application import internet, service

from mesh.control.inject.sidecar import InjectSettings
from mesh.control.serving_cert import ServingCertificate
from mesh.control.webhook import webhook_site
from mesh.identity.tls import ServerTLS


def default_dns_names(namespace: str) -> tuple:
    """The name the API server calls the webhook by: Service ``mesh-control`` in ``namespace``."""
    return (f"mesh-control.{namespace}.svc",)


class InjectorService(service.MultiService):
    """The webhook's TLS port, with a mesh-CA certificate for ``dns_names`` renewed at half life."""

    def __init__(self, reactor, ca, port: int, interface: str, dns_names, ttl: float, inject: InjectSettings):
        super().__init__()
        self.dns_names = tuple(dns_names)
        # issued now, before the port opens: every connection gets a certificate
        certificate = ServingCertificate(
            reactor, lambda key: ca.sign_serving(key.public_key(), self.dns_names, ttl), ca.bundle, ttl,
            f"injection webhook certificate for {','.join(self.dns_names)}")
        certificate.setServiceParent(self)
        self.credentials = certificate.credentials
        internet.SSLServer(port, webhook_site(inject, reactor), ServerTLS(self.credentials),
                           interface=interface).setServiceParent(self)

    @classmethod
    def for_control_plane(cls, control) -> InjectorService:
        """The injector of a :class:`~mesh.control.service.ControlService`, from its settings and CA."""
        settings = control.settings
        names = settings.webhook_dns_names or default_dns_names(settings.namespace)
        inject = InjectSettings(image=settings.proxy_image, control=f"{names[0]}:{settings.port}",
                                trust_domain=settings.trust_domain)
        return cls(control.reactor, control.ca, settings.webhook_port, settings.address, names,
                   settings.workload_cert_ttl, inject)
