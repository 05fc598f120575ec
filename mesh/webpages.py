"""Small twisted.web resources shared by the proxy and control-plane admin ports."""

from __future__ import annotations

import json

from twisted.web import resource, server


class JSONPage(resource.Resource):
    """A GET-only page whose body is ``produce() -> (status, JSON-able)``."""

    isLeaf = True

    def __init__(self, produce):
        super().__init__()
        self._produce = produce

    def render_GET(self, request):
        status, body = self._produce()
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"


class BytesPage(resource.Resource):
    """A GET-only page serving ``produce() -> bytes`` with a content type."""

    isLeaf = True

    def __init__(self, produce, content_type: bytes):
        super().__init__()
        self._produce = produce
        self._content_type = content_type

    def render_GET(self, request):
        request.setHeader(b"content-type", self._content_type)
        return self._produce()


class QuietSite(server.Site):
    """A Site for admin ports: no access log, no tracebacks to clients."""

    noisy = False
    displayTracebacks = False

    def log(self, request):
        """Admin pages are polled often; they are not access-logged."""
