"""Helpers of the unit tests that route requests through a real compiled config (no sockets, no proxy)."""

from __future__ import annotations

from types import SimpleNamespace

from mesh.builtin.routing import mesh_route
from mesh.config.compile import Workload
from mesh.proxy.context import RequestContext
from mesh.proxy.runtime import OutboundRouter
from tests.harness import config_yaml

#: A ServiceEntry ``server``: VIP 10.96.0.10 port 80, endpoints 10.99.0.2 and 10.99.0.3 on 8080.
SERVER_ENTRY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: server, namespace: default}
spec:
  hosts: [server.default.svc.cluster.local]
  addresses: [10.96.0.10]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  resolution: STATIC
  endpoints:
  - {address: 10.99.0.2}
  - {address: 10.99.0.3}
"""


def compile_yaml(directory, text: str = SERVER_ENTRY):
    """Load, validate and compile the YAML ``text`` (written to ``directory``) for workload default/client."""
    return config_yaml.compile_yaml(directory, text, workload=Workload("client", "default", {}, "client"))


def outbound_router(config, passthrough=None) -> OutboundRouter:
    """An OutboundRouter over ``config`` with the built-in ``mesh_route``; cluster objects are their names."""
    snapshot = SimpleNamespace(config=config, clusters={name: name for name in config.clusters})
    return OutboundRouter(SimpleNamespace(snapshot=snapshot), SimpleNamespace(mesh_route=mesh_route), passthrough)


def captured_request(host, dst=None) -> RequestContext:
    """A request for ``host``; with ``dst``, one that iptables redirected from that ``(ip, port)``."""
    ctx = RequestContext.for_test(host=host)
    if dst is not None:
        ctx.extra["original_dst"] = dst
    return ctx
