"""Export finished spans to Zipkin: v2 JSON, batched, over HTTP POST.

:class:`ZipkinExporter` is a :class:`~mesh.span_export.SpanExporter`
(the bounded queue, the batches, the POSTs in flight, the failures counted and
logged): it adds only the encoding, one JSON array of the spans' ``to_zipkin()``
objects per POST to a Zipkin v2 ``/api/v2/spans`` URL.
"""

from __future__ import annotations

import json

from twisted.web.http_headers import Headers

from mesh.span_export import SpanExporter

_HEADERS = Headers({b"content-type": [b"application/json"], b"user-agent": [b"txmesh-proxy"]})


class ZipkinExporter(SpanExporter):
    """Batches spans (objects with ``to_zipkin() -> dict``) to a Zipkin v2 ``/api/v2/spans`` URL.

    :meth:`describe` names the request counters ``posts`` and ``post_failures``
    (the admin ``/config_dump``'s ``tracing.zipkin``, docs/tracing.md).
    """

    name = "zipkin-exporter"
    what = "Zipkin export"
    method = b"POST"

    def encode(self, batch: list) -> tuple[bytes, Headers]:
        """One JSON array of Zipkin v2 spans."""
        return json.dumps([span.to_zipkin() for span in batch], separators=(",", ":")).encode(), _HEADERS

    def describe(self) -> dict:
        counters = super().describe()
        counters["posts"] = counters.pop("requests")
        counters["post_failures"] = counters.pop("request_failures")
        return {"url": self.url, **counters}
