"""Admin-port views of the control plane for ``meshctl`` (``/proxies`` rows, ``/resources``).

- :func:`proxy_rows`: the sync-status rows of ``/proxies``, plus what each connected proxy announced
  in its HELLO for operators: its txmesh version and its admin and metrics ports, which
  ``meshctl version``, ``proxy-config NAME``, ``tap NAME`` and ``stat`` use to reach it.
- :class:`ResourcesPage`: ``/resources``, the config resources in force with their ``FILE:LINE``, for
  ``meshctl describe``; answered to loopback clients only, even when ``--admin-address`` opens the
  port to Prometheus.
"""

from __future__ import annotations

import ipaddress
import json

from twisted.web import resource

from mesh.config.loader import resource_document

#: HELLO fields copied to the ``/proxies`` rows, with their JSON type (anything else becomes null).
ANNOUNCED = {"proxy_version": str, "service_account": str, "admin_port": int, "metrics_port": int,
             "inbound_port": int, "app_port": int}


def proxy_rows(distributor) -> list:
    """``distributor.proxy_status()`` rows with the :data:`ANNOUNCED` fields of connected proxies."""
    hellos = {stream.hello["node"]: stream.hello for stream in list(distributor.streams) if stream.hello}
    rows = distributor.proxy_status()
    for row in rows:
        hello = hellos.get(row["node"]) or {}
        for key, kind in ANNOUNCED.items():
            value = hello.get(key)
            row[key] = value if isinstance(value, kind) and not isinstance(value, bool) else None
        if "labels" not in row and isinstance(hello.get("labels"), dict):
            row["labels"] = dict(hello["labels"])
    return rows


class ResourcesPage(resource.Resource):
    """``GET /resources``: ``{"resources": [{"source": "FILE:LINE", "document": {...}}]}``, loopback only.

    :param control: the :class:`mesh.control.service.ControlService` (its ``config_store``, once loaded).
    """

    isLeaf = True

    def __init__(self, control):
        super().__init__()
        self._control = control

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        if not _loopback(request.getClientAddress()):
            request.setResponseCode(403)
            return _json({"error": "/resources answers loopback clients only: run meshctl on the control "
                                   "plane's host, or give meshctl the YAML files with -f"})
        store = getattr(self._control, "config_store", None)
        resources = store.resources if store is not None else []
        return _json({"resources": [{"source": f"{r.file}:{r.line}", "document": resource_document(r)}
                                    for r in resources]})


def _loopback(address) -> bool:
    try:
        return ipaddress.ip_address(getattr(address, "host", "")).is_loopback
    except ValueError:
        return False


def _json(document) -> bytes:
    return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
