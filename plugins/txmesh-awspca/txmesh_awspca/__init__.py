"""txmesh's AWS Private CA: workload certificates issued by AWS Private CA (ACM PCA).

A plugin of mesh-control, using only the plugin API (:mod:`mesh.api`):

- ``mesh_addoption``: the ``--awspca-...`` options of ``twistd mesh-control`` (:mod:`.settings`);
- ``mesh_configure``: with ``--ca awspca``, check the options and start a :class:`~.ca.PcaCA` service
  (a child of mesh-control's service); with another CA, stay out of signing; in a sidecar, stay idle;
- ``mesh_ca_status``: the CA's status at once (refreshed in the background): ready or why not, and
  its root, the trust bundle every sidecar gets;
- ``mesh_sign_csr``: IssueCertificate and GetCertificate in a worker thread; an unreachable,
  throttling, refusing or not ACTIVE CA is :class:`mesh.api.CAUnavailable` (the CSR gets a 503 with the
  reason, the sidecar retries and keeps serving on its certificate).

It registers through the ``mesh.plugins`` entry point as ``awspca`` (``txmesh_awspca:plugin``).
README.md and docs/identity.md say what to create in AWS.  boto3 is imported only when ``--ca awspca``
selects this CA: every sidecar loads the plugin, none pays for boto3.
"""

from __future__ import annotations

from mesh.api import Config, ExternalCAPlugin

from .settings import OPTIONS, PcaSettings

__version__ = "0.1.0"

#: The plugin API this plugin is written for (:data:`mesh.hookspecs.API_VERSION`).
MESH_API_VERSION = 1

NAME = "awspca"


class AwsPcaPlugin(ExternalCAPlugin):
    """The ``awspca`` plugin: one per process; ``ca`` is the running :class:`~.ca.PcaCA`, or None when
    ``--ca`` selected another CA."""

    MESH_API_VERSION = MESH_API_VERSION
    ca_name = NAME
    options = OPTIONS

    def start_ca(self, config: Config):
        """Check the options and build the CA (a Twisted service)."""
        settings = PcaSettings.from_options(config.option)
        from .ca import PcaCA  # boto3: only in the control plane that selected this CA

        return PcaCA(settings, config.reactor)


#: What the entry point registers.
plugin = AwsPcaPlugin()
