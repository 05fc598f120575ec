"""The admin port (loopback only): readiness and the effective config.

- ``/ready``: 200 once config is loaded and listeners are up, else 503
- ``/config_dump``: the compiled config in force, as JSON
- ``/clusters``: every cluster with its endpoints, health and load, as JSON
- ``/tap``: live requests as JSON lines (added by :mod:`mesh.telemetry.sidecar`, see
  :mod:`mesh.telemetry.tap_stream`)
"""

from __future__ import annotations

from twisted.web import resource

from mesh.webpages import JSONPage, QuietSite


class AdminSite(QuietSite):
    """twisted.web site for the admin port of one proxy service."""

    def __init__(self, proxy):
        root = resource.Resource()
        root.putChild(b"ready", JSONPage(proxy.readiness))
        root.putChild(b"config_dump", JSONPage(lambda: (200, proxy.config_dump())))
        root.putChild(b"clusters", JSONPage(lambda: (200, proxy.clusters_dump())))
        super().__init__(root, timeout=30)

    def add_page(self, name: bytes, page) -> None:
        """Serve ``page`` at ``/name`` (telemetry adds its pages this way)."""
        self.resource.putChild(name, page)
