"""Metrics of the Kubernetes watches and writes of the control plane (``mesh_control_kube_*``), read at scrape time.

- ``mesh_control_kube_lists_total{kind}``: lists of the kind (the first one and every relist, e.g.
  after a 410);
- ``mesh_control_kube_watch_restarts_total{kind}``: watches or lists that failed (then retried with
  backoff);
- ``mesh_control_kube_objects{kind}``: objects of the kind known now;
- ``mesh_control_kube_writes_total{writer, result}``: objects written by mesh-control's writers
  (:mod:`mesh.control.kube.reconcile`: ``kubernetes:root-cert``, ``kubernetes:webhook-ca``), per result
  ``created``, ``updated`` or ``failed``.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class WatchCollector(Collector):
    """The ``mesh_control_kube_*`` families of the watching services among ``services``.

    Those with ``reflectors`` (:class:`~mesh.control.kube.source.WatchedSource`,
    :class:`~mesh.control.kube.reconcile.Reconciler`) count; those with ``writes``
    (a Reconciler) also report their writes.
    """

    def __init__(self, services):
        self._reflectors = [reflector for service in services for reflector in getattr(service, "reflectors", ())]
        self._writers = [service for service in services if hasattr(service, "writes")]

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
        if self._writers:
            writes = CounterMetricFamily("mesh_control_kube_writes", "Kubernetes objects mesh-control wrote to "
                                         "keep them in sync, per writer and result.", labels=["writer", "result"])
            for writer in self._writers:
                for result, count in sorted(writer.writes.items()):
                    writes.add_metric([writer.name, result], count)
            yield writes
