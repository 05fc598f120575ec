"""Istio's ``Gateway``: validation, the model, and the per-port route tables of a gateway proxy.

A Gateway describes the ports of an ingress gateway (``twistd mesh-proxy --gateway``, see
docs/gateway.md); the VirtualServices that name it in ``gateways`` route what comes in there.

- :func:`gateway` validates one Gateway resource into a :class:`Gateway`, without reading
  certificate files: those are on the gateway's host, and only the gateway reads them.
- :func:`compile_gateway` builds, for a gateway workload, one :class:`GatewayPort` per port from
  the Gateways whose ``selector`` selects it and the VirtualServices bound to them, with route
  tables as Istio's route configurations: one for all the servers of a plaintext port, one per
  server of an HTTPS port (:class:`GatewayServer`).  Each VirtualService host is intersected with
  the server's hosts as Istio does (the narrower name wins; ``*`` matches everything) and its routes
  are compiled for the server's port (a match's ``port`` is decided there); a server with
  ``tls.httpsRedirect`` answers every request to its hosts with a 301 to ``https``, with or without
  a VirtualService; and the HTTPS servers' certificates are read -- their files, or the Secret
  ``credentialName`` mounted in the gateway (``Workload.credentials_dir``) -- and checked (readable,
  PEM, the key matches the certificate): one that cannot be used rejects the gateway's config, and
  its previous one stays in force.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.config import hosts as hostnames
from mesh.config.compile_l4 import describe_listener, tcp_listener
from mesh.config.errors import ConfigErrors
from mesh.config.fields import Fields, Report
from mesh.config.loader import Resource
from mesh.config.resources import MESH
from mesh.config.route_extras import Redirect, RouteExtras
from mesh.config.selection import selects
from mesh.config.tables import CompiledRoute, L4Listener, RouteAction, RouteTable, VirtualHost

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
#: Server protocols the gateway serves: HTTP ones in plaintext, HTTPS terminated with the server's certificate,
#: and TCP (routed by the VirtualServices' ``tcp`` routes).
HTTP_PROTOCOLS = ("HTTP", "HTTP2", "GRPC")
TCP = "TCP"
TLS_MODES = ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL")
#: ``minProtocolVersion`` and ``maxProtocolVersion``: ``TLS_AUTO`` is Envoy's default for a server, TLS 1.2 as the
#: minimum and TLS 1.3 as the maximum (no cap: None).
_MIN_VERSIONS = {"TLS_AUTO": "TLSV1_2", "TLSV1_2": "TLSV1_2", "TLSV1_3": "TLSV1_3"}
_MAX_VERSIONS = {"TLS_AUTO": None, "TLSV1_2": "TLSV1_2", "TLSV1_3": "TLSV1_3"}
_OLD_TLS = "txmesh speaks TLS 1.2 and 1.3 only; use TLSV1_2 (or TLS_AUTO)"

_SPEC = {"selector", "servers"}
_SERVER = {"port", "hosts", "tls", "name"}
_SERVER_UNSUPPORTED = {
    "bind": "the gateway listens on all addresses of --gateway-address; remove it",
    "defaultEndpoint": "it applies to sidecars only; remove it",
}
_PORT = {"number", "name", "protocol"}
_PORT_UNSUPPORTED = {"targetPort": "the gateway listens on the server's port number (mapped with --gateway-port); "
                                   "remove it"}
_PROTOCOL_REJECTED = {
    "TLS": "TLS passthrough servers are not implemented on the txmesh gateway; terminate TLS with protocol HTTPS "
           "and tls.mode SIMPLE",
    "MONGO": "the txmesh gateway serves HTTP, HTTPS and TCP only; use TCP",
    "HTTP_PROXY": "the txmesh gateway serves HTTP, HTTPS and TCP only; use HTTP or HTTPS",
}
_TLS = {"mode", "serverCertificate", "privateKey", "caCertificates", "httpsRedirect", "minProtocolVersion",
        "maxProtocolVersion", "credentialName"}
_FILES = ("serverCertificate", "privateKey", "caCertificates")
#: The files of a Secret mounted as a volume, as Istio reads them: a ``kubernetes.io/tls`` Secret's keys, else a
#: generic Secret's (``cert``, ``key``, ``cacert``); client CAs may also come from the Secret ``NAME-cacert``.
_SECRET_FILES = {"serverCertificate": ("tls.crt", "cert"), "privateKey": ("tls.key", "key"),
                 "caCertificates": ("ca.crt", "cacert")}
_TLS_UNSUPPORTED = {key: "it is not implemented on the txmesh gateway; remove it" for key in (
    "subjectAltNames", "verifyCertificateSpki", "verifyCertificateHash", "cipherSuites", "caCrl",
    "credentialNames", "tlsCertificates")}
_MODE_REJECTED = {
    "PASSTHROUGH": "TLS passthrough is not implemented on the txmesh gateway; terminate TLS with mode SIMPLE",
    "AUTO_PASSTHROUGH": "multi-network passthrough is not implemented; terminate TLS with mode SIMPLE",
    "ISTIO_MUTUAL": "mesh mTLS to the gateway itself is not implemented; use SIMPLE or MUTUAL with certificate files",
}


@dataclass(frozen=True)
class ServerTLS:
    """A server's TLS settings: ``mode`` SIMPLE, MUTUAL or OPTIONAL_MUTUAL and the protocol versions
    (``TLSV1_2``/``TLSV1_3``); ``files`` are the certificate chain, private key and client CAs (``""``: none),
    or ``credential`` names the Secret that holds them.  Validation leaves ``chain`` (cryptography
    certificates, leaf first), ``key`` and ``client_cas`` empty: compiling for the gateway reads them (and
    ``files`` then holds the paths read).  Two settings are equal when their modes, files and names are."""

    mode: str
    chain: tuple = field(default=(), repr=False, compare=False)
    key: object = field(default=None, repr=False, compare=False)
    client_cas: tuple = field(default=(), repr=False, compare=False)
    min_version: str = "TLSV1_2"
    max_version: str | None = None
    files: tuple = ()
    credential: str | None = None


@dataclass(frozen=True)
class Server:
    """One ``servers`` entry: ``hosts`` are ``(namespace filter, host)`` pairs (``*``: any namespace,
    ``.``: the Gateway's), ``tls`` is set for HTTPS servers, ``https_redirect`` for HTTP ones."""

    index: int
    port: int
    protocol: str
    hosts: tuple
    tls: ServerTLS | None = None
    https_redirect: bool = False


@dataclass(frozen=True)
class Gateway:
    """A Gateway: the proxies its ``selector`` (sorted label pairs; None: every gateway) picks serve ``servers``."""

    name: str
    namespace: str
    selector: tuple | None
    servers: tuple
    source: Resource = field(compare=False, repr=False)

    @property
    def ref(self) -> str:
        """The name VirtualServices bind to: ``namespace/name``."""
        return f"{self.namespace}/{self.name}"


def gateway_refs(f: Fields, key: str, namespace: str) -> tuple:
    """The ``gateways`` list of a VirtualService or a match, as ``namespace/name`` refs (or ``mesh``).

    A short name is a Gateway of the VirtualService's namespace, as in Istio.
    """
    out = []
    for path, value in f.strings(key):
        if value == MESH:
            out.append(MESH)
            continue
        gateway_namespace, slash, name = value.rpartition("/")
        if not _DNS_LABEL.match(name) or (slash and not _DNS_LABEL.match(gateway_namespace)):
            f.report.add(path, f"invalid gateway reference '{value}': use NAME or NAMESPACE/NAME of a Gateway, "
                               "or 'mesh' for the sidecars")
            continue
        out.append(f"{gateway_namespace or namespace}/{name}")
    return tuple(dict.fromkeys(out))


def gateway(resource, report, domain) -> Gateway:
    """Validate a Gateway resource (a validator of :mod:`mesh.config.validate`)."""
    f = Fields(report, ("spec",), resource.spec, _SPEC)
    selector = f.labels("selector") if "selector" in f else None
    servers = tuple(_server(Fields(report, path, item, _SERVER, _SERVER_UNSUPPORTED), index, resource.namespace)
                    for index, (path, item) in enumerate(f.items("servers", required=True)))
    seen = {}
    for server in servers:
        other = seen.setdefault(server.port, server)
        if other is not server and _kind(other) != _kind(server):
            f.error("servers", f"port {server.port} has servers of protocols {other.protocol} and {server.protocol}; "
                               "give them different ports")
    return Gateway(name=resource.name, namespace=resource.namespace, selector=selector or None, servers=servers,
                   source=resource)


def _kind(server: Server) -> str:
    """What a port does with a server's connections: terminate TLS, route TCP, or read HTTP."""
    return server.protocol if server.protocol in ("HTTPS", TCP) else "HTTP"


def _server(f: Fields, index, namespace) -> Server:
    pf = f.sub("port", _PORT, _PORT_UNSUPPORTED)
    if "port" not in f:
        f.error("port", "'port' is required")
    number = pf.port("number", required="port" in f) or 0
    protocol = pf.enum("protocol", HTTP_PROTOCOLS + ("HTTPS", TCP), _PROTOCOL_REJECTED)
    if "protocol" not in pf and "port" in f:
        pf.error("protocol", "'protocol' is required: HTTP, HTTP2, GRPC, HTTPS or TCP")
    hosts = []
    for path, value in f.strings("hosts", required=True):
        host_namespace, slash, host = value.rpartition("/")
        host_namespace = host_namespace if slash else "*"
        problem = None if host == "*" else hostnames.check(host)
        if problem is None and host_namespace not in ("*", ".") and not _DNS_LABEL.match(host_namespace):
            problem = f"invalid namespace '{host_namespace}' in '{value}': use NAMESPACE/HOST, ./HOST or */HOST"
        if problem:
            f.report.add(path, problem)
        else:
            hosts.append((namespace if host_namespace == "." else host_namespace, host.lower()))
    tls, redirect = None, False
    if "tls" in f:
        tf = f.sub("tls", _TLS, _TLS_UNSUPPORTED)
        redirect = tf.boolean("httpsRedirect")
        if protocol == "HTTPS":
            tls = _server_tls(tf)
        elif protocol is None:
            tf.enum("mode", TLS_MODES, _MODE_REJECTED)  # the field names and values only
            _tls_versions(tf)
        elif set(tf.data) - {"httpsRedirect"}:
            tf.error(None, f"a server of protocol {protocol} takes only tls.httpsRedirect; use protocol HTTPS to "
                           "terminate TLS")
    elif protocol == "HTTPS":
        f.error("tls", "an HTTPS server needs tls: mode SIMPLE (or MUTUAL) with serverCertificate and privateKey, "
                       "or credentialName")
    if redirect and protocol == "HTTPS":
        f.error("tls", "httpsRedirect redirects plaintext requests to HTTPS; set it on an HTTP server")
    return Server(index=index, port=number, protocol=protocol or "HTTP", hosts=tuple(hosts), tls=tls,
                  https_redirect=redirect)


def _server_tls(f: Fields) -> ServerTLS:
    """A server's tls as written.  Its certificate files, or the Secret ``credentialName``, are read when the
    config is compiled on the gateway (:func:`_with_certificates`): not here, so neither the sidecars nor the
    control plane ever read a gateway's private key."""
    if "mode" not in f:  # Istio's TLSmode zero value is PASSTHROUGH
        f.error("mode", "tls.mode is required: Istio's default, PASSTHROUGH, is not supported by txmesh; set mode: "
                        "SIMPLE or MUTUAL")
    mode = f.enum("mode", TLS_MODES, _MODE_REJECTED, default="SIMPLE")
    low, high = _tls_versions(f)
    if "credentialName" in f:
        name = f.string("credentialName", required=True) or ""
        if name and not _DNS_SUBDOMAIN.match(name):
            f.error("credentialName", f"invalid Secret name '{name}': use lower-case letters, digits, '-' and '.'")
        for key in _FILES:
            if key in f:
                f.error(key, "set either credentialName or the certificate files, not both")
        return ServerTLS(mode=mode, min_version=low, max_version=high, credential=name)
    files = {key: f.string(key, required=key != "caCertificates" or mode != "SIMPLE") or "" for key in _FILES}
    if mode == "SIMPLE" and files["caCertificates"]:
        f.error("caCertificates", "client certificates are verified only with mode MUTUAL (or OPTIONAL_MUTUAL); "
                                  "set the mode or remove caCertificates")
    return ServerTLS(mode=mode, min_version=low, max_version=high, files=tuple(files[key] for key in _FILES))


def _tls_versions(f: Fields) -> tuple:
    """``(minProtocolVersion, maxProtocolVersion or None: no cap)`` of a server's tls."""
    rejected = {old: _OLD_TLS for old in ("TLSV1_0", "TLSV1_1")}
    low = f.enum("minProtocolVersion", _MIN_VERSIONS, rejected, default="TLSV1_2")
    high = f.enum("maxProtocolVersion", _MAX_VERSIONS, rejected)
    if high and low > high:
        f.error("maxProtocolVersion", "maxProtocolVersion is below minProtocolVersion")
    return low, high


def _read_pem(f: Fields, key, path, parse):
    """The PEM file at ``path`` parsed; None after reporting at ``key`` why it cannot be used."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        f.error(key, f"cannot read {path}: {error.strerror}; give the path of a PEM file this proxy can read")
        return None
    try:
        return parse(data)
    except (ValueError, TypeError):
        what = "an unencrypted private key" if parse is _private_key else "a certificate"
        f.error(key, f"{path} does not hold {what} in PEM form; give the path of one")
        return None


def _certificates(data: bytes) -> tuple:
    return tuple(x509.load_pem_x509_certificates(data))


def _private_key(data: bytes):
    return serialization.load_pem_private_key(data, password=None)


# -- compile ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GatewayServer:
    """A server of an HTTPS port, which terminates TLS with its own settings and routes with its own table, as
    Istio gives each such server its own filter chain and route configuration (``https.PORT.NAME.GW.NS``): a
    connection is routed with the table of the server whose settings its handshake used, so a client that
    chose one server (by SNI) cannot reach another server's hosts, whatever its Host header.

    ``name`` (``NAMESPACE/GATEWAY servers[INDEX]``), ``hosts`` (``(namespace filter, host)`` pairs) and ``tls``
    identify it: two compilations of the same server are equal (``routes`` is not compared)."""

    name: str
    hosts: tuple
    tls: ServerTLS
    routes: RouteTable = field(default_factory=RouteTable, compare=False, repr=False)

    @property
    def sni(self) -> tuple:
        """The server names (SNI) that select this server."""
        return tuple(host for _, host in self.hosts)


@dataclass(frozen=True)
class GatewayPort:
    """One listening port of a gateway proxy: its protocol and its routes.  A plaintext HTTP port has one
    route table, ``routes``, for all its servers (Istio's ``http.PORT``).  An HTTPS port terminates TLS with
    the settings of one of its ``servers`` (:class:`GatewayServer`, in order), chosen by the SNI of the
    ClientHello, and routes with that server's table; ``tls`` is the first server's, the default; its
    ``routes`` is empty."""

    port: int
    protocol: str
    tls: ServerTLS | None
    routes: RouteTable
    servers: tuple = ()
    tcp: L4Listener | None = None  # a TCP server's routes


def bound(refs: tuple, gateway_ref: str) -> bool:
    """Whether a VirtualService (or a match) with ``gateways`` ``refs`` applies to ``gateway_ref``
    (``mesh``: the sidecars; a VirtualService without gateways applies to the sidecars only)."""
    return gateway_ref in refs if refs else gateway_ref == MESH


def compile_gateway(compiler, virtual_services) -> tuple:
    """``({port: GatewayPort}, dump)`` for the gateway workload ``compiler.workload``.

    ``compiler`` is the :class:`mesh.config.compile._Compiler` in progress: its
    ``_virtual_host(vs, gateway_ref, port)`` compiles a VirtualService's routes for one gateway and server port.
    """
    workload = compiler.workload
    gateways = sorted((obj for obj in compiler.objects if isinstance(obj, Gateway)
                       and selects(obj.selector, workload.labels)), key=lambda gw: (gw.namespace, gw.name))
    ports, dump, used, problems, tcp_routes = {}, [], set(), [], {}
    for gw in gateways:
        for server in gw.servers:
            report = Report()
            server = _with_certificates(compiler, server, Fields(report, ("spec", "servers", server.index, "tls"),
                                                                 {}, ()))
            problems += [gw.source.error(path, reason) for path, reason in report.problems]
            first, found, servers = ports.setdefault(server.port, (server, {}, []))
            if first.protocol != server.protocol:
                compiler._warn(gw, ("spec", "servers", server.index),
                               f"port {server.port} is already served with protocol {first.protocol}; this "
                               f"{server.protocol} server's hosts are served that way; give it another port")
            if server.protocol == TCP:
                tcp_routes.setdefault(server.port, []).extend(_tcp_routes(gw, server, virtual_services))
                continue
            key = None  # a plaintext port: one table for all its servers
            if first.tls is not None:  # HTTPS: each server its own table
                if server.tls is not None:
                    key = f"{gw.ref} servers[{server.index}]"
                    servers.append((key, server))
                else:  # a plaintext server's hosts are served with the first server's TLS, and its table
                    key = servers[0][0]
            hosts, redirects = found.setdefault(key, ({}, set()))
            used.update(id(vs) for vs in _add_hosts(compiler, gw, server, virtual_services, hosts, redirects))
    if problems:  # a certificate that cannot be used: the gateway keeps its previous config
        raise ConfigErrors(problems)
    for vs in virtual_services:
        if vs.http and id(vs) not in used and any(bound(vs.gateways, gw.ref) for gw in gateways):
            compiler._warn(vs, ("spec", "hosts"), "none of these hosts is among the hosts of the servers of the "
                                                  "Gateways it binds to, so the gateway routes nothing here; "
                                                  "make a host match a server's hosts")
    tables = {}
    for number, (first, found, servers) in sorted(ports.items()):
        if first.protocol == TCP:
            listener = tcp_listener(compiler, f"gateway_{number}", number, tcp_routes.get(number, ()))
            tables[number] = GatewayPort(number, TCP, None, RouteTable(), tcp=listener)
            dump.append({"port": number, "protocol": TCP, "tcp": describe_listener(listener)})
            continue
        if first.tls is None:
            routes = _route_table(*found.get(None, ({}, set())))
            tables[number] = GatewayPort(number, first.protocol, None, routes)
            dump.append({"port": number, "protocol": first.protocol, "hosts": _describe(routes)})
            continue
        compiled = tuple(GatewayServer(name, server.hosts, server.tls, _route_table(*found[name]))
                         for name, server in servers)
        tables[number] = GatewayPort(number, first.protocol, first.tls, RouteTable(), compiled)
        dump.append({"port": number, "protocol": first.protocol, "servers": [
            {"name": server.name, "sni": list(server.sni), "mode": server.tls.mode, "files": list(server.tls.files),
             "credentialName": server.tls.credential, "hosts": _describe(server.routes)} for server in compiled]})
    return tables, dump


def _route_table(found: dict, redirects: set) -> RouteTable:
    """The route table of a port (HTTP) or server (HTTPS): ``found`` maps a domain to the virtual hosts of the
    VirtualServices that route it; a domain of ``redirects`` (a host of a server with ``tls.httpsRedirect``)
    gets only the redirect to https, as Envoy's ``require_tls: ALL`` on its virtual host."""
    hosts = {host: _merged(vhosts) for host, vhosts in found.items()}
    hosts.update(dict.fromkeys(redirects, _REDIRECT_HOST))
    catch_all = hosts.pop("*", None)
    wildcards = sorted(((host[1:], vhost) for host, vhost in hosts.items() if host.startswith("*")),
                       key=lambda item: -len(item[0]))
    exact = {host: vhost for host, vhost in hosts.items() if not host.startswith("*")}
    return RouteTable(exact=exact, wildcards=tuple(wildcards), catch_all=catch_all)


def _describe(table: RouteTable) -> dict:
    """A route table's domains and the names of their virtual hosts, for ``/config_dump``."""
    described = {host: vhost.name for host, vhost in sorted(table.exact.items())}
    described.update(sorted((f"*{suffix}", vhost.name) for suffix, vhost in table.wildcards))
    if table.catch_all is not None:
        described["*"] = table.catch_all.name
    return described


def _tcp_routes(gw: Gateway, server: Server, virtual_services) -> list:
    """``(VirtualService, tcp route, matches)`` of the VirtualServices bound to ``gw`` for the TCP ``server``, in
    order: a route whose matches (their ``port`` and ``gateways``) leave it for this port, with those matches."""
    routes = []
    for vs in virtual_services:
        if not vs.tcp or not bound(vs.gateways, gw.ref):
            continue
        for route in vs.tcp:
            matches = [match for match in route.match if (match.port is None or match.port == server.port)
                       and (not match.gateways or gw.ref in match.gateways)]
            if matches or not route.match:
                routes.append((vs, route, matches))
    return routes


def _add_hosts(compiler, gw: Gateway, server: Server, virtual_services, hosts, redirects) -> list:
    """Add to ``hosts`` (domain -> [VirtualHost, ...]) the virtual hosts of the VirtualServices bound to ``gw``
    whose hosts meet ``server``'s, compiled for the server's port; return those VirtualServices.  For a server
    with ``tls.httpsRedirect``, add its hosts and those domains to ``redirects`` instead: as Istio, every
    request to them is redirected, whether a VirtualService routes them or not."""
    used = []
    if server.https_redirect:
        redirects.update(host for _, host in server.hosts)
    for vs in virtual_services:
        if not vs.http or not bound(vs.gateways, gw.ref):
            continue
        vhost = None
        for host in vs.hosts:
            for namespace, server_host in server.hosts:
                name = _intersection(server_host, host) if namespace in ("*", vs.namespace) else None
                if name is None:
                    continue
                if server.https_redirect:
                    redirects.add(name)
                    used.append(vs)
                    continue
                if vhost is None:
                    vhost = compiler._virtual_host(vs, gw.ref, server.port)
                    used.append(vs)
                if vhost not in hosts.setdefault(name, []):
                    hosts[name].append(vhost)
    return used


def _merged(vhosts) -> VirtualHost:
    """One virtual host for a domain several VirtualServices route on a gateway: their routes in turn, as
    Istio merges them (here in namespace and name order)."""
    if len(vhosts) == 1:
        return vhosts[0]
    return VirtualHost(name=" + ".join(vhost.name for vhost in vhosts),
                       routes=tuple(route for vhost in vhosts for route in vhost.routes))


def _with_certificates(compiler, server: Server, f: Fields) -> Server:
    """``server`` with its certificates read: from its files, or from the Secret ``credentialName`` mounted in
    the gateway's ``--gateway-credentials-dir`` (``DIR/NAME/tls.crt``...: the Secret as a volume mounts it).
    What cannot be read is reported in ``f`` (the server's ``tls``) and the server comes back unchanged."""
    tls = server.tls
    if tls is None:
        return server
    paths = dict(zip(_FILES, tls.files)) if tls.credential is None else _secret_files(compiler, tls, f)
    if f.report.problems:
        return server
    parsers = {"serverCertificate": _certificates, "privateKey": _private_key, "caCertificates": _certificates}
    read = {key: _read_pem(f, key, paths[key], parsers[key]) if paths.get(key) else None for key in _FILES}
    chain, key, cas = read["serverCertificate"], read["privateKey"], read["caCertificates"]
    if chain and key is not None and chain[0].public_key().public_numbers() != key.public_key().public_numbers():
        f.error("privateKey", f"{paths['privateKey']} is not the private key of {paths['serverCertificate']}; give "
                              "the key the certificate was issued for")
    if f.report.problems or not chain or key is None:
        return server
    return replace(server, tls=replace(tls, chain=chain, key=key, client_cas=cas or (),
                                       files=tuple(paths[name] for name in _FILES if paths.get(name))))


def _secret_files(compiler, tls: ServerTLS, f: Fields) -> dict:
    """The files of the Secret ``tls.credential`` mounted in the gateway (reported in ``f`` when missing)."""
    directory, name = compiler.workload.credentials_dir, tls.credential
    if directory is None:
        f.error("credentialName", f"credentialName names a Secret mounted in the gateway, but this gateway has no "
                                  "--gateway-credentials-dir: start it with the directory where Secrets are mounted "
                                  f"(it reads DIR/{name}/tls.crt and tls.key), or with --control and --state-dir "
                                  "to get the Secret from mesh-control --kubernetes, or set serverCertificate and "
                                  "privateKey")
        return {}
    found = {key: _secret_file(directory, name, names) for key, names in _SECRET_FILES.items()}
    for key in ("serverCertificate", "privateKey"):
        if found[key] is None:
            f.error("credentialName", f"the Secret {name} mounted in {directory} has no "
                                      f"{' or '.join(_SECRET_FILES[key])} file; mount the Secret there (from "
                                      "mesh-control --kubernetes: create it in the gateway's namespace)")
    if tls.mode == "SIMPLE":
        found["caCertificates"] = None  # a ca.crt of the Secret verifies nothing in mode SIMPLE
    else:
        found["caCertificates"] = found["caCertificates"] or _secret_file(directory, f"{name}-cacert",
                                                                          _SECRET_FILES["caCertificates"])
        if found["caCertificates"] is None:
            f.error("credentialName", f"mode {tls.mode} needs the client CAs: a ca.crt key in the Secret {name} "
                                      f"or a Secret {name}-cacert")
    return found


def _secret_file(directory, name, candidates) -> str | None:
    """The first of ``candidates`` (file names) in ``directory/name``, or None."""
    for candidate in candidates:
        path = os.path.join(directory, name, candidate)
        if os.path.isfile(path):
            return path
    return None


def _intersection(server_host: str, vs_host: str) -> str | None:
    """The narrower of two hosts when one covers the other (Istio's gateway host matching), else None."""
    if server_host == "*" or hostnames.covers(server_host, vs_host):
        return vs_host
    if vs_host == "*" or hostnames.covers(vs_host, server_host):
        return server_host
    return None


#: Envoy's ``require_tls: ALL``: every request to a host of a server with ``tls.httpsRedirect`` gets a
#: 301 to the same URL over https.
_TO_HTTPS = RouteAction(name="httpsRedirect", clusters=(), cumulative_weights=(),
                        extras=RouteExtras(redirect=Redirect(status=301, scheme=b"https")))


_REDIRECT_HOST = VirtualHost(name="httpsRedirect", routes=(CompiledRoute(None, _TO_HTTPS),))
