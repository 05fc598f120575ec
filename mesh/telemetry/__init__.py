"""Telemetry: Istio's metrics, proxy and control-plane health metrics, the access log.

- :mod:`.istio`: ``builtin.metrics``, Istio's standard request metrics (``istio_*``)
- :mod:`.health`: the sidecar's own health (``mesh_*``), read from live state at scrape time
- :mod:`.control`: the control plane's metrics (``mesh_control_*``)
- :mod:`.accesslog`: ``builtin.accesslog``, one JSON line per request
- :mod:`.tap_stream`: ``builtin.tap``, live requests on the admin port's ``/tap`` (``meshctl tap``)
- :mod:`.peers`: what a sidecar knows about the other side of a request
- :mod:`.guard`: telemetry hooks log their bugs and never raise into the data path
- :mod:`.exposition`: the HTTP endpoints Prometheus scrapes
- :mod:`.sidecar`: the sidecar's metrics port and telemetry settings (the plugins themselves are
  registered from :data:`mesh.plugins.DEFAULT_PLUGINS`, :mod:`mesh.builtin.telemetry`)

docs/telemetry.md lists every metric, label and log field.  Tracing lives in
:mod:`.tracing` (docs/tracing.md).
"""
