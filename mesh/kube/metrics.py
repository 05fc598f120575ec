"""Metrics of the Kubernetes watches of the control plane (``mesh_control_kube_*``), read at scrape time.

- ``mesh_control_kube_lists_total{kind}``: lists of the kind (the first one and every relist, e.g.
  after a 410);
- ``mesh_control_kube_watch_restarts_total{kind}``: watches or lists that failed (then retried with
  backoff);
- ``mesh_control_kube_objects{kind}``: objects of the kind known now.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mesh.kube.source import WatchedSource


class WatchCollector(Collector):
    """The ``mesh_control_kube_*`` families of the :class:`WatchedSource` objects among ``sources``."""

    def __init__(self, sources):
        self._reflectors = [reflector for source in sources if isinstance(source, WatchedSource)
                            for reflector in source.reflectors]

    def collect(self):
        if not self._reflectors:  # not --kubernetes: no families at all
            return
        lists = CounterMetricFamily("mesh_control_kube_lists", "Lists of a watched Kubernetes kind (the first "
                                    "and every relist).", labels=["kind"])
        restarts = CounterMetricFamily("mesh_control_kube_watch_restarts", "Watches or lists of a Kubernetes "
                                       "kind that failed and were retried with backoff.", labels=["kind"])
        objects = GaugeMetricFamily("mesh_control_kube_objects", "Objects of a watched Kubernetes kind known now.",
                                    labels=["kind"])
        for reflector in self._reflectors:
            lists.add_metric([reflector.kind], reflector.lists)
            restarts.add_metric([reflector.kind], reflector.restarts)
            objects.add_metric([reflector.kind], len(reflector.cache.objects))
        yield lists
        yield restarts
        yield objects
