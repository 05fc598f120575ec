"""Datadog Autodiscovery annotations for an injected pod: ``meshctl inject --datadog``, or the pod's
``mesh.txmesh.io/datadog: "true"`` (which the webhook honours too).

With them, a Datadog agent on the node (Agent 7.36+, "AD annotations v2")

- runs its OpenMetrics check against the sidecar's ``/stats/prometheus``
  (``ad.datadoghq.com/txmesh-proxy.checks``): Istio's ``istio_*`` and the
  sidecar's ``mesh_*`` metrics, under the namespace ``txmesh``;
- tails the sidecar container's log (``ad.datadoghq.com/txmesh-proxy.logs``)
  with source ``envoy``, the source Datadog documents for Istio's sidecar: its
  log pipeline parses the JSON access log, whose fields are Istio's; the
  service is the workload's name.

Annotations the pod already has under those names are left as they are.
docs/telemetry.md, "Datadog", says how to use them.
"""

from __future__ import annotations

import json

#: The pod annotation that asks for the Datadog annotations (``"false"`` refuses them even with --datadog).
DATADOG_ANNOTATION = "mesh.txmesh.io/datadog"
#: The OpenMetrics check's namespace: the metrics are ``txmesh.istio_requests.count`` and so on.
METRICS_NAMESPACE = "txmesh"
#: The metric names (regular expressions) the check keeps.
METRICS = ("istio_.*", "mesh_.*")
#: The log source Datadog documents for Istio's (Envoy) sidecar access logs.
LOG_SOURCE = "envoy"


def wanted(annotations: dict, default: bool) -> bool:
    """Whether the pod gets the annotations: its ``mesh.txmesh.io/datadog``, else ``default`` (--datadog)."""
    value = str(annotations.get(DATADOG_ANNOTATION, "")).strip().lower()
    if value in ("true", "yes", "y", "1", "on"):
        return True
    if value in ("false", "no", "n", "0", "off"):
        return False
    return default


def autodiscovery_annotations(container: str, metrics_port: int, service: str) -> dict:
    """The ``ad.datadoghq.com/<container>.checks`` and ``.logs`` annotations (JSON values)."""
    check = {"openmetrics": {"init_config": {}, "instances": [{
        "openmetrics_endpoint": f"http://%%host%%:{metrics_port}/stats/prometheus",
        "namespace": METRICS_NAMESPACE,
        "metrics": list(METRICS),
    }]}}
    logs = [{"source": LOG_SOURCE, "service": service}]
    return {f"ad.datadoghq.com/{container}.checks": json.dumps(check, separators=(",", ":")),
            f"ad.datadoghq.com/{container}.logs": json.dumps(logs, separators=(",", ":"))}
