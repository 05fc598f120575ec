"""Built-in CA backend: ``builtin.ca`` signs with the control plane's own CA key."""

from mesh import hookimpl
from mesh.api import SignedCertificate


class BuiltinSigner:
    """``mesh_sign_csr`` with the control plane's :class:`mesh.identity.ca.CertificateAuthority`.

    Registered from :data:`mesh.plugins.DEFAULT_PLUGINS`; ``mesh_configure``
    takes the CA of the control plane (``config.service.ca``), and in a
    sidecar the plugin stays idle.  Its ``mesh_sign_csr`` is ``trylast``, so
    that an external CA plugin (Vault, AWS PCA) installed through an entry
    point takes precedence.
    """

    def __init__(self):
        self.ca = None

    @hookimpl
    def mesh_configure(self, config):
        if config.role != "control":
            config.set_idle(self, "control plane only")
            return
        self.ca = config.service.ca

    @hookimpl
    def mesh_unconfigure(self, config):
        self.ca = None

    @hookimpl(trylast=True)
    def mesh_sign_csr(self, csr, identity, ttl):
        """Sign locally."""
        return SignedCertificate(*self.ca.sign(csr, identity, ttl))
