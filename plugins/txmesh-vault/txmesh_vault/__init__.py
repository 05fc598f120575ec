"""txmesh's HashiCorp Vault CA: workload certificates signed by Vault's (or OpenBao's) PKI secrets engine.

A plugin of mesh-control, using only the plugin API (:mod:`mesh.api`):

- ``mesh_addoption``: the ``--vault-...`` options of ``twistd mesh-control`` (:mod:`.settings`);
- ``mesh_configure``: with ``--ca vault``, check the options and start a :class:`~.ca.VaultCA` service
  (a child of mesh-control's service); without it, stay out of signing; in a sidecar, stay idle;
- ``mesh_ca_status``: the Vault CA's status at once (refreshed in the background): ready or why not,
  and the roots of every issuer of the mount, the trust bundle every sidecar gets;
- ``mesh_sign_csr``: sign through ``MOUNT/sign/ROLE`` (or ``sign-verbatim``) in a worker thread; a
  sealed, down, slow or refusing Vault is :class:`mesh.api.CAUnavailable` (the CSR gets a 503 with the
  reason, the sidecar retries and keeps serving on its certificate).

It registers through the ``mesh.plugins`` entry point as ``vault`` (``txmesh_vault:plugin``).
README.md and docs/identity.md say what to create in Vault.  hvac (and requests) are imported only
when ``--ca vault`` selects this CA: every sidecar loads the plugin, none pays for them (about 6 MiB).
"""

from __future__ import annotations

from mesh.api import Config, ExternalCAPlugin

from .settings import OPTIONS, VaultSettings

__version__ = "0.1.0"

#: The plugin API this plugin is written for (:data:`mesh.hookspecs.API_VERSION`).
MESH_API_VERSION = 1

NAME = "vault"


class VaultPlugin(ExternalCAPlugin):
    """The ``vault`` plugin: one per process; ``ca`` is the running :class:`VaultCA`, or None when
    ``--ca`` selected another CA."""

    MESH_API_VERSION = MESH_API_VERSION
    ca_name = NAME
    options = OPTIONS

    def start_ca(self, config: Config):
        """Check the options and build the CA (a Twisted service)."""
        settings = VaultSettings.from_options(config.option)
        from .ca import VaultCA  # hvac: only in the control plane that selected this CA

        return VaultCA(settings, config.reactor)


#: What the entry point registers.
plugin = VaultPlugin()
