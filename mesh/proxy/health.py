"""The sidecar's health port (Istio's 15021): ``GET /healthz/ready`` and the app's probes, for the kubelet.

The admin port (15000) stays on 127.0.0.1, which the kubelet's httpGet probes
(sent to the pod address) cannot reach; this port answers on the inbound
(pod) address instead, and serves nothing but readiness:

- ``200 ready`` when the admin port's ``/ready`` is 200 (certificate and
  config in force, not draining);
- ``503`` with the reason as one line of text otherwise, e.g. ``not ready:
  waiting for the workload certificate (last error: ...)``.

It also answers ``/app-health/<container>/<livez|readyz|startupz>``, the app
probes the injector rewrote (:mod:`mesh.proxy.app_prober`): the sidecar runs
the recorded probe against the app and answers with its outcome.  Those do
not depend on the sidecar's own readiness, nor change it.

It is reachable from other hosts, so it has tight :class:`~mesh.webpages.SiteLimits`:
32 connections, 8 KiB per request, ``--header-timeout`` for a request to
arrive (408 beyond), 30 s idle.  A health port that is taken is logged and the
sidecar keeps serving traffic (as with the metrics port).
"""

from __future__ import annotations

from twisted.web import resource

from mesh.proxy.app_prober import AppHealthPage, AppProber
from mesh.webpages import LimitedSite, OptionalServer, SiteLimits

HEALTH_PATH = (b"healthz", b"ready")


def readiness_text(status: int, body: dict) -> str:
    """One line for a person reading a probe failure: ``ready``, or ``not ready: <reason> (last error: ...)``."""
    if status == 200:
        return "ready"
    text = f"not ready: {body['reason']}"
    if body.get("last_error"):
        text += f" (last error: {body['last_error']})"
    return text


class ReadyPage(resource.Resource):
    """``GET /healthz/ready``: the proxy's readiness as a status code and a line of text."""

    isLeaf = True

    def __init__(self, readiness):
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request):
        status, body = self._readiness()
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return readiness_text(status, body).encode() + b"\n"


class HealthServer(OptionalServer):
    """Serves ``/healthz/ready`` for ``proxy`` on ``interface:port``, and ``app_probes`` against ``app_address``.

    ``app_probes`` maps ``/app-health/...`` paths to
    :class:`~mesh.proxy.app_probes.AppProbe` (``--app-probers``).
    """

    def __init__(self, reactor, proxy, port: int, interface: str, request_timeout: float,
                 app_probes: dict, app_address: str):
        root = resource.Resource()
        healthz = resource.Resource()
        root.putChild(HEALTH_PATH[0], healthz)
        healthz.putChild(HEALTH_PATH[1], ReadyPage(proxy.readiness))
        root.putChild(b"app-health", AppHealthPage(AppProber(reactor, app_address), app_probes))
        site = LimitedSite(root, SiteLimits(request_timeout=request_timeout), reactor=reactor)
        super().__init__(reactor, site, port, interface, "health checks", "--health-port")
