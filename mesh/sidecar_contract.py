"""What the injected pod spec promises the sidecar and the control plane: names both sides must agree on.

The injector (:mod:`mesh.control.inject`) writes these names into a pod; the
sidecar (:mod:`mesh.proxy`) reads them back, and the control plane checks
credentials against them (:mod:`mesh.control.kube.tokenreview`) and labels
registered workloads with them (:mod:`mesh.control.registry`).  Keeping them
here, in a module that imports nothing of ``mesh``, lets each side use them
without importing the other (docs/architecture.md, "Packages and layering").
"""

from __future__ import annotations

# -- ports: Istio's, the defaults of mesh-proxy and mesh-control, and what the injector and meshctl assume -----------

#: The sidecar's admin port (/config_dump, /clusters, /ready...), on 127.0.0.1.
ADMIN_PORT = 15000
#: The sidecar's outbound listener (app -> mesh): where iptables sends the app's connections.
OUTBOUND_PORT = 15001
#: The sidecar's inbound listener (mesh -> app).
INBOUND_PORT = 15006
#: mesh-control's CSR and config port (TLS).
CONTROL_PORT = 15012
#: mesh-control's admin port (/ready, /metrics, /proxies, /ca/root-cert.pem).
CONTROL_ADMIN_PORT = 15014
#: The sidecar's health port (/healthz/ready and the kubelet's rewritten app probes).
HEALTH_PORT = 15021
#: The sidecar's /stats/prometheus port.
METRICS_PORT = 15090
#: Ports iptables never redirects inbound: the sidecar's and the control plane's own (Istio's list, which
#: includes its merged-metrics port 15020, plus 15001).
PROXY_PORTS = (ADMIN_PORT, OUTBOUND_PORT, INBOUND_PORT, CONTROL_PORT, CONTROL_ADMIN_PORT, 15020, HEALTH_PORT,
               METRICS_PORT)

# -- app probes: the injector rewrites them to the sidecar's health port (Istio's scheme) --------------------------

#: The sidecar's environment variable that carries the app's original probes (JSON, keyed by ``/app-health/`` path).
APP_PROBERS_ENV = "TXMESH_APP_PROBERS"
#: The health port's path prefix of a rewritten probe: ``/app-health/<container>/<kind>``.
APP_HEALTH_PREFIX = "/app-health/"
#: Probe field of a container -> the last segment of its ``/app-health/`` path (Istio's names).
PROBE_KINDS = {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}
#: The kubelet's default ``timeoutSeconds`` of a probe.
DEFAULT_TIMEOUT_SECONDS = 1

# -- bootstrap credential: the projected service-account token -----------------------------------------------------

#: The audience of the projected token the injector mounts and the control plane's TokenReview requires.
TOKEN_AUDIENCE = "txmesh"
#: The name of the injected volume that holds that token.
TOKEN_VOLUME = "txmesh-token"

# -- labels ----------------------------------------------------------------------------------------------------------

#: Istio's label saying a workload's sidecar accepts mTLS (value ``istio``).
TLS_MODE_LABEL = "security.istio.io/tlsMode"
