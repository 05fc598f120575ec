"""The ingress gateway (``twistd mesh-proxy --gateway``) in front of two mesh services, as in Istio's
bookinfo "Getting Started" and its "Ingress Gateways" and "Secure Gateways" tasks.

One control plane signs the certificates of the proxies in namespace ``shop``: the sidecars of
``productpage`` and ``details`` (each before a demo app) and the gateway (``--label
istio=ingressgateway``), which calls them over mesh mTLS.  They read the config directory the
control plane serves too; a second gateway gets it from the control plane.  The Gateway has, each
mapped to a free local port with ``--gateway-port``:

- ``http`` (8080, hosts ``*``): the bookinfo VirtualService (``/productpage``, ``/static`` to
  productpage, ``/api/v1/products`` to details);
- ``https`` (8443, ``bookinfo.com``, SIMPLE) and ``mutual`` (8444, MUTUAL): the same routes over TLS
  with a test CA's certificate;
- ``redirect`` (8081, ``secure.com``, httpsRedirect);
- ``hosted`` (8082, ``hosted.com`` and the details service's name): a VirtualService bound to the
  gateway for hosted.com, and details' own VirtualService, which names no gateway;
- ``tcp`` (31400, TCP, as Istio's TCP traffic shifting task): a ``tcp`` route to ``echo``, a TCP echo
  server behind its sidecar.
"""

from __future__ import annotations

import re

import pytest

from tests.harness import curl, free_port, wait_for
from tests.harness.certs import ScratchCA
from tests.integration.test_distribution_support import ControlledProxy, proxies
from tests.integration.test_identity_support import authorization_policy, mesh_endpoint, spiffe, xfcc
from tests.integration.test_proxy_support import service_entry, write_config
from tests.integration.test_tcp_routes import TcpPeers, exchange

NS = "shop"
PORTS = {"http": 8080, "https": 8443, "mutual": 8444, "credential": 8445, "redirect": 8081, "hosted": 8082,
         "extra": 9090, "tcp": 31400}
ECHO_PORT = 9000
NETWORKING = "networking.istio.io/v1"


def gateway_resource(cert, key, ca, extra=None, hello=()) -> dict:
    """The bookinfo Gateway; ``extra`` (None: absent) is the protocol of one more server, on port 9090;
    ``hello`` the certificate and key of a second HTTPS server on the port of ``https``, for hello.com."""
    def server(name, protocol, hosts, tls=None):
        entry = {"port": {"number": PORTS[name], "name": name, "protocol": protocol}, "hosts": hosts}
        if tls is not None:
            entry["tls"] = tls
        return entry

    files = {"serverCertificate": str(cert), "privateKey": str(key)}
    return {"apiVersion": "networking.istio.io/v1beta1", "kind": "Gateway",
            "metadata": {"name": "bookinfo-gateway", "namespace": NS},
            "spec": {"selector": {"istio": "ingressgateway"}, "servers": [
                server("http", "HTTP", ["*"]),
                server("https", "HTTPS", ["bookinfo.com"], {"mode": "SIMPLE", **files}),
                {"port": {"number": PORTS["https"], "name": "https-hello", "protocol": "HTTPS"}, "hosts": ["hello.com"],
                 "tls": {"mode": "SIMPLE", "serverCertificate": str(hello[0]), "privateKey": str(hello[1])}},
                server("mutual", "HTTPS", ["bookinfo.com"], {"mode": "MUTUAL", **files, "caCertificates": str(ca)}),
                server("credential", "HTTPS", ["bookinfo.com"], {"mode": "SIMPLE", "credentialName": "bookinfo-tls"}),
                server("redirect", "HTTP", ["secure.com"], {"httpsRedirect": True}),
                server("hosted", "HTTP", ["hosted.com", f"details.{NS}.svc.cluster.local"]),
                server("tcp", "TCP", ["*"]),
            ] + ([server("extra", extra, ["*"], {"mode": "SIMPLE", **files} if extra == "HTTPS" else None)]
                 if extra else [])}}


def virtual_service(name, hosts, http, gateways=None) -> dict:
    spec = {"hosts": hosts, "http": http}
    if gateways is not None:
        spec["gateways"] = gateways
    return {"apiVersion": NETWORKING, "kind": "VirtualService", "metadata": {"name": name, "namespace": NS},
            "spec": spec}


def to(host, *prefixes, exact=()):
    match = [{"uri": {"exact": path}} for path in exact] + [{"uri": {"prefix": prefix}} for prefix in prefixes]
    return {"match": match, "route": [{"destination": {"host": host, "port": {"number": 80}}}]}


def documents(pki, inbound, cert=None, extra=None) -> list:
    bookinfo = [to("productpage", "/static", exact=["/productpage"]), to("details", "/api/v1/products")]
    return [
        gateway_resource(cert or pki["cert"], pki["key"], pki["ca"], extra, pki["hello"]),
        *(service_entry(name, [mesh_endpoint(inbound[name], name)], namespace=NS) for name in inbound
          if name != "echo"),
        {"apiVersion": NETWORKING, "kind": "ServiceEntry", "metadata": {"name": "echo", "namespace": NS},
         "spec": {"hosts": ["echo"], "location": "MESH_INTERNAL", "resolution": "STATIC",
                  "ports": [{"number": ECHO_PORT, "name": "tcp", "protocol": "TCP"}],
                  "endpoints": [{**mesh_endpoint(inbound["echo"], "echo"), "ports": {"tcp": inbound["echo"]}}]}},
        {"apiVersion": NETWORKING, "kind": "VirtualService", "metadata": {"name": "tcp-echo", "namespace": NS},
         "spec": {"hosts": ["*"], "gateways": ["bookinfo-gateway"], "tcp": [
             {"match": [{"port": PORTS["tcp"]}], "route": [{"destination": {"host": "echo",
                                                                             "port": {"number": ECHO_PORT}}}]}]}},
        virtual_service("bookinfo", ["*"], bookinfo, gateways=["bookinfo-gateway"]),
        virtual_service("hosted", ["hosted.com"], [to("productpage", "/")], gateways=[f"{NS}/bookinfo-gateway"]),
        virtual_service("details", ["details"], [to("details", "/")]),  # no gateways: the sidecars only
        # notPorts: for a TCP connection the HTTP-only paths drop out and a DENY rule denies more (Istio's rule)
        authorization_policy("gateway-deny", NS, selector={"istio": "ingressgateway"}, action="DENY", rules=[
            {"to": [{"operation": {"paths": [path], "notPorts": [str(PORTS["tcp"])]}}], **source}
            for path, source in (("/api/v1/products/secret", {}),
                                 ("/api/v1/products/not-from-loopback",
                                  {"from": [{"source": {"remoteIpBlocks": ["127.0.0.0/8"]}}]}),
                                 ("/api/v1/products/loopback-only",
                                  {"from": [{"source": {"notRemoteIpBlocks": ["127.0.0.0/8"]}}]}))]),
    ]


@pytest.fixture(scope="module")
def mesh(control_factory, backend_factory, proxy_factory, tmp_path_factory):
    pki_dir = tmp_path_factory.mktemp("gateway-pki")
    ca = ScratchCA.create(pki_dir)
    cert, key = ca.issue(pki_dir, "bookinfo", ["bookinfo.com", "secure.com"])
    client = ca.issue(pki_dir, "client", client=True)
    pki = {"ca": ca.cert_path, "cert": cert, "key": key, "client": client, "dir": pki_dir,
           "hello": ca.issue(pki_dir, "hello", ["hello.com"])}
    mounted = pki_dir / "credentials" / "bookinfo-tls"  # the Secret bookinfo-tls, as a volume mounts it
    mounted.mkdir(parents=True)
    (mounted / "tls.crt").write_bytes(cert.read_bytes())
    (mounted / "tls.key").write_bytes(key.read_bytes())
    pki["credentials"] = ["--gateway-credentials-dir", str(pki_dir / "credentials")]
    inbound = {name: free_port() for name in ("productpage", "details", "echo")}
    config = write_config(tmp_path_factory.mktemp("gateway-config"), *documents(pki, inbound))
    control = control_factory(extra_args=["--config-dir", str(config)])
    app_ports = {name: backend_factory(name).port for name in ("productpage", "details")}
    app_ports["echo"] = free_port()
    echo = TcpPeers("gateway-echo", "--echo", app_ports["echo"], log_dir=pki_dir).start()
    sidecars = {name: proxy_factory(config, name, namespace=NS, app_port=app_ports[name], inbound_port=inbound[name],
                                    labels={"app": name}, extra_args=control.proxy_args(NS, name))
                for name in app_ports}
    local = {name: free_port() for name in PORTS}
    mapping = [arg for name, port in PORTS.items() for arg in ("--gateway-port", f"{port}={local[name]}")]
    gateway = proxy_factory(config, "ingressgateway", namespace=NS, labels={"istio": "ingressgateway"},
                            extra_args=["--gateway", "--gateway-address", "127.0.0.1", *mapping, *pki["credentials"],
                                        *control.proxy_args(NS, "ingressgateway")])
    yield {"gateway": gateway, "sidecars": sidecars, "local": local, "pki": pki, "config": config,
            "inbound": inbound, "control": control}
    echo.stop()


def via(mesh, port_name, path, host=None, scheme="http", **kwargs):
    """curl to the gateway's port ``port_name``; HTTPS goes to bookinfo.com, resolved to loopback."""
    port = mesh["local"][port_name]
    if scheme == "https":
        args = ["--resolve", f"bookinfo.com:{port}:127.0.0.1", *kwargs.pop("extra_args", ())]
        return curl(f"https://bookinfo.com:{port}{path}", extra_args=args, **kwargs)
    return curl(f"http://127.0.0.1:{port}{path}", host=host, **kwargs)


def served_by(result) -> str:
    assert result.status == 200, result
    return result.headers["x-demo-service"]


# -- HTTP: the bookinfo gateway ---------------------------------------------------------------------

def test_bookinfo_routes_by_path_over_mesh_mtls(mesh):
    assert served_by(via(mesh, "http", "/productpage")) == "productpage"
    assert served_by(via(mesh, "http", "/static/style.css", host="bookinfo.example")) == "productpage"
    result = via(mesh, "http", "/api/v1/products/0")
    assert served_by(result) == "details"
    cert = xfcc(result.json()["headers"]["x-forwarded-client-cert"])
    assert cert["URI"] == spiffe(NS, "ingressgateway")  # the gateway called details with its own identity
    assert via(mesh, "http", "/login").status == 404  # no route of the VirtualService matches


def test_virtual_service_binding_and_host_matching(mesh):
    assert served_by(via(mesh, "http", "/productpage", host="hosted.com")) == "productpage"  # '*' server
    assert served_by(via(mesh, "hosted", "/anything", host="hosted.com:8082")) == "productpage"
    # details' VirtualService names no gateway: the gateway does not expose it, even on a server with its host
    not_exposed = via(mesh, "hosted", "/", host=f"details.{NS}.svc.cluster.local")
    assert not_exposed.status == 404 and not_exposed.headers["x-mesh-flags"] == "NR"
    assert via(mesh, "hosted", "/", host="other.com").status == 404  # not a host of the server
    # the sidecars route with the VirtualServices that include them (no gateways: mesh), and only those
    sidecar = mesh["sidecars"]["productpage"]
    assert served_by(sidecar.curl("details", "/x")) == "details"
    assert sidecar.curl("hosted.com", "/").status == 404


def test_authorization_policy_selecting_the_gateway(mesh):
    denied = via(mesh, "http", "/api/v1/products/secret")
    assert denied.status == 403 and denied.body == b"RBAC: access denied\n"


def test_a_tcp_server_routes_connections_by_its_tcp_routes(mesh):
    """Istio's TCP traffic shifting shape: a TCP server on 31400 and a VirtualService tcp route bound to the
    gateway; the bytes go over mesh mTLS to the echo server's sidecar and back."""
    assert exchange(mesh["local"]["tcp"], b"hello through the gateway\n") == b"hello through the gateway\n"
    dump = mesh["gateway"].admin("/config_dump")
    [tcp] = [port for port in dump["config"]["gateway"] if port["protocol"] == "TCP"]
    assert tcp["tcp"]["chains"][0]["action"]["clusters"][0]["name"].startswith(f"outbound|{ECHO_PORT}||echo."), tcp


def test_remote_ip_blocks_at_the_gateway_are_the_clients_address_not_its_x_forwarded_for(mesh):
    """As Envoy at Istio's gateway (no trusted proxies): the client's own X-Forwarded-For is not believed."""
    assert via(mesh, "http", "/api/v1/products/not-from-loopback").status == 403
    spoofed = {"x-forwarded-for": "203.0.113.7"}
    assert via(mesh, "http", "/api/v1/products/not-from-loopback", headers=spoofed).status == 403
    assert served_by(via(mesh, "http", "/api/v1/products/loopback-only", headers=spoofed)) == "details"


def test_x_forwarded_proto_is_the_scheme_of_the_clients_connection_whatever_it_sent(mesh):
    """As Envoy at Istio's gateways (``use_remote_address``, no trusted hops): the app (behind its own sidecar,
    which keeps the value) gets the scheme the client used, never the client's own x-forwarded-proto."""
    for headers in ({}, {"x-forwarded-proto": "https"}):
        seen = via(mesh, "http", "/api/v1/products/0", headers=headers).json()["headers"]
        assert seen["x-forwarded-proto"] == "http", seen
    ca = ["--cacert", str(mesh["pki"]["ca"])]
    for version in ("--http1.1", "--http2"):
        for headers in ({}, {"X-Forwarded-Proto": "http"}):
            result = via(mesh, "https", "/productpage", scheme="https", headers=headers, extra_args=[*ca, version])
            assert served_by(result) == "productpage"
            assert result.json()["headers"]["x-forwarded-proto"] == "https", (version, result.json())


def test_x_forwarded_for_gets_the_clients_address_from_the_gateway_only(mesh):
    """As Istio: the gateway (``use_remote_address``) appends its client's address to the x-forwarded-for the client
    sent; the app's sidecar (``use_remote_address: false``) appends nothing, so the app and its sidecar's
    ``remoteIpBlocks`` see the client's address last."""
    assert via(mesh, "http", "/api/v1/products/0").json()["headers"]["x-forwarded-for"] == "127.0.0.1"
    sent = via(mesh, "http", "/api/v1/products/0", headers={"x-forwarded-for": "9.9.9.9"}).json()["headers"]
    assert sent["x-forwarded-for"] == "9.9.9.9, 127.0.0.1", sent


# -- HTTPS -----------------------------------------------------------------------------------------

def test_https_simple_with_a_test_ca(mesh):
    pki = mesh["pki"]
    http1 = via(mesh, "https", "/productpage", scheme="https", extra_args=["--cacert", str(pki["ca"]), "--http1.1"])
    assert served_by(http1) == "productpage" and http1.info["http_version"] == "1.1"
    h2 = via(mesh, "https", "/productpage", scheme="https", extra_args=["--cacert", str(pki["ca"]), "--http2"])
    assert served_by(h2) == "productpage" and h2.info["http_version"] == "2"  # ALPN h2
    untrusted = via(mesh, "https", "/productpage", scheme="https")
    assert untrusted.status == 0 and untrusted.exit_code == 60, untrusted  # the system CAs do not know it


def test_one_port_serves_each_host_with_its_certificate(mesh):
    port, ca = mesh["local"]["https"], str(mesh["pki"]["ca"])
    result = curl(f"https://hello.com:{port}/productpage", extra_args=["--resolve", f"hello.com:{port}:127.0.0.1",
                                                                       "--cacert", ca])
    assert served_by(result) == "productpage"  # curl checked that the certificate is hello.com's (SNI)


def test_credential_name_from_a_mounted_secret(mesh):
    result = via(mesh, "credential", "/productpage", scheme="https", extra_args=["--cacert", str(mesh["pki"]["ca"])])
    assert served_by(result) == "productpage"


def test_mutual_tls_requires_a_client_certificate(mesh):
    pki = mesh["pki"]
    cert, key = pki["client"]
    ok = via(mesh, "mutual", "/api/v1/products", scheme="https",
             extra_args=["--cacert", str(pki["ca"]), "--cert", str(cert), "--key", str(key)])
    assert served_by(ok) == "details"
    refused = via(mesh, "mutual", "/api/v1/products", scheme="https", extra_args=["--cacert", str(pki["ca"])])
    assert refused.status == 0 and refused.exit_code in (35, 55, 56), refused  # the handshake failed: no certificate


def test_https_redirect(mesh):
    result = via(mesh, "redirect", "/productpage?u=1", host="secure.com")
    assert result.status == 301
    assert result.headers["location"] == "https://secure.com/productpage?u=1"


@pytest.fixture(scope="module")
def controlled_gateway(mesh, process_log_dir):
    """A second gateway, ``ingress-controlled``, with its config from the control plane (no --config-dir)."""
    ports = {name: free_port() for name in PORTS}  # every port mapped: none may listen on its own number
    gateway = ControlledProxy(mesh["control"], "ingress-controlled", namespace=NS, service_account="ingressgateway",
                              labels={"istio": "ingressgateway"}, log_dir=process_log_dir,
                              extra_args=["--gateway", "--gateway-address", "127.0.0.1", *mesh["pki"]["credentials"],
                                          *(arg for name, port in ports.items()
                                            for arg in ("--gateway-port", f"{PORTS[name]}={port}"))])
    gateway.start()
    yield gateway, ports
    gateway.stop()


def test_gateway_with_its_config_from_the_control_plane(mesh, controlled_gateway):
    gateway, ports = controlled_gateway
    assert served_by(curl(f"http://127.0.0.1:{ports['http']}/api/v1/products", timeout=5)) == "details"
    secure = curl(f"https://bookinfo.com:{ports['https']}/productpage", timeout=5,
                  extra_args=["--resolve", f"bookinfo.com:{ports['https']}:127.0.0.1",
                              "--cacert", str(mesh["pki"]["ca"])])
    assert served_by(secure) == "productpage"


def test_bad_certificate_file_is_rejected_and_the_old_config_stays(mesh, controlled_gateway):
    gateway, pki = mesh["gateway"], mesh["pki"]
    rejected = gateway.log_path.read_text().count("config rejected")
    missing = pki["dir"] / "missing.pem"
    write_config(mesh["config"], *documents(pki, mesh["inbound"], cert=missing))
    try:
        gateway.reload()
        wait_for(lambda: gateway.log_path.read_text().count("config rejected") > rejected, 10,
                 what="the rejection in the gateway's log")
        assert re.search(rf"config rejected.*Gateway/{NS}/bookinfo-gateway: spec\.servers\[1\]\.tls\."
                         rf"serverCertificate: cannot read {re.escape(str(missing))}: No such file or directory",
                         gateway.log_path.read_text()), gateway.log_tail()
        assert served_by(via(mesh, "https", "/productpage", scheme="https",
                             extra_args=["--cacert", str(pki["ca"])])) == "productpage"
        # the gateway fed by mesh-control NACKs the snapshot, saying why (mesh-control never reads the file)
        nack = wait_for(lambda: proxies(mesh["control"])["ingress-controlled"]["last_nack"], 10,
                        what="the controlled gateway's NACK")
        assert f"spec.servers[1].tls.serverCertificate: cannot read {missing}" in nack
    finally:
        write_config(mesh["config"], *documents(pki, mesh["inbound"]))


def test_ports_follow_the_config(mesh):
    gateway, pki = mesh["gateway"], mesh["pki"]
    https = ["--cacert", str(pki["ca"])]

    def apply(extra):
        write_config(mesh["config"], *documents(pki, mesh["inbound"], extra=extra))
        gateway.reload()

    try:
        apply("HTTP")  # a new server: its port opens
        wait_for(lambda: via(mesh, "extra", "/productpage", timeout=2).status == 200, 10, what="port 9090 serving HTTP")
        apply("HTTPS")  # the same port now terminates TLS
        wait_for(lambda: via(mesh, "extra", "/productpage", scheme="https", extra_args=https, timeout=2).status == 200,
                 10, what="port 9090 serving HTTPS")
    finally:
        apply(None)  # the server is gone: so is its port
    wait_for(lambda: via(mesh, "extra", "/productpage", timeout=2).exit_code == 7, 10, what="port 9090 closed")
    assert "gateway port 9090 closed: no Gateway that selects this proxy has it any more" in gateway.log_tail(50)
