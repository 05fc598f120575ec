"""Kubernetes Services, EndpointSlices and Pods -> ServiceEntry documents (mesh.control.kube.translate), and
the pure parts of the watch engine (backoff, object cache)."""

import pytest

from mesh.config.compile import Workload, compile_proxy_config
from mesh.config.loader import load_documents
from mesh.config.validate import validate
from mesh.control.kube.translate import port_protocol, portless_external_names, service_entries
from mesh.control.kube.watch import ObjectCache


def svc(name, ports, namespace="shop", cluster_ip="10.96.0.10", **spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": cluster_ip, "ports": ports, **spec}}


def eps(service, endpoints, ports, namespace="shop", name=None):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name or f"{service}-abc", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service}},
            "endpoints": endpoints, "ports": ports}


def endpoint(address, pod=None, ready=None, namespace="shop", **conditions):
    item = {"addresses": [address]}
    if ready is not None or conditions:
        item["conditions"] = {**({"ready": ready} if ready is not None else {}), **conditions}
    if pod:
        item["targetRef"] = {"kind": "Pod", "name": pod, "namespace": namespace}
    return item


def pod(name, labels, account="reviews", namespace="shop"):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"serviceAccountName": account}}


HTTP = [{"name": "http", "port": 9080, "targetPort": 8080, "protocol": "TCP"}]


def entries(services, slices=(), pods=()):
    return {origin: document for origin, document in service_entries(services, slices, pods)}


def test_a_service_becomes_a_mesh_internal_static_service_entry_that_validates_and_compiles():
    pods = [pod("reviews-1", {"app": "reviews", "security.istio.io/tlsMode": "istio"}),
            pod("reviews-2", {"app": "reviews"}, account="other")]
    slices = [eps("reviews", [endpoint("10.0.0.1", "reviews-1"), endpoint("10.0.0.2", "reviews-2", ready=True)],
                  [{"name": "http", "port": 8080, "protocol": "TCP"}])]
    found = entries([svc("reviews", HTTP)], slices, pods)
    document = found["kubernetes:services/shop/reviews"]
    assert document["metadata"]["namespace"] == "shop"
    spec = document["spec"]
    assert spec["hosts"] == ["reviews.shop.svc.cluster.local"] and spec["addresses"] == ["10.96.0.10"]
    assert spec["ports"] == [{"number": 9080, "name": "http", "protocol": "HTTP", "targetPort": 8080}]
    assert (spec["location"], spec["resolution"]) == ("MESH_INTERNAL", "STATIC")
    assert spec["endpoints"] == [
        {"address": "10.0.0.1", "labels": {"app": "reviews", "security.istio.io/tlsMode": "istio"},
         "serviceAccount": "reviews", "ports": {"http": 8080}},
        {"address": "10.0.0.2", "labels": {"app": "reviews"}, "serviceAccount": "other", "ports": {"http": 8080}}]
    loaded = load_documents([document], "test")
    objects, errors = validate(loaded.resources)
    assert loaded.errors == [] and errors == []
    config = compile_proxy_config(objects, Workload("frontend", "shop"))
    cluster = config.clusters["outbound|9080||reviews.shop.svc.cluster.local"]
    identities = {spec.address: spec.identity for spec in cluster.endpoints}
    assert identities == {"10.0.0.1": "spiffe://cluster.local/ns/shop/sa/reviews", "10.0.0.2": None}
    assert {spec.port for spec in cluster.endpoints} == {8080}
    # Kubernetes short names and the ClusterIP route to it
    assert {"reviews", "reviews.shop", "reviews.shop.svc", "10.96.0.10"} <= set(config.routes.exact)


@pytest.mark.parametrize("port,protocol", [
    ({"name": "http"}, "HTTP"), ({"name": "http-web"}, "HTTP"), ({"name": "HTTP2-x"}, "HTTP2"),
    ({"name": "grpc"}, "GRPC"), ({"name": "grpc-web"}, "HTTP"), ({"name": "tcp-db"}, "TCP"),
    ({"name": "https"}, "HTTPS"), ({"name": "mysql"}, "TCP"), ({"name": "redis-x"}, "TCP"), ({"name": "tls"}, "TLS"),
    ({"name": "udp-dns"}, None), ({"appProtocol": "kubernetes.io/wss"}, "HTTPS"),
    ({"name": "web"}, "HTTP"), ({}, "HTTP"), ({"name": "tcp", "appProtocol": "http"}, "HTTP"),
    ({"name": "http", "appProtocol": "grpc"}, "GRPC"), ({"name": "http", "appProtocol": "tcp"}, "TCP"),
    ({"appProtocol": "kubernetes.io/h2c"}, "HTTP2"), ({"name": "http", "appProtocol": "custom.io/x"}, "HTTP"),
    ({"name": "http", "protocol": "UDP"}, None), ({"name": "dns", "protocol": "SCTP"}, None),
    # Istio's wellKnownPorts: TCP, not sniffed, when neither appProtocol nor the name tells the protocol
    ({"port": 3306}, "TCP"), ({"port": 27017, "name": "db"}, "TCP"), ({"port": 25, "appProtocol": "smtp"}, "TCP"),
    ({"port": 53, "name": "dns-tcp"}, "TCP"), ({"port": 53, "name": "dns", "protocol": "UDP"}, None),
    ({"port": 3306, "name": "http-admin"}, "HTTP"), ({"port": 25, "name": "x", "appProtocol": "http"}, "HTTP"),
    ({"port": 5432}, "HTTP"), ({"port": 8080, "name": "mysql"}, "TCP"),
])
def test_protocol_selection_follows_istio(port, protocol):
    assert port_protocol({"port": 80, **port}) == protocol


def test_an_unnamed_well_known_port_is_tcp_with_a_listener_at_the_cluster_ip():
    pods = [pod("mysql-0", {"app": "mysql", "security.istio.io/tlsMode": "istio"}, account="mysql")]
    slices = [eps("mysql", [endpoint("10.0.1.5", "mysql-0")], [{"name": "", "port": 3306, "protocol": "TCP"}])]
    service = svc("mysql", [{"port": 3306, "protocol": "TCP", "targetPort": 3306}], cluster_ip="10.96.0.33",
                  clusterIPs=["10.96.0.33"], type="ClusterIP")
    document = entries([service], slices, pods)["kubernetes:services/shop/mysql"]
    assert document["spec"]["ports"] == [{"number": 3306, "name": "port-3306", "protocol": "TCP", "targetPort": 3306}]
    loaded = load_documents([document], "test")
    objects, errors = validate(loaded.resources)
    assert loaded.errors == [] and errors == []
    config = compile_proxy_config(objects, Workload("frontend", "shop"))
    listener = config.l4.lookup("10.96.0.33", 3306)
    assert listener is not None and listener.name == "10.96.0.33_3306"  # routed as TCP, never sniffed
    assert listener.chains[-1].action.clusters == ("outbound|3306||mysql.shop.svc.cluster.local",)
    cluster = config.clusters["outbound|3306||mysql.shop.svc.cluster.local"]
    assert [(spec.address, spec.port, spec.identity) for spec in cluster.endpoints] == [
        ("10.0.1.5", 3306, "spiffe://cluster.local/ns/shop/sa/mysql")]  # mTLS to the peer sidecar


def external_name(name, external, ports=None, **metadata):
    spec = {"type": "ExternalName", "externalName": external, "sessionAffinity": "None"}
    if ports is not None:
        spec["ports"] = ports
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop", **metadata},
            "spec": spec}


def test_an_external_name_service_is_a_mesh_external_dns_entry_for_its_external_host():
    ports = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
             {"name": "tcp-pg", "port": 5432, "protocol": "TCP", "targetPort": 5432},
             {"name": "udp-x", "port": 53, "protocol": "UDP", "targetPort": 53}]
    service = external_name("db", "mydb.abc.eu-west-1.rds.amazonaws.com", ports,
                            annotations={"networking.istio.io/exportTo": "."})
    document = entries([service])["kubernetes:services/shop/db"]
    assert document["metadata"]["name"] == "kubernetes-db"
    assert document["spec"] == {
        "hosts": ["db.shop.svc.cluster.local"], "location": "MESH_EXTERNAL", "resolution": "DNS",
        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"},  # targetPort means nothing here
                  {"number": 5432, "name": "tcp-pg", "protocol": "TCP"}],
        "endpoints": [{"address": "mydb.abc.eu-west-1.rds.amazonaws.com"}], "exportTo": ["."]}
    loaded = load_documents([document], "test")
    objects, errors = validate(loaded.resources)
    assert loaded.errors == [] and errors == []
    config = compile_proxy_config(objects, Workload("frontend", "shop"))
    for port in (80, 5432):
        cluster = config.clusters[f"outbound|{port}||db.shop.svc.cluster.local"]
        assert cluster.resolution == "DNS"
        assert [(spec.address, spec.port, spec.identity) for spec in cluster.endpoints] == [
            ("mydb.abc.eu-west-1.rds.amazonaws.com", port, None)]  # resolved by the sidecar; no mTLS
    assert {"db", "db.shop", "db.shop.svc", "db.shop.svc.cluster.local"} <= set(config.routes.exact)
    # no ClusterIP: its TCP port takes the port's connections whatever their address, as in Istio
    assert config.l4.lookup("203.0.113.7", 5432).chains[-1].action.clusters == (
        "outbound|5432||db.shop.svc.cluster.local",)


def test_an_external_name_service_without_a_tcp_port_has_no_entry_and_is_reported():
    services = [external_name("bare", "example.com"), external_name("dns", "example.com", [
        {"name": "dns", "port": 53, "protocol": "UDP"}]), external_name("web", "example.com", HTTP)]
    assert list(entries(services)) == ["kubernetes:services/shop/web"]
    assert portless_external_names(services) == [("kubernetes:services/shop/bare", "example.com"),
                                                 ("kubernetes:services/shop/dns", "example.com")]


def test_udp_ports_are_left_out_and_a_service_without_tcp_ports_has_no_entry():
    ports = [{"name": "tcp-db", "port": 5432}, {"name": "udp-dns", "port": 53},
             {"name": "http-api", "port": 80, "targetPort": "web"}]
    found = entries([svc("mixed", ports), svc("dns", [{"name": "dns", "port": 53, "protocol": "UDP"}])])
    assert list(found) == ["kubernetes:services/shop/mixed"]
    assert found["kubernetes:services/shop/mixed"]["spec"]["ports"] == [
        {"number": 5432, "name": "tcp-db", "protocol": "TCP"},
        {"number": 80, "name": "http-api", "protocol": "HTTP"}]  # a named targetPort is resolved per endpoint


def test_headless_services_have_no_address_and_unnamed_ports_get_a_name():
    slices = [eps("db", [endpoint("10.0.0.9")], [{"name": "", "port": 5000}])]
    document = entries([svc("db", [{"port": 80, "targetPort": 5000}], cluster_ip="None")], slices)[
        "kubernetes:services/shop/db"]
    assert "addresses" not in document["spec"]
    assert document["spec"]["ports"] == [{"number": 80, "name": "port-80", "protocol": "HTTP", "targetPort": 5000}]
    assert document["spec"]["endpoints"] == [{"address": "10.0.0.9", "ports": {"port-80": 5000}}]
    assert validate(load_documents([document], "t").resources)[1] == []


def test_only_ready_endpoints_count_unless_not_ready_addresses_are_published():
    pods = [pod(f"p{index}", {"app": "r"}) for index in range(4)]
    slices = [eps("r", [endpoint("10.0.0.1", "p0"), endpoint("10.0.0.2", "p1", ready=False),
                        endpoint("10.0.0.3", "p2", ready=False, serving=True, terminating=True),
                        endpoint("10.0.0.4", "p3", ready=True, serving=True)], [{"name": "http", "port": 8080}])]
    ready = entries([svc("r", HTTP)], slices, pods)["kubernetes:services/shop/r"]["spec"]["endpoints"]
    assert [item["address"] for item in ready] == ["10.0.0.1", "10.0.0.4"]
    published = entries([svc("r", HTTP, publishNotReadyAddresses=True)], slices, pods)
    assert len(published["kubernetes:services/shop/r"]["spec"]["endpoints"]) == 4


def test_endpoints_come_from_every_slice_of_the_service_only_once_and_wait_for_their_pod():
    slices = [eps("r", [endpoint("10.0.0.2", "p2"), endpoint("10.0.0.1", "p1")], [{"name": "http", "port": 1}],
                  name="r-1"),
              eps("r", [endpoint("10.0.0.1", "p1"), endpoint("10.0.0.3", "not-yet-known")],
                  [{"name": "http", "port": 1}], name="r-2"),
              eps("other", [endpoint("10.0.0.7", "p1")], [{"name": "http", "port": 1}]),
              eps("r", [endpoint("10.0.0.8", "p1")], [{"name": "http", "port": 1}], namespace="elsewhere")]
    found = entries([svc("r", HTTP)], slices, [pod("p1", {}), pod("p2", {})])
    assert [item["address"] for item in found["kubernetes:services/shop/r"]["spec"]["endpoints"]] == [
        "10.0.0.1", "10.0.0.2"]


def test_export_to_annotation():
    service = svc("r", HTTP)
    service["metadata"]["annotations"] = {"networking.istio.io/exportTo": ". , team-a"}
    assert entries([service])["kubernetes:services/shop/r"]["spec"]["exportTo"] == [".", "team-a"]


def test_object_cache_replace_drops_what_a_relist_no_longer_has():
    changes = []
    cache = ObjectCache("pods", changes.append)
    a, b = ({"metadata": {"namespace": "ns", "name": name}} for name in "ab")
    cache.replace([a, b])
    cache.apply("DELETED", {"metadata": {"namespace": "ns", "name": "zzz"}})  # unknown: no change
    cache.apply("MODIFIED", {**a, "spec": 1})
    assert cache.synced and len(changes) == 2 and cache.values()[0]["spec"] == 1
    cache.replace([b])
    assert cache.values() == [b] and len(changes) == 3
