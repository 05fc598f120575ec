"""Built-in CA backend: sign with the control plane's own CA key."""

from mesh import hookimpl


class BuiltinSigner:
    """``mesh_sign_csr`` with the local :class:`mesh.identity.ca.CertificateAuthority`.

    Registered by the control plane once its CA is loaded, with ``trylast`` so
    that an external CA plugin (Vault, AWS PCA) installed through an entry
    point takes precedence.
    """

    def __init__(self, ca):
        self.ca = ca

    @hookimpl(trylast=True)
    def mesh_sign_csr(self, csr, identity, ttl):
        """Sign locally; returns ``(cert_pem, chain_pem)``."""
        return self.ca.sign(csr, identity, ttl)
