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

import sys

from mesh.api import CAStatus, Config, OptionParser, hookimpl

from .settings import OPTIONS, PcaSettings, SettingsError

__version__ = "0.1.0"

#: The plugin API this plugin is written for (:data:`mesh.hookspecs.API_VERSION`).
MESH_API_VERSION = 1

NAME = "awspca"
#: What ``mesh_ca_status`` says while another CA is selected.
NOT_SELECTED = CAStatus(NAME, False, False, "not selected: run mesh-control with --ca awspca", b"", "")


class AwsPcaPlugin:
    """The ``awspca`` plugin: one per process; ``ca`` is the running :class:`~.ca.PcaCA`, or None when
    ``--ca`` selected another CA."""

    MESH_API_VERSION = MESH_API_VERSION

    def __init__(self):
        self.ca = None

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
        # mesh-control's --ca (read defensively: None from a txmesh without the option)
        if config.option("ca") != NAME:
            return
        try:
            settings = PcaSettings.from_options(config.option)
        except SettingsError as error:
            sys.stderr.write(f"mesh-control: {error}\n")
            raise SystemExit(1) from None
        from .ca import PcaCA  # boto3: only in the control plane that selected this CA

        self.ca = PcaCA(settings, config.reactor)
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
plugin = AwsPcaPlugin()
