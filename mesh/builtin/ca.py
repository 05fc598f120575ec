"""Built-in CA backend: ``builtin.ca`` signs with the control plane's own CA key (``--ca builtin``, the default).

Like every CA plugin it reports its CA in ``mesh_ca_status`` (name ``builtin``, ready: the key is in
memory; with ``--ca-workers``, while a CA worker process runs) and answers ``mesh_sign_csr`` only when
``--ca`` selected it; with another CA selected (``--ca vault``) it signs nothing and returns None.
With ``--ca-workers N`` it signs in those worker processes (:mod:`mesh.identity.ca_workers`).
"""

from mesh import hookimpl
from mesh.api import CAStatus, SignedCertificate

NAME = "builtin"


class BuiltinSigner:
    """``mesh_sign_csr`` and ``mesh_ca_status`` for the control plane's :class:`mesh.identity.ca.CertificateAuthority`.

    Registered from :data:`mesh.plugins.DEFAULT_PLUGINS`; ``mesh_configure``
    takes the CA of the control plane (``config.service.ca``) and whether
    ``--ca`` selected it; in a sidecar the plugin stays idle.  Its
    ``mesh_sign_csr`` is ``trylast``, so an external CA plugin answers first
    when it is the one selected.
    """

    def __init__(self):
        self.ca = None
        self.workers = None
        self.selected = False
        self._status = None
        self._not_ready = None

    @hookimpl
    def mesh_configure(self, config):
        if config.role != "control":
            config.set_idle(self, "control plane only")
            return
        self.ca = config.service.ca
        self.workers = config.service.ca_workers
        self.selected = config.option("ca", NAME) == NAME
        # the CA's key and certificates do not change while the process runs: the status neither
        self._status = CAStatus(name=NAME, selected=self.selected, ready=True, reason="",
                                roots_pem=self.ca.bundle_pem(),
                                issuer=f"builtin CA {self.ca.cert.subject.rfc4514_string()}")
        self._not_ready = self._status._replace(
            ready=False, reason="no CA worker process is running (--ca-workers): they are being started again; "
                                "see the control plane's log")

    @hookimpl
    def mesh_unconfigure(self, config):
        self.ca = None
        self.workers = None
        self._status = None
        self._not_ready = None

    @hookimpl
    def mesh_ca_status(self):
        """The built-in CA: ready (with ``--ca-workers``, while a worker runs); its roots are the state
        directory's bundle (root-cert.pem)."""
        if self.workers is not None and not self.workers.ready():
            return self._not_ready
        return self._status

    @hookimpl(trylast=True)
    def mesh_sign_csr(self, csr, identity, ttl):
        """Sign locally, when ``--ca builtin`` (the default) selected this CA."""
        if not self.selected:
            return None
        if self.workers is not None:
            return self.workers.sign(csr, identity, ttl)
        return SignedCertificate(*self.ca.sign(csr, identity, ttl))
