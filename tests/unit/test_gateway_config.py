"""The Gateway kind: validation (certificate files included), VirtualService ``gateways`` binding and
the per-port route tables of a gateway proxy, with Istio's host matching."""

import dataclasses
import textwrap

import pytest
from OpenSSL import SSL

from mesh.config.analyze import analyze
from mesh.config.compile import Workload, compile_proxy_config
from mesh.config.errors import ConfigErrors
from mesh.config.tables import RouteTable
from mesh.proxy.context import RequestContext
from mesh.proxy.gateway import server_context
from tests.harness.certs import ScratchCA
from tests.harness.config_yaml import compile_yaml, validate_yaml

GATEWAY = Workload("ingress", "istio-system", {"istio": "ingressgateway"}, gateway=True)
SIDECAR = Workload("web", "shop", {"app": "web"})

SERVICES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web, api]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
"""


def _gateway(servers, name="gw", namespace="shop", selector="{istio: ingressgateway}"):
    body = textwrap.indent(textwrap.dedent(servers).strip("\n"), "  ")
    return (f"apiVersion: networking.istio.io/v1beta1\nkind: Gateway\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  selector: {selector}\n  servers:\n{body}\n")


def _vs(name, hosts, gateways=None, route_to="web", match=""):
    gateways = f"  gateways: {gateways}\n" if gateways is not None else ""
    match = f"    match: {match}\n" if match else ""
    return (f"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: shop}}\n"
            f"spec:\n  hosts: {hosts}\n{gateways}  http:\n  - name: {name}\n{match}"
            f"    route: [{{destination: {{host: {route_to}}}}}]\n")


def _validate(tmp_path, *documents):
    objects, errors, _ = validate_yaml(tmp_path, *documents)
    return objects, [error.reason for error in errors]


def _compile(tmp_path, *documents, workload=GATEWAY):
    return compile_yaml(tmp_path, SERVICES, *documents, workload=workload)


def _routed(table, host, path="/"):
    """The name of the route the table picks for ``host`` and ``path``, or None."""
    vhost = table.lookup(host)
    if vhost is None:
        return None
    ctx = RequestContext.for_test(method="GET", path=path, host=host)
    return next((route.action.name for route in vhost.routes if route.match is None or route.match(ctx)), None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = ScratchCA.create(directory)
    cert, key = ca.issue(directory, "server", ["bookinfo.com"])
    other_cert, _ = ca.issue(directory, "other", ["other.com"])
    return {"ca": ca.cert_path, "cert": cert, "key": key, "other_cert": other_cert, "dir": directory}


# -- validation ---------------------------------------------------------------------------------------

def test_https_server_files_are_read_by_the_gateway_only(tmp_path, pki):
    gateway = _gateway(f"""
        - port: {{number: 443, name: https, protocol: HTTPS}}
          hosts: [bookinfo.com]
          tls: {{mode: MUTUAL, serverCertificate: {pki['cert']}, privateKey: {pki['key']},
                 caCertificates: {pki['ca']}, minProtocolVersion: TLSV1_3}}
        """)
    [server] = _validate(tmp_path, gateway)[0][0].servers
    assert (server.port, server.protocol, server.hosts) == (443, "HTTPS", (("*", "bookinfo.com"),))
    assert server.tls.files == (str(pki["cert"]), str(pki["key"]), str(pki["ca"])) and server.tls.chain == ()
    tls = _compile(tmp_path, gateway).gateway[443].tls
    assert tls.mode == "MUTUAL" and tls.min_version == "TLSV1_3" and len(tls.client_cas) == 1
    assert tls.chain[0].subject.rfc4514_string() == "CN=server"


def test_bad_servers_are_errors_that_say_what_to_do(tmp_path, pki):
    _, errors = _validate(tmp_path, _gateway(f"""
        - port: {{number: 446, name: https, protocol: HTTPS}}
          hosts: [bookinfo.com]
          tls: {{mode: SIMPLE, credentialName: bookinfo-secret, privateKey: {pki['key']}}}
        - port: {{number: 447, name: tls, protocol: TLS}}
          hosts: [bookinfo.com]
          tls: {{mode: PASSTHROUGH}}
        - port: {{number: 448, name: https, protocol: HTTPS}}
          hosts: [bookinfo.com]
          tls: {{mode: ISTIO_MUTUAL}}
        - port: {{number: 450, name: https, protocol: HTTPS}}
          hosts: [bookinfo.com]
          tls: {{mode: MUTUAL, serverCertificate: {pki['cert']}, privateKey: {pki['key']}}}
        - port: {{number: 451, name: https, protocol: HTTPS}}
          hosts: [bookinfo.com]
          tls: {{mode: SIMPLE, serverCertificate: {pki['cert']}, privateKey: {pki['key']}, caCertificates: x}}
        - port: {{number: 449, name: https, protocol: HTTPS}}
          hosts: [bookinfo.com, "Bad_NS/x.com"]
        - port: {{number: 80, name: http, protocol: HTTP}}
          hosts: ["*"]
          tls: {{mode: SIMPLE}}
        """))
    assert errors == [
        "set either credentialName or the certificate files, not both",
        "protocol TLS is not supported by txmesh; TLS passthrough servers are not implemented on the txmesh "
        "gateway; terminate TLS with protocol HTTPS and tls.mode SIMPLE",
        "mode PASSTHROUGH is not supported by txmesh; TLS passthrough is not implemented on the txmesh gateway; "
        "terminate TLS with mode SIMPLE",
        "mode ISTIO_MUTUAL is not supported by txmesh; mesh mTLS to the gateway itself is not implemented; use "
        "SIMPLE or MUTUAL with certificate files",
        "'serverCertificate' is required",
        "'privateKey' is required",
        "'caCertificates' is required",
        "client certificates are verified only with mode MUTUAL (or OPTIONAL_MUTUAL); set the mode or remove "
        "caCertificates",
        "an HTTPS server needs tls: mode SIMPLE (or MUTUAL) with serverCertificate and privateKey, or "
        "credentialName",
        "invalid namespace 'Bad_NS' in 'Bad_NS/x.com': use NAMESPACE/HOST, ./HOST or */HOST",
        "a server of protocol HTTP takes only tls.httpsRedirect; use protocol HTTPS to terminate TLS",
    ]


def test_certificate_files_that_cannot_be_used_reject_the_gateway_config(tmp_path, pki):
    objects, errors = _validate(tmp_path, SERVICES, _gateway(f"""
        - port: {{number: 443, name: https, protocol: HTTPS}}
          hosts: [bookinfo.com]
          tls: {{mode: SIMPLE, serverCertificate: {pki['dir']}/missing.pem, privateKey: {pki['key']}}}
        - port: {{number: 444, name: https, protocol: HTTPS}}
          hosts: [bookinfo.com]
          tls: {{mode: SIMPLE, serverCertificate: {pki['other_cert']}, privateKey: {pki['key']}}}
        - port: {{number: 445, name: https, protocol: HTTPS}}
          hosts: [bookinfo.com]
          tls: {{mode: SIMPLE, serverCertificate: {pki['key']}, privateKey: {pki['cert']}}}
        """))
    assert errors == []  # validation reads no file: a sidecar never opens the gateway's key
    assert compile_proxy_config(objects, SIDECAR).gateway == {}
    with pytest.raises(ConfigErrors) as raised:
        compile_proxy_config(objects, GATEWAY)
    assert [f"{error.field}: {error.reason}" for error in raised.value.errors] == [
        f"spec.servers[0].tls.serverCertificate: cannot read {pki['dir']}/missing.pem: No such file or directory; "
        "give the path of a PEM file this proxy can read",
        f"spec.servers[1].tls.privateKey: {pki['key']} is not the private key of {pki['other_cert']}; give the key "
        "the certificate was issued for",
        f"spec.servers[2].tls.serverCertificate: {pki['key']} does not hold a certificate in PEM form; give the "
        "path of one",
        f"spec.servers[2].tls.privateKey: {pki['cert']} does not hold an unencrypted private key in PEM form; give "
        "the path of one",
    ]


def test_star_host_only_on_gateway_bound_virtual_services(tmp_path):
    _, errors = _validate(tmp_path, _vs("a", '["*"]'), _vs("b", '["*"]', "[gw, mesh]"), _vs("c", '["*"]', "[gw]"),
                          _vs("d", "[web]", "[Bad/gw]"))
    star = "the catch-all host '*' is not allowed here; name the hosts (wildcards like '*.example.com' are)"
    assert errors == [star, star, "invalid gateway reference 'Bad/gw': use NAME or NAMESPACE/NAME of a Gateway, "
                                  "or 'mesh' for the sidecars"]


# -- binding and host matching ---------------------------------------------------------------------------

def test_bookinfo_binding(tmp_path):
    gateway = _gateway("""
        - port: {number: 8080, name: http, protocol: HTTP}
          hosts: ["*"]
        """)
    config = _compile(tmp_path, gateway, _vs("gw-only", '["*"]', "[gw]", match="[{uri: {prefix: /static}}]"),
                      _vs("both", "[api]", "[shop/gw, mesh]"), _vs("mesh-only", "[web]"))
    table = config.gateway[8080].routes
    assert _routed(table, "anything.example", "/static/x") == "VirtualService/shop/gw-only/gw-only"
    assert _routed(table, "anything.example", "/other") is None
    assert _routed(table, "api.shop.svc.cluster.local") == "VirtualService/shop/both/both"
    # a VirtualService without gateways is for the sidecars only: not on the gateway...
    assert table.lookup("web.shop.svc.cluster.local").name == "VirtualService/shop/gw-only@shop/gw"
    # ...and one bound only to the gateway is not in a sidecar's table
    sidecar = _compile(tmp_path, gateway, _vs("gw-only", '["*"]', "[gw]"), _vs("both", "[api]", "[gw, mesh]"),
                       workload=SIDECAR)
    assert sidecar.gateway == {}
    assert _routed(sidecar.routes, "api") == "VirtualService/shop/both/both"
    assert _routed(sidecar.routes, "web") == "ServiceEntry/shop/web"


def test_match_level_gateways(tmp_path):
    config = _compile(tmp_path, _gateway("""
        - port: {number: 80, name: http, protocol: HTTP}
          hosts: ["*"]
        """), _vs("vs", "[api]", "[gw, mesh]", match="[{uri: {prefix: /edge}, gateways: [gw]}]"))
    assert _routed(config.gateway[80].routes, "api.shop.svc.cluster.local", "/edge") == "VirtualService/shop/vs/vs"
    sidecar = _compile(tmp_path, _vs("vs", "[api]", "[gw, mesh]", match="[{uri: {prefix: /edge}, gateways: [gw]}]"),
                       workload=SIDECAR)
    assert _routed(sidecar.routes, "api", "/edge") is None


def test_host_intersection_and_namespaces(tmp_path):
    config = _compile(tmp_path, _gateway("""
        - port: {number: 80, name: http, protocol: HTTP}
          hosts: ["*.example.com", "./a.bookinfo.com", "other-ns/b.bookinfo.com"]
        """), _vs("wild", '["*"]', "[gw]"), _vs("narrow", '["*.bookinfo.com"]', "[gw]"),
        _vs("miss", "[c.other.org]", "[gw]"))
    table = config.gateway[80].routes
    assert _routed(table, "x.example.com") == "VirtualService/shop/wild/wild"
    # both VirtualServices route a.bookinfo.com: their routes are merged, in namespace and name order
    assert table.lookup("a.bookinfo.com").name == ("VirtualService/shop/narrow@shop/gw + "
                                                   "VirtualService/shop/wild@shop/gw")
    assert _routed(table, "a.bookinfo.com") == "VirtualService/shop/narrow/narrow"
    assert table.lookup("b.bookinfo.com") is None  # only VirtualServices of other-ns may bind it
    assert table.lookup("example.com") is None and table.lookup("c.other.org") is None
    [warning] = config.warnings
    assert "none of these hosts is among the hosts of the servers of the Gateways it binds to" in str(warning)


def test_https_redirect_and_selector(tmp_path):
    config = _compile(tmp_path, _gateway("""
        - port: {number: 80, name: http, protocol: HTTP}
          hosts: [bookinfo.com]
          tls: {httpsRedirect: true}
        """), _gateway("""
        - port: {number: 81, name: http, protocol: HTTP}
          hosts: ["*"]
        """, name="other", selector="{istio: egressgateway}"), _vs("vs", "[bookinfo.com]", "[gw, other]"))
    assert list(config.gateway) == [80]
    [route] = config.gateway[80].routes.lookup("bookinfo.com").routes
    redirect = route.action.extras.redirect
    assert route.action.clusters == () and redirect.status == 301
    assert redirect.location(b"bookinfo.com", b"/productpage?u=1", 80) == b"https://bookinfo.com/productpage?u=1"


def test_analyze_finds_unknown_gateways_and_lets_gateways_merge(tmp_path):
    objects, errors = _validate(tmp_path, SERVICES, _gateway("""
        - port: {number: 80, name: http, protocol: HTTP}
          hosts: ["*"]
        """), _vs("a", '["*"]', "[gw]"), _vs("b", '["*"]', "[gw]"), _vs("c", "[web]", "[mesh, other/gw]"),
        _vs("d", "[web]", "[mesh]", match="[{gateways: [missing]}]"))
    assert errors == []
    findings = [f"{finding.field}: {finding.reason}" for finding in analyze(objects)]
    assert [finding.split(":")[0] for finding in findings] == ["spec.gateways", "spec.hosts[0]",
                                                              "spec.http[0].match[0].gateways"]
    assert "binds gateway 'other/gw', which no Gateway defines" in findings[0]
    assert "host 'web.shop.svc.cluster.local' is also routed by VirtualService shop/c" in findings[1]
    assert "binds gateway 'shop/missing'" in findings[2]


def test_credential_name_reads_the_secret_mounted_in_the_gateway(tmp_path, pki):
    """credentialName: the Secret's files in --gateway-credentials-dir, read when the config is compiled."""
    mounted = tmp_path / "credentials"
    for secret, files in {"bookinfo": {"tls.crt": pki["cert"], "tls.key": pki["key"]},
                          "bookinfo-cacert": {"ca.crt": pki["ca"]}}.items():
        (mounted / secret).mkdir(parents=True)
        for name, source in files.items():
            (mounted / secret / name).write_bytes(source.read_bytes())
    gateway = _gateway("""
        - port: {number: 443, name: https, protocol: HTTPS}
          hosts: [bookinfo.com]
          tls: {mode: MUTUAL, credentialName: bookinfo}
        """)
    objects, errors = _validate(tmp_path, SERVICES, gateway)
    assert errors == []
    tls = compile_proxy_config(objects, dataclasses.replace(GATEWAY, credentials_dir=str(mounted))).gateway[443].tls
    assert tls.credential == "bookinfo" and tls.mode == "MUTUAL"
    assert tls.chain[0].subject.rfc4514_string() == "CN=server" and len(tls.client_cas) == 1
    assert tls.files == (str(mounted / "bookinfo/tls.crt"), str(mounted / "bookinfo/tls.key"),
                         str(mounted / "bookinfo-cacert/ca.crt"))

    def refusal(workload):
        with pytest.raises(ConfigErrors) as raised:
            compile_proxy_config(objects, workload)
        [error] = raised.value.errors
        return f"{error.field}: {error.reason}"

    assert refusal(GATEWAY) == (
        "spec.servers[0].tls.credentialName: credentialName names a Secret mounted in the gateway, but this "
        "gateway has no --gateway-credentials-dir: start it with the directory where Secrets are mounted (it reads "
        "DIR/bookinfo/tls.crt and tls.key), or with --control and --state-dir to get the Secret from mesh-control "
        "--kubernetes, or set serverCertificate and privateKey")
    (mounted / "bookinfo" / "tls.key").unlink()
    assert refusal(dataclasses.replace(GATEWAY, credentials_dir=str(mounted))) == (
        f"spec.servers[0].tls.credentialName: the Secret bookinfo mounted in {mounted} has no tls.key or key file; "
        "mount the Secret there (from mesh-control --kubernetes: create it in the gateway's namespace)")
    assert compile_proxy_config(objects, SIDECAR).gateway == {}  # a sidecar never reads them


# -- one route table per HTTPS server, httpsRedirect, match ports, tls modes and versions ---------------------

def test_each_https_server_of_a_port_has_its_own_route_table(tmp_path, pki):
    """As Istio's route configuration per HTTPS server: a connection that chose one server by SNI routes only
    that server's hosts; a client without SNI gets the first server.  A plaintext server of another Gateway
    on the port joins the first server's table (it is served with its TLS)."""
    files = f"serverCertificate: {pki['cert']}, privateKey: {pki['key']}"
    config = _compile(tmp_path, _gateway(f"""
        - port: {{number: 443, name: https-mutual, protocol: HTTPS}}
          hosts: [mutual.com]
          tls: {{mode: MUTUAL, {files}, caCertificates: {pki['ca']}}}
        - port: {{number: 443, name: https-open, protocol: HTTPS}}
          hosts: ["*.open.com"]
          tls: {{mode: SIMPLE, {files}}}
        """), _gateway("""
        - port: {number: 443, name: http, protocol: HTTP}
          hosts: [plain.com]
        """, name="other"), _vs("mutual", "[mutual.com]", "[gw]"), _vs("open", '["*"]', "[gw]"),
        _vs("plain", "[plain.com]", "[other]"))
    port = config.gateway[443]
    assert port.routes == RouteTable() and port.tls.mode == "MUTUAL"
    mutual, opened = port.servers
    assert (mutual.name, mutual.sni, mutual.tls.mode) == ("shop/gw servers[0]", ("mutual.com",), "MUTUAL")
    assert (opened.name, opened.sni, opened.tls.mode) == ("shop/gw servers[1]", ("*.open.com",), "SIMPLE")
    assert _routed(mutual.routes, "mutual.com") == "VirtualService/shop/mutual/mutual"  # '*' meets it too, after
    assert _routed(mutual.routes, "plain.com") == "VirtualService/shop/plain/plain"
    assert _routed(opened.routes, "www.open.com") == "VirtualService/shop/open/open"
    assert opened.routes.lookup("mutual.com") is None and opened.routes.lookup("plain.com") is None
    assert mutual.routes.lookup("www.open.com") is None
    [https] = [entry for entry in config.dump["gateway"] if entry["port"] == 443]
    assert [(server["name"], server["hosts"]) for server in https["servers"]] == [
        ("shop/gw servers[0]", {"mutual.com": "VirtualService/shop/mutual@shop/gw + VirtualService/shop/open@shop/gw",
                                "plain.com": "VirtualService/shop/plain@shop/other"}),
        ("shop/gw servers[1]", {"*.open.com": "VirtualService/shop/open@shop/gw"})]


def test_https_redirect_without_a_virtual_service(tmp_path):
    """Istio adds a redirect virtual host for each host of an httpsRedirect server, routed or not; a host
    it shares with another server of the port redirects too (``require_tls: ALL`` on its virtual host)."""
    config = _compile(tmp_path, _gateway("""
        - port: {number: 80, name: http, protocol: HTTP}
          hosts: [bookinfo.com, "*.example.com"]
          tls: {httpsRedirect: true}
        """), _gateway("""
        - port: {number: 80, name: http, protocol: HTTP}
          hosts: ["*"]
        """, name="plain"), _vs("everything", '["*"]', "[plain]"))
    table = config.gateway[80].routes
    for host in ("bookinfo.com", "www.example.com"):
        [route] = table.lookup(host).routes
        assert route.action.extras.redirect.status == 301 and route.action.clusters == ()
    assert _routed(table, "other.org") == "VirtualService/shop/everything/everything"
    assert config.warnings == ()


def test_match_port_is_decided_by_the_gateway_server_port(tmp_path):
    """Istio's translateRoute drops a match whose port is not the server's: each server port gets its own
    routes, whatever port the Host header names; a destination without a port goes to the server port when
    the service has it."""
    two_ports = """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: shop-api, namespace: shop}
        spec:
          hosts: [shop-api.shop.svc.cluster.local]
          ports: [{number: 80, name: http, protocol: HTTP}, {number: 8080, name: http-alt, protocol: HTTP}]
          resolution: STATIC
          endpoints: [{address: 127.0.0.1}]
        """
    routes = """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: vs, namespace: shop}
        spec:
          hosts: [shop.example.com]
          gateways: [gw]
          http:
          - name: on8080
            match: [{port: 8080, uri: {prefix: /a}}, {port: 9999}]
            route: [{destination: {host: shop-api.shop.svc.cluster.local}}]
          - name: on80
            match: [{port: 80}]
            route: [{destination: {host: shop-api.shop.svc.cluster.local}}]
        """
    config = _compile(tmp_path, two_ports, _gateway("""
        - port: {number: 8080, name: http-alt, protocol: HTTP}
          hosts: [shop.example.com]
        - port: {number: 80, name: http, protocol: HTTP}
          hosts: [shop.example.com]
        """), routes)

    def routed(port, host, path="/a"):
        vhost = config.gateway[port].routes.lookup("shop.example.com")
        ctx = RequestContext.for_test(path=path, host=host)
        return next((route.action for route in vhost.routes if route.match is None or route.match(ctx)), None)

    for host in ("shop.example.com", "shop.example.com:80", "shop.example.com:9999"):
        assert routed(8080, host).name == "VirtualService/shop/vs/on8080"
        assert routed(8080, host).clusters == ("outbound|8080||shop-api.shop.svc.cluster.local",)
        assert routed(8080, host, "/b") is None  # the port is decided, the uri still tested
        assert routed(80, host).name == "VirtualService/shop/vs/on80"
        assert routed(80, host).clusters == ("outbound|80||shop-api.shop.svc.cluster.local",)
    assert config.warnings == ()


def test_tls_mode_is_required_and_tls_auto_is_envoys_default(tmp_path, pki):
    """Istio's TLSmode zero value is PASSTHROUGH, which txmesh does not serve; TLS_AUTO as the maximum caps
    nothing (Envoy's server default, TLS 1.3) and as the minimum is TLS 1.2."""
    files = f"serverCertificate: {pki['cert']}, privateKey: {pki['key']}"
    _, errors = _validate(tmp_path, _gateway(f"""
        - port: {{number: 443, name: https, protocol: HTTPS}}
          hosts: [bookinfo.com]
          tls: {{{files}}}
        """))
    assert errors == ["tls.mode is required: Istio's default, PASSTHROUGH, is not supported by txmesh; set mode: "
                      "SIMPLE or MUTUAL"]
    tls = _compile(tmp_path, _gateway(f"""
        - port: {{number: 443, name: https, protocol: HTTPS}}
          hosts: [bookinfo.com]
          tls: {{mode: SIMPLE, {files}, minProtocolVersion: TLS_AUTO, maxProtocolVersion: TLS_AUTO}}
        """)).gateway[443].tls
    assert (tls.min_version, tls.max_version) == ("TLSV1_2", None)
    assert _handshake(server_context(tls), SSL.TLS1_3_VERSION) == "TLSv1.3"


def _handshake(server: SSL.Context, version) -> str:
    """The protocol version of an in-memory handshake between ``server`` and a client of ``version`` only."""
    client_context = SSL.Context(SSL.TLS_METHOD)
    client_context.set_min_proto_version(version)
    client_context.set_max_proto_version(version)
    client_context.set_verify(SSL.VERIFY_NONE)
    client, accepting = SSL.Connection(client_context), SSL.Connection(server)
    client.set_connect_state()
    accepting.set_accept_state()
    for _ in range(10):
        for side in (client, accepting):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        moved = False
        for source, sink in ((client, accepting), (accepting, client)):
            try:
                sink.bio_write(source.bio_read(65536))
                moved = True
            except SSL.WantReadError:
                pass
        if not moved:
            break
    return client.get_protocol_version_name()
