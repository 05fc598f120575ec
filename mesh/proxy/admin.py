"""The admin port (loopback only): readiness and the effective config.

- ``/ready``: 200 once config is loaded and listeners are up, else 503
- ``/config_dump``: the compiled config in force, as JSON
- ``/clusters``: every cluster with its endpoints, health and load, as JSON
"""

from __future__ import annotations

import json

from twisted.web import resource, server


class _JSONPage(resource.Resource):
    isLeaf = True

    def __init__(self, produce):
        super().__init__()
        self._produce = produce

    def render_GET(self, request):
        status, body = self._produce()
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"


class AdminSite(server.Site):
    """twisted.web site for the admin port of one proxy service."""

    def __init__(self, proxy):
        root = resource.Resource()
        root.putChild(b"ready", _JSONPage(proxy.readiness))
        root.putChild(b"config_dump", _JSONPage(lambda: (200, proxy.config_dump())))
        root.putChild(b"clusters", _JSONPage(lambda: (200, proxy.clusters_dump())))
        super().__init__(root)
        self.noisy = False
        self.displayTracebacks = False

    def log(self, request):
        """No access log for the admin port."""
