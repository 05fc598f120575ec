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
README.md and docs/identity.md say what to create in Vault.
"""

from __future__ import annotations

import sys

from mesh.api import CAStatus, Config, OptionParser, hookimpl

from .ca import NAME, VaultCA
from .settings import OPTIONS, SettingsError, VaultSettings

__version__ = "0.1.0"

#: The plugin API this plugin is written for (:data:`mesh.hookspecs.API_VERSION`).
MESH_API_VERSION = 1

#: What ``mesh_ca_status`` says while another CA is selected.
NOT_SELECTED = CAStatus(NAME, False, False, "not selected: run mesh-control with --ca vault", b"", "")


class VaultPlugin:
    """The ``vault`` plugin: one per process; ``ca`` is the running :class:`VaultCA`, or None when
    ``--ca`` selected another CA."""

    MESH_API_VERSION = MESH_API_VERSION

    def __init__(self):
        self.ca: VaultCA | None = None

    @hookimpl
    def mesh_addoption(self, parser: OptionParser) -> None:
        for option in OPTIONS:
            parser.addoption(option.name, default=option.default, help=option.help, coerce=option.coerce,
                             role="control")

    @hookimpl
    def mesh_configure(self, config: Config) -> None:
        if config.role != "control":
            config.set_idle(self, "control plane only")
            return
        # mesh-control's --ca option (read defensively: None when the core has no such option)
        if config.option("ca") != NAME:
            return
        try:
            settings = VaultSettings.from_options(config.option)
        except SettingsError as error:
            sys.stderr.write(f"mesh-control: {error}\n")
            raise SystemExit(1) from None
        self.ca = VaultCA(settings, config.reactor)
        self.ca.setServiceParent(config.service)

    @hookimpl
    def mesh_unconfigure(self, config: Config) -> None:
        self.ca = None

    @hookimpl
    def mesh_ca_status(self) -> CAStatus:
        return NOT_SELECTED if self.ca is None else self.ca.status

    @hookimpl
    def mesh_sign_csr(self, csr, identity: str, ttl: float):
        return None if self.ca is None else self.ca.sign(csr, identity, ttl)


#: What the entry point registers.
plugin = VaultPlugin()
