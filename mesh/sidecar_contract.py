"""What the injected pod spec promises the sidecar and the control plane: names both sides must agree on.

The injector (:mod:`mesh.control.inject`) writes these names into a pod; the
sidecar (:mod:`mesh.proxy`) reads them back, and the control plane checks
credentials against them (:mod:`mesh.control.kube.tokenreview`) and labels
registered workloads with them (:mod:`mesh.control.registry`).  Keeping them
here, in a module that imports nothing of ``mesh``, lets each side use them
without importing the other (docs/architecture.md, "Packages and layering").
"""

from __future__ import annotations

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
