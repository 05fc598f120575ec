"""A headless Kubernetes Service (``clusterIP: None``) on a TCP port: one outbound listener per pod address,
each going to that pod (Istio's Passthrough service: a listener per instance, ORIGINAL_DST), no shared
``0.0.0.0_PORT`` listener that would capture every destination on the port."""

import ipaddress

from mesh.config.compile import Workload, compile_proxy_config
from mesh.config.loader import load_documents
from mesh.config.resources import HEADLESS_ANNOTATION
from mesh.config.validate import validate
from mesh.control.kube.translate import service_entries

HOST = "kafka.data.svc.cluster.local"
CLUSTER = f"outbound|9092||{HOST}"
PODS = ["10.0.2.1", "10.0.2.2", "10.0.2.3"]


def _kube(cluster_ip="None", extra=(), name="kafka", ports=None):
    ports = ports or [{"name": "tcp-kafka", "port": 9092, "targetPort": 9092}]
    service = {"metadata": {"name": name, "namespace": "data"},
               "spec": {"clusterIP": cluster_ip, "selector": {"app": "kafka"}, "ports": ports}}
    pods = [{"metadata": {"name": f"kafka-{i}", "namespace": "data",
                          "labels": {"app": "kafka", "security.istio.io/tlsMode": "istio"}},
             "spec": {"serviceAccountName": "kafka"}} for i in range(len(PODS))]
    slices = [{"metadata": {"name": f"{name}-a", "namespace": "data", "labels": {"kubernetes.io/service-name": name}},
               "addressType": "IPv4", "ports": [{"name": port.get("name", ""), "port": port["targetPort"]}
                                                 for port in ports],
               "endpoints": [{"addresses": [address], "hostname": f"kafka-{i}", "conditions": {"ready": True},
                              "targetRef": {"kind": "Pod", "name": f"kafka-{i}", "namespace": "data"}}
                             for i, address in enumerate(PODS)]}]
    return [service, *extra], slices, pods


def _compile(services, slices, pods, workload=None, extra_documents=()):
    pairs = service_entries(services, slices, pods)
    loaded = load_documents([document for _, document in pairs] + list(extra_documents), "kubernetes:registry")
    objects, errors = validate(loaded.resources)
    assert loaded.errors == [] and errors == []
    return pairs, compile_proxy_config(objects, workload or Workload("frontend", "shop"))


def _endpoint_of(config, ip, port=9092):
    listener = config.l4.lookup(ip, port)
    if listener is None:
        return None
    chain = listener.chain(ipaddress.ip_address(ip), None)
    return chain.action.clusters, chain.original_dst


def test_a_headless_service_is_marked_and_a_cluster_ip_one_is_not():
    pairs, _ = _compile(*_kube())
    [(_, document)] = pairs
    assert document["metadata"]["annotations"] == {HEADLESS_ANNOTATION: "true"}
    assert document["spec"]["resolution"] == "STATIC" and "addresses" not in document["spec"]
    pairs, _ = _compile(*_kube(cluster_ip="10.96.0.9"))
    assert "annotations" not in pairs[0][1]["metadata"]


def test_each_pod_of_a_headless_tcp_port_gets_its_own_listener_to_itself():
    _, config = _compile(*_kube())
    assert config.l4.by_port == {}  # no shared 0.0.0.0_9092
    assert sorted(config.l4.by_destination) == [(address, 9092) for address in PODS]
    for address in PODS:
        listener = config.l4.lookup(address, 9092)
        assert listener.name == f"{address}_9092"
        assert _endpoint_of(config, address) == ((CLUSTER,), (HOST, address))
    # an external database or any other address on that port is not captured by the headless Service
    assert config.l4.lookup("192.0.2.50", 9092) is None
    # the cluster keeps every pod, with its mTLS identity
    cluster = config.clusters[CLUSTER]
    assert {(spec.address, spec.identity) for spec in cluster.endpoints} == {
        (address, "spiffe://cluster.local/ns/data/sa/kafka") for address in PODS}


def test_a_headless_tls_port_is_per_pod_without_server_names_and_the_proxy_skips_its_own_address():
    ports = [{"name": "tls-kafka", "port": 9093, "targetPort": 9093}]
    me = Workload("kafka-1", "data", inbound=(("10.0.2.2", 9093),))
    _, config = _compile(*_kube(ports=ports), workload=me)
    assert sorted(config.l4.by_destination) == [("10.0.2.1", 9093), ("10.0.2.3", 9093)] and config.l4.by_port == {}
    listener = config.l4.lookup("10.0.2.3", 9093)
    assert listener.tls and [chain.sni for chain in listener.chains] == [None]
    assert listener.chains[0].original_dst == (HOST, "10.0.2.3")


def test_a_virtual_service_tcp_route_applies_on_each_pod_listener():
    other = {"metadata": {"name": "mirror", "namespace": "data"},
             "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "tcp", "port": 9092, "targetPort": 9092}]}}
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "kafka", "namespace": "data"},
          "spec": {"hosts": [HOST], "tcp": [{"match": [{"destinationSubnets": ["10.0.2.3/32"]}],
                                             "route": [{"destination": {"host": "mirror.data.svc.cluster.local"}}]}]}}
    services, slices, pods = _kube(extra=[other])
    _, config = _compile(services, slices, pods, extra_documents=[vs])
    assert _endpoint_of(config, "10.0.2.1") == ((CLUSTER,), (HOST, "10.0.2.1"))
    clusters, _ = _endpoint_of(config, "10.0.2.3")
    assert clusters == ("outbound|9092||mirror.data.svc.cluster.local",)
