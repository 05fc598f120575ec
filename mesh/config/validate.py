"""Validation of raw resources into the frozen dataclasses of :mod:`mesh.config.resources`.

The security kinds are validated by :mod:`mesh.config.security` (RequestAuthentication by
:mod:`mesh.config.request_authn`).

:func:`validate` checks each resource on its own and reports every problem it
finds, each naming its field.  Fields that Istio defines but txmesh does not
implement are errors that say so and what to do; they are never ignored.
Cross-references (a route to a host or subset nobody defines) are not checked
here: they are warnings of :mod:`mesh.config.compile`.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import re

from mesh.config import hosts as hostnames
from mesh.config.fields import Fields, Report
from mesh.config.gateway import MESH, gateway, gateway_refs
from mesh.config.regex import RegexError, compile_re2, group_count, group_names
from mesh.config.request_authn import request_authentication
from mesh.config.resources import (
    DEFAULT_LOAD_BALANCER,
    DEFAULT_RETRY,
    ClientTLS,
    ConnectionPool,
    DestinationRule,
    HTTPMatch,
    HTTPRoute,
    L4Match,
    L4Route,
    LoadBalancer,
    RouteDestination,
    ServiceEntry,
    ServicePort,
    StringMatch,
    Subset,
    TrafficPolicy,
    VirtualService,
    WorkloadEndpoint,
    WorkloadEntry,
)
from mesh.config.route_extras import (
    GRPC_STATUS,
    REQUEST_SCHEME,
    CorsPolicy,
    DirectResponse,
    FaultInjection,
    Redirect,
    RegexRewrite,
    default_port,
    origin_test,
    substitution_parts,
)
from mesh.config.security import authorization_policy, peer_authentication
from mesh.config.sidecar import sidecar_resource
from mesh.config.tables import RETRY_ON_NAMES, HeaderOps, OutlierPolicy, RetryPolicy, TcpKeepalive

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_HEADER_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9a-z]+\Z")
_BAD_HEADER_VALUE = re.compile(r"[\r\n\0]")
#: a group name Istio's validation (Go's regexp) accepts: C++ RE2 also takes non-ASCII letters
_GO_GROUP_NAME = re.compile(r"[A-Za-z0-9_]+\Z")

_REMOVE_IT = "remove it"
_MIRROR_PERCENT = "it is deprecated in Istio; use mirrorPercentage: {value: N}"
_LEGACY_HEADERS = "it is deprecated in Istio; use headers.request / headers.response"

# -- ServiceEntry / WorkloadEntry ------------------------------------------------------

_SERVICE_ENTRY = {"hosts", "addresses", "ports", "location", "resolution", "endpoints",
                  "workloadSelector", "exportTo", "subjectAltNames"}
_PORT = {"number", "name", "protocol", "targetPort"}
#: The port protocols txmesh proxies: HTTP ones, and TCP ones (TCP, TLS and HTTPS are opaque TCP; TLS and
#: HTTPS are routed by SNI, never terminated).
_PORT_PROTOCOLS = ("HTTP", "HTTP2", "GRPC", "TCP", "TLS", "HTTPS")
_NO_FILTER = ("txmesh has no {} protocol filter; use protocol TCP, which is how Istio proxies it unless its {} "
              "filter is on")
#: Protocols Istio knows (pkg/config/protocol) that txmesh does not proxy, with what to do instead.
_PORT_PROTOCOLS_REJECTED = {
    "MONGO": _NO_FILTER.format("MongoDB", "Mongo"),
    "REDIS": _NO_FILTER.format("Redis", "Redis"),
    "MYSQL": _NO_FILTER.format("MySQL", "MySQL"),
    "UDP": "txmesh proxies TCP only (UDP is never captured); remove the port",
    "GRPC-WEB": "gRPC-Web is proxied as HTTP; use protocol HTTP",
    "HTTP_PROXY": "outbound HTTP proxy listeners are not implemented; use HTTP",
}
_ENDPOINT = {"address", "ports", "labels", "weight", "serviceAccount"}
_ENDPOINT_UNSUPPORTED = {
    "network": "multi-network meshes are not supported; remove it",
    "locality": "locality-aware load balancing is not supported; remove it",
}
_RESOLUTION_REJECTED = {
    "NONE": ("it forwards to the caller's original destination address, which the txmesh proxy cannot "
             "do yet (NONE is also the default when resolution is omitted); set resolution: STATIC and "
             "list endpoints or a workloadSelector"),
}
#: Resolutions txmesh implements: STATIC (IP endpoints), DNS and DNS_ROUND_ROBIN (the sidecar resolves
#: host names, :mod:`mesh.proxy.dns`).
_RESOLUTIONS = ("STATIC", "DNS", "DNS_ROUND_ROBIN")

# -- DestinationRule ------------------------------------------------------------------

_DESTINATION_RULE = {"host", "trafficPolicy", "subsets", "exportTo"}
_DESTINATION_RULE_UNSUPPORTED = {"workloadSelector": "per-workload DestinationRules are not supported yet; "
                                                     "remove it (the rule then applies to every client)"}
_POLICY = {"loadBalancer", "connectionPool", "outlierDetection", "tls"}
_POLICY_UNSUPPORTED = {"tunnel": "tunneling TCP through an HTTP CONNECT proxy is not implemented; remove it",
                       "proxyProtocol": "the PROXY protocol is not implemented; remove it"}
_SIMPLE_LB = {"ROUND_ROBIN": "ROUND_ROBIN", "LEAST_REQUEST": "LEAST_REQUEST", "RANDOM": "RANDOM",
              "LEAST_CONN": "LEAST_REQUEST", "UNSPECIFIED": DEFAULT_LOAD_BALANCER.policy}
_SIMPLE_LB_REJECTED = {"PASSTHROUGH": "it forwards to the caller's original destination address, which "
                                      "the txmesh proxy cannot do; use LEAST_REQUEST, ROUND_ROBIN or RANDOM"}
_LB_UNSUPPORTED = {"localityLbSetting": "locality-aware load balancing is not supported; remove it",
                   "warmupDurationSecs": "slow start (warmup) is not supported; remove it",
                   "warmup": "slow start (warmup) is not supported; remove it"}
_HASH_KEYS = ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
_HASH_UNSUPPORTED = {
    "ringHash": "the hash ring is not tunable in txmesh; remove it",
    "maglev": "Maglev hashing is not supported (txmesh uses a hash ring); remove it",
    "minimumRingSize": "the hash ring is not tunable in txmesh; remove it",
    "httpHeaderRegexRewrite": "rewriting the hash key is not supported; remove it",
}
_COOKIE_GENERATION = ("txmesh hashes on an existing cookie and never generates one; remove it "
                      "(keep httpCookie.name)")
_HTTP_POOL = {"maxRequestsPerConnection", "idleTimeout", "h2UpgradePolicy", "useClientProtocol",
              "maxConcurrentStreams", "http1MaxPendingRequests", "http2MaxRequests", "maxRetries"}
_H2_UPGRADE_POLICIES = ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")
_OUTLIER = {"consecutive5xxErrors", "consecutiveGatewayErrors", "interval", "baseEjectionTime",
            "maxEjectionPercent"}
_OUTLIER_UNSUPPORTED = {
    "consecutiveErrors": "it is deprecated in Istio; use consecutive5xxErrors",
    "splitExternalLocalOriginErrors": "local-origin failures always count as 5xx and gateway errors (and, "
                                      "unless consecutive5xxErrors is 0, eject after one connect failure); "
                                      "remove it",
    "consecutiveLocalOriginFailures": "local-origin failures always count as 5xx and gateway errors (and, "
                                      "unless consecutive5xxErrors is 0, eject after one connect failure); "
                                      "remove it",
    "minHealthPercent": "outlier detection is never switched off by low health; remove it",
}
_TLS = {"mode", "clientCertificate", "privateKey", "caCertificates", "sni", "subjectAltNames", "insecureSkipVerify"}
_TLS_UNSUPPORTED = {
    "credentialName": "txmesh reads origination certificates from files on the sidecar's host, not from a "
                      "Kubernetes Secret; set clientCertificate, privateKey and caCertificates (paths to PEM "
                      "files) instead",
    "caCrl": "certificate revocation lists are not checked; remove it",
}
#: Fields of ``tls`` that only TLS origination (SIMPLE, MUTUAL) uses.
_TLS_ORIGINATION_FIELDS = ("clientCertificate", "privateKey", "caCertificates", "sni", "subjectAltNames",
                           "insecureSkipVerify")
_TLS_MODES = ("DISABLE", "ISTIO_MUTUAL", "SIMPLE", "MUTUAL")

# -- VirtualService -------------------------------------------------------------------

_VIRTUAL_SERVICE = {"hosts", "gateways", "http", "tcp", "tls", "exportTo"}
_L4_ROUTE = {"match", "route"}
_L4_MATCH = {"destinationSubnets", "port", "sourceLabels", "sourceNamespace", "gateways"}
_TLS_MATCH = _L4_MATCH | {"sniHosts"}
_L4_MATCH_UNSUPPORTED = {"sourceSubnet": "it is deprecated in Istio, which ignores it; remove it (restrict callers "
                                         "with an AuthorizationPolicy's ipBlocks)"}
_HTTP_ROUTE = {"name", "match", "route", "rewrite", "timeout", "retries", "headers", "redirect", "directResponse",
               "fault", "corsPolicy", "mirror", "mirrors", "mirrorPercentage"}
_HTTP_ROUTE_UNSUPPORTED = {
    "delegate": "VirtualService delegation is not supported; put the routes in this VirtualService",
    "mirrorPercent": _MIRROR_PERCENT, "mirror_percent": _MIRROR_PERCENT,
    "appendHeaders": _LEGACY_HEADERS, "appendRequestHeaders": _LEGACY_HEADERS,
    "appendResponseHeaders": _LEGACY_HEADERS, "removeRequestHeaders": _LEGACY_HEADERS,
    "removeResponseHeaders": _LEGACY_HEADERS,
}
#: Fields of a route that answers locally (Istio's ``validateHTTPRouteConflict``).
_LOCAL_ANSWERS = ("redirect", "directResponse")
_REDIRECT = {"uri", "authority", "port", "derivePort", "scheme", "redirectCode"}
#: The redirect statuses Envoy can send (Istio accepts any 3xx but cannot program the others).
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_DIRECT_BODY_LIMIT = 1024 * 1024  # Istio's limit on a directResponse body
_FAULT_DELAY_UNSUPPORTED = {"exponentialDelay": "Istio does not support it either; use fixedDelay"}
_FAULT_ABORT_UNSUPPORTED = {
    "http2Error": "Istio does not support it either; use httpStatus or grpcStatus",
    "percent": "it was removed from Istio's abort; use percentage: {value: N}",
}
_CORS = {"allowOrigins", "allowOrigin", "allowMethods", "allowHeaders", "exposeHeaders", "maxAge",
         "allowCredentials", "unmatchedPreflights"}
#: Istio's ``supportedCORSMethods``.
_CORS_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE", "*")
_CORS_HEADER_NAME = re.compile(r"[-_A-Za-z0-9]+\Z")
_MATCH = {"name", "uri", "method", "authority", "headers", "withoutHeaders", "queryParams",
          "ignoreUriCase", "gateways", "port", "sourceLabels", "sourceNamespace"}
_MATCH_UNSUPPORTED = {
    "scheme": "the scheme is always http between an app and its sidecar; remove it",
    "statPrefix": _REMOVE_IT,
}
_MATCH_KEYS_IN_HEADERS = {"uri": "match.uri", "method": "match.method", "authority": "match.authority",
                          ":path": "match.uri", ":method": "match.method", ":authority": "match.authority",
                          "host": "match.authority"}
_RETRIES_UNSUPPORTED = {"retryRemoteLocalities": "locality-aware retries are not supported; remove it",
                        "retryIgnorePreviousHosts": "retries already prefer other endpoints; remove it",
                        "backoff": "the retry backoff is fixed (25 ms base, jittered); remove it"}
#: retryOn conditions that Istio accepts but the built-in retry plugin does not evaluate.
_RETRY_ON_UNSUPPORTED = {"envoy-ratelimited", "retriable-headers", "reset-before-request",
                         "http3-post-connect-failure"}


def validate(resources, domain: str = hostnames.DEFAULT_DOMAIN) -> tuple:
    """Validate resources one by one; return ``(valid_objects, errors)``.

    A resource with any problem is left out of ``valid_objects``; ``errors``
    holds a :class:`mesh.config.errors.ConfigError` for every problem of every
    resource.  ``domain`` is the cluster DNS domain used to qualify short names.
    """
    objects, errors = [], []
    for resource in resources:
        report = Report()
        obj = _VALIDATORS[resource.kind](resource, report, domain)
        if report.problems:
            problems = [resource.error(path, reason) for path, reason in report.problems]
            errors.extend(sorted(problems, key=lambda error: error.line))
        else:
            objects.append(obj)
    return objects, errors


# -- shared pieces ----------------------------------------------------------------------

def _hosts(f: Fields, key, namespace, domain, required, allow_ip=False, allow_star=False) -> tuple:
    """The list of hosts under ``key``, fully qualified, each checked (``*`` too where ``allow_star``)."""
    out = []
    for path, value in f.strings(key, required):
        problem = None if allow_star and value == "*" else hostnames.check(value, allow_ip=allow_ip)
        name = None if problem else hostnames.fqdn(value, namespace, domain)
        if name in out:
            problem = f"duplicate host '{value}' ({name})"
        if problem:
            f.report.add(path, problem)
        else:
            out.append(name)
    return tuple(out)


def _export_to(f: Fields) -> tuple:
    values = []
    for path, value in f.strings("exportTo"):
        if value in ("*", ".", "~") or _DNS_LABEL.match(value):
            values.append(value)
        else:
            f.report.add(path, f"invalid exportTo entry '{value}'; use '*', '.', '~' or a namespace name")
    if len(values) > 1 and ("*" in values or "~" in values):
        f.error("exportTo", "'*' and '~' cannot be combined with other entries")
    return tuple(values)


def _gateways(f: Fields) -> None:
    """The ``gateways`` of a tls match: the sidecars only (the gateway has no TLS passthrough servers)."""
    for path, value in f.strings("gateways"):
        if value != MESH:
            f.report.add(path, f"gateway '{value}' in a tls route: the txmesh gateway has no TLS passthrough "
                               "servers; remove it")


def _dns_name(f: Fields, key, pattern, what, required=False) -> str:
    value = f.string(key, required)
    if value and not pattern.match(value):
        f.error(key, f"invalid {what} '{value}': use lower-case letters, digits and '-'")
    return value


# -- ServiceEntry / WorkloadEntry ------------------------------------------------------

def _service_entry(resource, report, domain) -> ServiceEntry:
    f = Fields(report, ("spec",), resource.spec, _SERVICE_ENTRY)
    ports = _service_ports(f)
    port_names = {port.name for port in ports}
    resolution = f.enum("resolution", _RESOLUTIONS, _RESOLUTION_REJECTED)
    if "resolution" not in f:
        f.error("resolution", f"resolution NONE is not supported by txmesh; {_RESOLUTION_REJECTED['NONE']}")
    dns = resolution in ("DNS", "DNS_ROUND_ROBIN")
    endpoints = tuple(_endpoint(Fields(report, path, item, _ENDPOINT, _ENDPOINT_UNSUPPORTED), port_names, dns)
                      for path, item in f.items("endpoints"))
    selector = f.sub("workloadSelector", {"labels"}).labels("labels") if "workloadSelector" in f else None
    if endpoints and selector is not None:
        f.error("workloadSelector", "set only one of endpoints or workloadSelector")
    if resolution == "DNS_ROUND_ROBIN" and len(endpoints) > 1:
        f.error("endpoints", "resolution DNS_ROUND_ROBIN takes 0 or 1 endpoint (as Istio); use resolution: DNS "
                             "to balance over several endpoints")
    hosts = _hosts(f, "hosts", resource.namespace, domain, required=True)
    if dns and not endpoints and selector is None and any(host.startswith("*") for host in hosts):
        f.error("hosts", f"hosts must be fully qualified names, not wildcards, when resolution {resolution} "
                         "has no endpoints to resolve (the sidecar resolves the hosts themselves); list "
                         "endpoints, or use resolution: STATIC")
    if dns and len(hosts) > 1 and any(port.protocol == "TCP" for port in ports):
        f.error("hosts", f"resolution {resolution} with several hosts needs HTTP, TLS or HTTPS ports (as Istio): a "
                         "TCP connection cannot tell which host it is for; write one ServiceEntry per host")
    addresses = []
    for path, address in f.strings("addresses"):
        if hostnames.is_ip(address):
            addresses.append(address.lower())
        else:
            report.add(path, f"'{address}' is not an IP address (CIDR ranges are not supported); "
                             "list single IP addresses")
    return ServiceEntry(
        name=resource.name, namespace=resource.namespace,
        hosts=hosts, addresses=tuple(addresses), ports=ports,
        location=f.enum("location", ("MESH_EXTERNAL", "MESH_INTERNAL"), default="MESH_EXTERNAL"),
        resolution=resolution, endpoints=endpoints, subject_alt_names=_subject_alt_names(f),
        export_to=_export_to(f), workload_selector=selector, source=resource)


def _service_ports(f: Fields) -> tuple:
    ports, names, numbers = [], set(), set()
    for path, item in f.items("ports", required=True):
        pf = Fields(f.report, path, item, _PORT)
        number = pf.port("number", required=True)
        name = _dns_name(pf, "name", _DNS_LABEL, "port name", required=True)
        protocol = _port_protocol(pf)
        if name and name in names:
            pf.error("name", f"duplicate port name '{name}'")
        if number and number in numbers:
            pf.error("number", f"duplicate port number {number}")
        names.add(name)
        numbers.add(number)
        ports.append(ServicePort(number=number or 0, name=name or "", protocol=protocol,
                                 target_port=pf.port("targetPort")))
    return tuple(ports)


def _port_protocol(f: Fields) -> str:
    """The ``protocol`` of a ServiceEntry port, upper-case (Istio reads it case-insensitively).

    Without one, HTTP: where Istio would sniff the protocol, txmesh takes HTTP, as before.
    """
    protocol = (f.string("protocol") or "HTTP").upper()
    if protocol in _PORT_PROTOCOLS:
        return protocol
    if protocol in _PORT_PROTOCOLS_REJECTED:
        f.error("protocol", f"protocol {protocol} is not supported by txmesh; {_PORT_PROTOCOLS_REJECTED[protocol]}")
    else:
        f.error("protocol", f"unknown protocol '{protocol}'; use one of: {', '.join(_PORT_PROTOCOLS)}")
    return "HTTP"


def _endpoint(f: Fields, port_names=None, dns=False) -> WorkloadEndpoint:
    """A ServiceEntry endpoint or a WorkloadEntry spec (the same message in Istio).

    With ``dns`` (the entry's resolution is DNS or DNS_ROUND_ROBIN) the address may be a host name,
    which the sidecar resolves; else it must be an IP address.
    """
    address = f.string("address", required=True)
    if address and not hostnames.is_ip(address):
        if not dns:
            f.error("address", f"'{address}' is not an IP address; txmesh resolves host names only in the "
                               "endpoints of a ServiceEntry with resolution DNS or DNS_ROUND_ROBIN; use an IP "
                               "address, or set that resolution")
        elif not _DNS_SUBDOMAIN.match(address.lower().rstrip(".")):
            f.error("address", f"endpoint address '{address}' is not a valid host name or IP address")
        address = address.lower().rstrip(".")
    ports = []
    for name, number in f.mapping("ports").items():
        path = f.path + ("ports", name)
        if port_names is not None and name not in port_names:
            f.report.add(path, f"'{name}' is not a port name of this ServiceEntry; use one of: "
                               f"{', '.join(sorted(port_names))}")
        elif isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
            f.report.add(path, f"must be a port number from 1 to 65535, not {number!r}")
        else:
            ports.append((name, number))
    account = _dns_name(f, "serviceAccount", _DNS_SUBDOMAIN, "service account")
    return WorkloadEndpoint(address=address or "", ports=tuple(sorted(ports)), labels=f.labels("labels"),
                            weight=f.integer("weight", minimum=0, maximum=2 ** 32 - 1) or 1,
                            service_account=account or None)


def _subject_alt_names(f: Fields) -> tuple:
    names = f.strings("subjectAltNames")
    for path, name in names:
        if not name.startswith("spiffe://"):
            f.report.add(path, f"'{name}' is not a SPIFFE id; txmesh verifies mesh identities "
                               "(spiffe://<trust-domain>/ns/<ns>/sa/<sa>)")
    if len(names) > 1:
        f.error("subjectAltNames", "txmesh verifies one identity per endpoint: list one SPIFFE id, or set "
                                   "serviceAccount on each endpoint")
    return tuple(name for _, name in names)


def _workload_entry(resource, report, domain) -> WorkloadEntry:
    f = Fields(report, ("spec",), resource.spec, _ENDPOINT, _ENDPOINT_UNSUPPORTED)
    return WorkloadEntry(name=resource.name, namespace=resource.namespace, endpoint=_endpoint(f),
                         source=resource)


# -- DestinationRule ------------------------------------------------------------------

def _destination_rule(resource, report, domain) -> DestinationRule:
    f = Fields(report, ("spec",), resource.spec, _DESTINATION_RULE, _DESTINATION_RULE_UNSUPPORTED)
    host = f.string("host", required=True)
    problem = hostnames.check(host) if host else None
    if problem:
        f.error("host", problem)
    subsets, names = [], set()
    for path, item in f.items("subsets"):
        sf = Fields(report, path, item, {"name", "labels", "trafficPolicy"})
        name = _dns_name(sf, "name", _DNS_LABEL, "subset name", required=True)
        if name and name in names:
            sf.error("name", f"duplicate subset name '{name}'")
        names.add(name)
        subsets.append(Subset(name=name or "", labels=sf.labels("labels"),
                              traffic_policy=_traffic_policy(sf)))
    return DestinationRule(
        name=resource.name, namespace=resource.namespace,
        host=hostnames.fqdn(host, resource.namespace, domain) if host and not problem else "",
        traffic_policy=_traffic_policy(f), subsets=tuple(subsets), export_to=_export_to(f),
        source=resource)


def _traffic_policy(parent: Fields):
    """The ``trafficPolicy`` under ``parent`` (None if absent), with its portLevelSettings."""
    if "trafficPolicy" not in parent:
        return None
    f = parent.sub("trafficPolicy", _POLICY | {"portLevelSettings"}, _POLICY_UNSUPPORTED)
    port_level, seen = [], set()
    for path, item in f.items("portLevelSettings"):
        pf = Fields(f.report, path, item, _POLICY | {"port"}, _POLICY_UNSUPPORTED)
        number = pf.sub("port", {"number"}).port("number", required=True)
        if "port" not in pf:
            pf.error("port", "'port' is required")
        elif number in seen:
            pf.error("port", f"duplicate port {number}")
        seen.add(number)
        port_level.append((number, _policy_settings(pf)))
    return _policy_settings(f, tuple(port_level))


def _policy_settings(f: Fields, port_level=()) -> TrafficPolicy:
    return TrafficPolicy(
        load_balancer=_load_balancer(f) if "loadBalancer" in f else None,
        connection_pool=_connection_pool(f) if "connectionPool" in f else None,
        outlier_detection=_outlier_detection(f) if "outlierDetection" in f else None,
        tls=_client_tls(f) if "tls" in f else None,
        port_level=port_level)


def _client_tls(parent: Fields) -> ClientTLS:
    """Istio's ``ClientTLSSettings``, checked as Istio's ``validateTLS`` does.

    A field that the mode does not use is an error rather than ignored.  The files are read by the
    sidecar that uses them (:mod:`mesh.proxy.tls_origination`), on its own host.
    """
    f = parent.sub("tls", _TLS, _TLS_UNSUPPORTED)
    mode = f.enum("mode", _TLS_MODES, default="DISABLE")
    if mode not in ("SIMPLE", "MUTUAL"):
        for key in _TLS_ORIGINATION_FIELDS:
            if key in f:
                f.error(key, f"'{key}' is used only to originate TLS (mode SIMPLE or MUTUAL), not with mode "
                             f"{mode}; remove it, or set mode: SIMPLE")
        return ClientTLS(mode)
    for key, what in (("clientCertificate", "client certificate"), ("privateKey", "client certificate's key")):
        if mode == "MUTUAL" and key not in f:
            f.error(key, f"'{key}' is required with mode MUTUAL: the path of the PEM file of the {what} that the "
                         "sidecar presents to the server")
        elif mode == "SIMPLE" and key in f:
            f.error(key, f"'{key}' is presented only with mode MUTUAL; set mode: MUTUAL, or remove it")
    skip = f.boolean("insecureSkipVerify")
    names = tuple(name for _, name in f.strings("subjectAltNames"))
    sni = f.string("sni") or None
    if sni is not None and (hostnames.is_ip(sni) or not _DNS_SUBDOMAIN.match(sni)):
        f.error("sni", f"'{sni}' is not a host name (lower-case, no IP address: RFC 6066); set the server name "
                       "to send, or remove it to send the service's host")
        sni = None
    if skip:
        for key in ("caCertificates", "subjectAltNames"):
            if key in f:
                f.error(key, f"'{key}' cannot be set with insecureSkipVerify: true (nothing is verified); remove "
                             "one of the two")
    return ClientTLS(mode, client_certificate=f.string("clientCertificate"),
                     private_key=f.string("privateKey"),
                     ca_certificates=f.string("caCertificates") or None, sni=sni,
                     subject_alt_names=names, insecure_skip_verify=skip)


def _load_balancer(parent: Fields) -> LoadBalancer:
    f = parent.sub("loadBalancer", {"simple", "consistentHash"}, _LB_UNSUPPORTED)
    if "consistentHash" not in f:
        return LoadBalancer(f.enum("simple", _SIMPLE_LB, _SIMPLE_LB_REJECTED,
                                   default=DEFAULT_LOAD_BALANCER.policy))
    if "simple" in f:
        f.error(None, "set only one of simple or consistentHash")
    h = f.sub("consistentHash", set(_HASH_KEYS), _HASH_UNSUPPORTED)
    keys = [key for key in _HASH_KEYS if key in h]
    if len(keys) != 1:
        h.error(None, f"set exactly one of {', '.join(_HASH_KEYS)}")
        return LoadBalancer("CONSISTENT_HASH")
    key = keys[0]
    if key == "useSourceIp":
        if not h.boolean(key):
            h.error(key, "set useSourceIp: true, or choose another hash key")
        return LoadBalancer("CONSISTENT_HASH", ("source_ip", None))
    if key == "httpCookie":
        name = h.sub(key, {"name"}, {"path": _COOKIE_GENERATION, "ttl": _COOKIE_GENERATION}).string(
            "name", required=True)
        return LoadBalancer("CONSISTENT_HASH", ("cookie", name))
    name = h.string(key, required=True)
    if key == "httpHeaderName":
        return LoadBalancer("CONSISTENT_HASH", ("header", _header_name(h, key, name)))
    return LoadBalancer("CONSISTENT_HASH", ("query", name))


def _connection_pool(parent: Fields) -> ConnectionPool:
    f = parent.sub("connectionPool", {"tcp", "http"})
    tcp = f.sub("tcp", {"connectTimeout", "maxConnections", "tcpKeepalive", "maxConnectionDuration", "idleTimeout"})
    http = f.sub("http", _HTTP_POOL)
    tcp_idle_timeout = tcp.duration("idleTimeout", zero=True)  # 0s: none (Istio allows it since 1.26)
    http_idle_timeout = http.duration("idleTimeout")
    values = {"connect_timeout": tcp.duration("connectTimeout"),
              "tcp_idle_timeout": tcp_idle_timeout,
              "tcp_keepalive": _tcp_keepalive(tcp) if "tcpKeepalive" in tcp else None,
              "max_connection_duration": tcp.duration("maxConnectionDuration"),  # at least 1ms, as in Istio
              "max_connections": tcp.integer("maxConnections", minimum=0),
              "max_pending_requests": http.integer("http1MaxPendingRequests", minimum=0),
              "max_requests": http.integer("http2MaxRequests", minimum=0),
              "max_retries": http.integer("maxRetries", minimum=0),
              "max_requests_per_connection": http.integer("maxRequestsPerConnection", minimum=0),
              # Istio's pools fall back on tcp.idleTimeout when http.idleTimeout is not set
              "idle_timeout": http_idle_timeout if http_idle_timeout is not None else tcp_idle_timeout,
              "h2_upgrade_policy": http.enum("h2UpgradePolicy", _H2_UPGRADE_POLICIES),
              "use_client_protocol": http.boolean("useClientProtocol"),
              "max_concurrent_streams": http.integer("maxConcurrentStreams", minimum=0)}
    if values["use_client_protocol"] and values["h2_upgrade_policy"] == "UPGRADE":
        http.error("h2UpgradePolicy", "useClientProtocol: true keeps the client's protocol, so Istio ignores "
                                      "h2UpgradePolicy UPGRADE; remove one of the two")
    return ConnectionPool(**{name: value for name, value in values.items() if value is not None})


#: The kernel's limits on the keepalive settings (``MAX_TCP_KEEPIDLE``, ``MAX_TCP_KEEPINTVL``, ``MAX_TCP_KEEPCNT``).
_KEEPALIVE_MAX_SECONDS, _KEEPALIVE_MAX_PROBES = 32767, 127


def _tcp_keepalive(tcp: Fields) -> TcpKeepalive:
    """``tcp.tcpKeepalive``: keepalive on (even when empty, as in Istio), each setting in whole seconds."""
    f = tcp.sub("tcpKeepalive", {"time", "interval", "probes"})
    return TcpKeepalive(time=_keepalive_seconds(f, "time"), interval=_keepalive_seconds(f, "interval"),
                        probes=f.integer("probes", minimum=1, maximum=_KEEPALIVE_MAX_PROBES))


def _keepalive_seconds(f: Fields, key: str) -> int | None:
    """A keepalive duration: whole seconds from 1 s to the kernel's maximum (Istio passes Envoy whole
    seconds too, dropping a fraction; txmesh says so instead)."""
    seconds = f.duration(key)
    if seconds is None:
        return None
    if seconds != int(seconds) or not 1 <= seconds <= _KEEPALIVE_MAX_SECONDS:
        f.error(key, f"must be whole seconds from 1s to {_KEEPALIVE_MAX_SECONDS}s (the kernel counts TCP keepalive "
                     f"times in seconds), not {f.data[key]}")
        return None
    return int(seconds)


def _outlier_detection(parent: Fields) -> OutlierPolicy:
    f = parent.sub("outlierDetection", _OUTLIER, _OUTLIER_UNSUPPORTED)
    values = {"consecutive_5xx": f.integer("consecutive5xxErrors", minimum=0),
              "consecutive_gateway_errors": f.integer("consecutiveGatewayErrors", minimum=0),
              "interval": f.duration("interval"),
              "base_ejection_time": f.duration("baseEjectionTime"),
              "max_ejection_percent": f.integer("maxEjectionPercent", minimum=0, maximum=100)}
    if values["consecutive_5xx"] == 0:
        # Istio does not split local-origin errors from 5xx, so Envoy counts a connect failure as a 503:
        # switching 5xx ejection off switches off txmesh's ejection after one connect failure too
        values["consecutive_connect_failures"] = 0
    return OutlierPolicy(**{name: value for name, value in values.items() if value is not None})


# -- VirtualService -------------------------------------------------------------------

def _virtual_service(resource, report, domain) -> VirtualService:
    f = Fields(report, ("spec",), resource.spec, _VIRTUAL_SERVICE)
    if "hosts" not in f:
        f.error("hosts", "'hosts' is required (delegate VirtualServices without hosts are not supported)")
    namespace = resource.namespace
    gateways = gateway_refs(f, "gateways", namespace)
    routes_given = [key for key in ("http", "tcp", "tls") if key in f]
    if not routes_given:
        f.error(None, "set at least one of http, tcp or tls (the routes of HTTP, TCP and TLS traffic)")
    http = tuple(_http_route(Fields(report, path, item, _HTTP_ROUTE, _HTTP_ROUTE_UNSUPPORTED), index,
                             namespace, domain)
                 for index, (path, item) in enumerate(f.items("http", required="http" in routes_given)))
    hosts = _hosts(f, "hosts", namespace, domain, required="hosts" in f, allow_ip=True,
                   allow_star=bool(gateways) and MESH not in gateways)  # Istio: '*' only on gateways
    written = {value.lower() for value in f.data.get("hosts") or () if isinstance(value, str)} if isinstance(
        f.data.get("hosts"), list) else set()
    tcp = tuple(_l4_route(Fields(report, path, item, _L4_ROUTE), index, namespace, domain)
                for index, (path, item) in enumerate(f.items("tcp", required="tcp" in routes_given)))
    tls = tuple(_l4_route(Fields(report, path, item, _L4_ROUTE), index, namespace, domain, hosts + tuple(written))
                for index, (path, item) in enumerate(f.items("tls", required="tls" in routes_given)))
    return VirtualService(name=resource.name, namespace=namespace, hosts=hosts, http=http,
                          export_to=_export_to(f), tcp=tcp, tls=tls, source=resource, gateways=gateways)


def _l4_route(f: Fields, index, namespace, domain, vs_hosts=None) -> L4Route:
    """A ``tcp`` route, or a ``tls`` route when ``vs_hosts`` (the hosts its ``sniHosts`` must be among) is given.

    A ``tls`` route needs at least one match, each with ``sniHosts``, as in Istio.
    """
    tls = vs_hosts is not None
    matches = tuple(_l4_match(Fields(f.report, path, item, _TLS_MATCH if tls else _L4_MATCH, _L4_MATCH_UNSUPPORTED),
                              namespace, vs_hosts)
                    for path, item in f.items("match", required=tls))
    return L4Route(index=index, match=matches, route=_destinations(f, namespace, domain, http=False))


def _l4_match(f: Fields, namespace, vs_hosts=None) -> L4Match:
    """Istio's L4MatchAttributes, or its TLSMatchAttributes when ``vs_hosts`` is given (see :func:`_l4_route`)."""
    gateways = ()
    if vs_hosts is None:
        gateways = gateway_refs(f, "gateways", namespace)
    else:
        _gateways(f)
    subnets = []
    for path, text in f.strings("destinationSubnets"):
        try:
            subnets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            f.report.add(path, f"invalid IP address or CIDR range '{text}' (like 10.0.0.1 or 10.0.0.0/16)")
    sni_hosts = []
    for path, name in (f.strings("sniHosts", required=True) if vs_hosts is not None else ()):
        problem = hostnames.check(name)
        name = name.lower()
        if problem is None and not any(hostnames.covers(host, name) for host in vs_hosts):
            problem = (f"SNI host '{name}' is not one of the VirtualService's hosts (nor under one of its wildcard "
                       f"hosts): {', '.join(sorted(set(vs_hosts)))}; a tls route only sees the connections to "
                       "its VirtualService's hosts")
        if problem:
            f.report.add(path, problem)
        elif name not in sni_hosts:
            sni_hosts.append(name)
    return L4Match(sni_hosts=tuple(sni_hosts), destination_subnets=tuple(subnets), port=f.port("port"),
                   source_labels=f.labels("sourceLabels"),
                   source_namespace=_dns_name(f, "sourceNamespace", _DNS_LABEL, "namespace") or None,
                   gateways=gateways)


def _http_route(f: Fields, index, namespace, domain) -> HTTPRoute:
    matches = tuple(_match(Fields(f.report, path, item, _MATCH, _MATCH_UNSUPPORTED), namespace)
                    for path, item in f.items("match"))
    rewrite_uri = rewrite_authority = rewrite_regex = None
    if "rewrite" in f:
        rewrite_uri, rewrite_authority, rewrite_regex = _rewrite(f.sub("rewrite", {"uri", "authority",
                                                                                   "uriRegexRewrite"}))
    request, header_authority = _header_ops(f, "request")
    if header_authority is not None:
        if rewrite_authority:
            f.error("headers", "the authority is set both by rewrite.authority and by a host header; "
                               "keep one of them")
        rewrite_authority = header_authority
    answers = [key for key in _LOCAL_ANSWERS if key in f]
    for other in ("route", "fault", "rewrite", "mirror", "mirrors") if answers else ():
        if other in f:
            f.error(other, f"a route with {answers[0]} answers locally, without forwarding: remove {other} (Istio "
                           "rejects them together)")
    if len(answers) > 1:
        f.error("directResponse", "set only one of redirect or directResponse")
    return HTTPRoute(
        index=index, name=f.string("name"), match=matches,
        route=() if answers or not _route_given(f) else _destinations(f, namespace, domain),
        rewrite_uri=rewrite_uri, rewrite_authority=rewrite_authority, timeout=f.duration("timeout"),
        retry=_retries(f) if "retries" in f else DEFAULT_RETRY, request_headers=request,
        response_headers=_header_ops(f, "response")[0],
        fault=_fault(f.sub("fault", {"delay", "abort"})) if "fault" in f else None,
        redirect=_redirect(f.sub("redirect", _REDIRECT)) if "redirect" in f else None,
        direct_response=_direct_response(f.sub("directResponse", {"status", "body"}))
        if "directResponse" in f else None,
        cors=_cors(f.sub("corsPolicy", _CORS)) if "corsPolicy" in f else None,
        rewrite_regex=rewrite_regex, mirrors=_mirrors(f, namespace, domain))


def _mirrors(f: Fields, namespace, domain) -> tuple:
    """``((RouteDestination, fraction), ...)`` of a route's ``mirror`` (with ``mirrorPercentage``) or
    ``mirrors``; a mirror without a percentage gets every request, as in Istio."""
    if "mirror" in f and "mirrors" in f:
        f.error("mirrors", "set only one of mirror or mirrors (Istio rejects them together)")
        return ()
    if "mirrorPercentage" in f and "mirror" not in f:
        f.error("mirrorPercentage", "mirrorPercentage applies to mirror only; set mirror, or give each "
                                    "mirrors entry its own percentage")
        _fraction(f, "mirrorPercentage")
    if "mirror" in f:
        fraction = _fraction(f, "mirrorPercentage") if "mirrorPercentage" in f else 1.0
        return ((_destination(f.sub("mirror", {"host", "subset", "port"}), namespace, domain), fraction),)
    out = []
    for path, item in f.items("mirrors"):
        mf = Fields(f.report, path, item, {"destination", "percentage"})
        if "destination" not in mf:
            mf.error("destination", "'destination' is required")
        fraction = _fraction(mf) if "percentage" in mf else 1.0
        out.append((_destination(mf.sub("destination", {"host", "subset", "port"}), namespace, domain), fraction))
    return tuple(out)


def _route_given(f: Fields) -> bool:
    """Whether an http route without redirect or directResponse has its ``route`` (else reported)."""
    if "route" not in f:
        f.error("route", "'route' is required: the destinations of the requests (or answer them here with "
                         "redirect or directResponse)")
        return False
    return True


def _rewrite(f: Fields) -> tuple:
    """``(uri, authority, RegexRewrite or None)`` of a route's ``rewrite``."""
    uri, authority = _path_value(f, "uri"), f.string("authority")
    if authority:
        authority = _header_value(f.report, f.path + ("authority",), authority)
    regex = _uri_regex_rewrite(f.sub("uriRegexRewrite", {"match", "rewrite"})) if "uriRegexRewrite" in f else None
    if uri and "uriRegexRewrite" in f:
        f.error("uriRegexRewrite", "set only one of uri or uriRegexRewrite")
    if not uri and not authority and "uriRegexRewrite" not in f:
        f.error(None, "rewrite must set uri, uriRegexRewrite or authority")
    return uri, authority, regex


def _path_value(f: Fields, key) -> str | None:
    """A path written into requests or Location headers: ASCII, without spaces or control characters."""
    value = f.string(key) or None
    if value is not None and (not value.isascii() or not value.isprintable() or " " in value):
        f.error(key, f"{value!r} is not a usable path: use ASCII without spaces or control characters "
                     "(percent-encode the others)")
        return None
    return value


def _uri_regex_rewrite(f: Fields):
    """``rewrite.uriRegexRewrite``: a RE2 ``match`` and its ``rewrite`` (groups as ``\\1``)."""
    text, rewrite = f.string("match", required=True), f.string("rewrite", required=True)
    if not text or rewrite is None:
        return None
    problem = regex_problem(text)
    if problem:
        f.error("match", problem)
        return None
    pattern = compile_re2(text)
    parts, problem = substitution_parts(rewrite, group_count(pattern))
    if problem:
        f.error("rewrite", problem)
        return None
    return RegexRewrite(pattern, parts, (text, rewrite))


def _fault(f: Fields) -> FaultInjection:
    """Istio's ``fault``: a ``delay``, an ``abort`` or both."""
    if "delay" not in f and "abort" not in f:
        f.error(None, "set delay, abort or both")
    values, without = {}, []
    if "delay" in f:
        df = f.sub("delay", {"fixedDelay", "percentage", "percent"}, _FAULT_DELAY_UNSUPPORTED)
        values["delay"] = df.duration("fixedDelay")
        if "fixedDelay" not in df:
            df.error("fixedDelay", "'fixedDelay' is required")
        if "percentage" in df:
            values["delay_fraction"] = _fraction(df)
        elif "percent" in df:  # deprecated, still read by Istio when percentage is absent
            values["delay_fraction"] = (df.integer("percent", minimum=0, maximum=100) or 0) / 100
        else:
            without.append("delay")
    if "abort" in f:
        af = f.sub("abort", {"httpStatus", "grpcStatus", "percentage"}, _FAULT_ABORT_UNSUPPORTED)
        if ("httpStatus" in af) == ("grpcStatus" in af):
            af.error(None, "set one of httpStatus or grpcStatus")
        values["abort_status"] = af.integer("httpStatus", minimum=200, maximum=599)
        grpc_status = af.string("grpcStatus")
        if grpc_status is not None and grpc_status not in GRPC_STATUS:
            af.error("grpcStatus", f"unknown gRPC status {grpc_status!r}; use one of {', '.join(GRPC_STATUS)}")
        values["abort_grpc"] = GRPC_STATUS.get(grpc_status)
        if "percentage" in af:
            values["abort_fraction"] = _fraction(af)
        else:
            without.append("abort")
    return FaultInjection(**values, without_percentage=tuple(without))


def _fraction(f: Fields, key="percentage") -> float:
    """``percentage.value`` (or ``key``'s) as a fraction, at the resolution Istio gives Envoy (per million)."""
    pf = f.sub(key, {"value"})
    value = pf.data.get("value", 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        pf.error("value", f"must be a number from 0 to 100, not {value!r}")
        return 0.0
    if value < 0 or value > 100 or 0 < value < 0.0001:
        pf.error("value", f"percentage {value} is neither 0 nor in the range [0.0001, 100]")
        return 0.0
    return int(value * 10000) / 1_000_000


def _redirect(f: Fields) -> Redirect:
    """Istio's ``redirect`` (Envoy's RedirectAction)."""
    if not any(key in f for key in ("uri", "authority", "scheme", "port", "derivePort")):
        f.error(None, "set at least one of uri, authority, scheme, port or derivePort")
    if "port" in f and "derivePort" in f:
        f.error("derivePort", "set only one of port or derivePort")
    authority = f.string("authority") or None
    if authority:
        authority = _header_value(f.report, f.path + ("authority",), authority)
    scheme = f.enum("scheme", ("http", "https"))
    scheme = scheme.encode() if scheme else None
    code = f.integer("redirectCode")
    if code and code not in _REDIRECT_CODES:
        f.error("redirectCode", f"redirect code {code} is not one Envoy can send; use 301 (the default), 302, 303, "
                                "307 or 308")
    port = f.port("port")
    if port and default_port(port, scheme or REQUEST_SCHEME):
        port = None  # as Istio: no explicit :80 for http, nor :443 for https
    uri = _path_value(f, "uri")
    return Redirect(status=code or 301, scheme=scheme, authority=authority.encode() if authority else None,
                    port=port, path=uri.encode() if uri else None,
                    port_from_request=f.enum("derivePort", ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"))
                    == "FROM_REQUEST_PORT")


def _direct_response(f: Fields) -> DirectResponse:
    """Istio's ``directResponse``: ``status`` and an optional ``body`` (``string`` or base64 ``bytes``)."""
    status = f.integer("status", minimum=200, maximum=599, required=True)
    body = b""
    if "body" in f:
        bf = f.sub("body", {"string", "bytes"})
        kinds = [key for key in ("string", "bytes") if key in bf]
        if len(kinds) != 1:
            bf.error(None, "set one of string or bytes")
        elif kinds[0] == "string":
            body = (bf.string("string") or "").encode()
        else:
            body = _base64(bf, "bytes")
        if len(body) > _DIRECT_BODY_LIMIT:
            bf.error(kinds[0], f"the body has {len(body)} bytes; Istio allows at most 1 MiB")
    return DirectResponse(status or 200, body)


def _base64(f: Fields, key) -> bytes:
    """Bytes written as base64, as protobuf's JSON mapping (and so Istio's YAML) writes a ``bytes`` field."""
    text = f.string(key) or ""
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        f.error(key, "must be base64 (how Istio's YAML writes bytes); use string for text")
        return b""


def _cors(f: Fields) -> CorsPolicy:
    """Istio's ``corsPolicy`` (Envoy's CORS filter)."""
    origins = []
    for path, item in f.items("allowOrigins"):
        match = _string_match(f.report, path, item, present_ok=False)
        if match is not None and not match.value:
            f.report.add(path, "an empty match allows no origin; set exact, prefix or regex to a value")
        elif match is not None:
            origins.append(match)
    if "allowOrigin" in f:
        if "allowOrigins" in f:
            f.error("allowOrigin", "set only allowOrigins: allowOrigin is deprecated, and Istio ignores it "
                                   "when allowOrigins is set")
        origins += [StringMatch("exact", origin) for _, origin in f.strings("allowOrigin")]
    lists = {key: f.strings(key) for key in ("allowMethods", "allowHeaders", "exposeHeaders")}
    for path, method in lists["allowMethods"]:
        if method not in _CORS_METHODS:
            f.report.add(path, f"{method!r} is not a supported HTTP method; use {', '.join(_CORS_METHODS)}")
    for path, name in lists["allowHeaders"] + lists["exposeHeaders"]:
        if name != "*" and not _CORS_HEADER_NAME.match(name):
            f.report.add(path, f"invalid header name {name!r}: use letters, digits, '-' and '_', or *")
    joined = {key: ",".join(value for _, value in items).encode() for key, items in lists.items()}
    max_age = f.duration("maxAge")
    if max_age is not None and max_age != int(max_age):
        f.error("maxAge", "maxAge is accurate only to seconds (as in Istio); use whole seconds, like 86400s or 24h")
    return CorsPolicy(
        allows=origin_test(origins), origins=tuple(f"{match.kind} {match.value!r}" for match in origins),
        allow_methods=joined["allowMethods"], allow_headers=joined["allowHeaders"],
        expose_headers=joined["exposeHeaders"], max_age=b"%d" % max_age if max_age is not None else b"",
        allow_credentials=f.boolean("allowCredentials"),
        forward_unmatched_preflights=f.enum("unmatchedPreflights", ("UNSPECIFIED", "FORWARD", "IGNORE"),
                                            default="FORWARD") != "IGNORE")


def _destinations(f: Fields, namespace, domain, http=True) -> tuple:
    """The weighted ``route`` destinations of an http route (each may have ``headers``), or of a tcp/tls one."""
    items = f.items("route", required=True)
    out = []
    for path, item in items:
        rf = Fields(f.report, path, item, {"destination", "weight", "headers"} if http else {"destination", "weight"})
        if "destination" not in rf:
            rf.error("destination", "'destination' is required")
        destination = _destination(rf.sub("destination", {"host", "subset", "port"}), namespace, domain)
        request, authority = _header_ops(rf, "request")
        out.append(dataclasses.replace(
            destination, weight=rf.integer("weight", minimum=0, maximum=2 ** 31 - 1) or 0, request_headers=request,
            response_headers=_header_ops(rf, "response")[0], authority=authority))
    # Weights are relative, as in Istio: a destination gets weight / (sum of the weights) of the traffic.
    if len(out) == 1:
        out[0] = dataclasses.replace(out[0], weight=100)
    elif out and not any(destination.weight for destination in out):
        f.error("route", "the destinations' weights sum to 0, so no destination would get traffic; give at "
                         "least one destination a weight (weights are relative: 1 and 3 send 25% and 75%)")
    return tuple(out)


def _destination(df: Fields, namespace, domain) -> RouteDestination:
    """A ``destination`` (host, subset, port), without weight or headers."""
    host = df.string("host", required=True)
    problem = hostnames.check(host, allow_wildcard=False) if host else None
    if problem:
        df.error("host", problem)
    port = df.sub("port", {"number"}).port("number", required=True) if "port" in df else None
    return RouteDestination(host=hostnames.fqdn(host, namespace, domain) if host and not problem else "",
                            subset=_dns_name(df, "subset", _DNS_LABEL, "subset name") or None, port=port,
                            weight=0)


def _match(f: Fields, namespace) -> HTTPMatch:
    report = f.report

    def one(key, present_ok=False):
        return _string_match(report, f.path + (key,), f.data[key], present_ok) if key in f else None

    def named(key, query=False):
        out = []
        for name, value in f.mapping(key).items():
            path = f.path + (key, name)
            if not query:
                lower = name.lower()
                if lower in _MATCH_KEYS_IN_HEADERS:
                    report.add(path, f"match on '{name}' with {_MATCH_KEYS_IN_HEADERS[lower]}, not {key}")
                    continue
                name = _header_name(f, key, name, path)
            match = _string_match(report, path, value, present_ok=True, prefix_ok=not query)
            if match is not None and name:
                out.append((name, match))
        return tuple(sorted(out, key=lambda pair: pair[0]))

    return HTTPMatch(name=f.string("name"), uri=one("uri"), ignore_uri_case=f.boolean("ignoreUriCase"),
                     method=one("method"), authority=one("authority"), headers=named("headers"),
                     without_headers=named("withoutHeaders"), query_params=named("queryParams", query=True),
                     port=f.port("port"), source_labels=f.labels("sourceLabels"),
                     source_namespace=_dns_name(f, "sourceNamespace", _DNS_LABEL, "namespace") or None,
                     gateways=gateway_refs(f, "gateways", namespace))


def _string_match(report, path, value, present_ok, prefix_ok=True):
    """Istio's StringMatch at ``path``; ``{}`` means "present" where ``present_ok``."""
    if value is not None and not isinstance(value, dict):
        report.add(path, f"must be a mapping with one of exact, prefix or regex (like {{prefix: {value!r}}})")
        return None
    f = Fields(report, path, value, {"exact", "prefix", "regex"})
    kinds = [kind for kind in ("exact", "prefix", "regex") if kind in f]
    if not kinds and present_ok:
        return StringMatch("present")
    if len(kinds) != 1:
        f.error(None, "set exactly one of exact, prefix or regex")
        return None
    kind = kinds[0]
    text = f.string(kind)
    if text is None:
        return None
    if kind == "prefix" and not prefix_ok:
        f.error(kind, "prefix matching of query parameters is not supported (by Istio either); use exact "
                      "or regex")
        return None
    if present_ok and ((kind == "prefix" and text == "") or (kind == "regex" and text == "*")):
        return StringMatch("present")  # Istio's own reading of these two values
    if kind == "regex":
        problem = regex_problem(text)
        if problem:
            f.error(kind, problem)
            return None
    return StringMatch(kind, text)


def regex_problem(pattern: str):
    """Why ``pattern`` is not a regex Istio accepts, or None: RE2 (the library Envoy runs) must compile
    it, and Istio's own checks must pass (at most 1024 bytes; Go's regexp, which Istio validates with,
    has no ``\\C`` and takes only ASCII group names)."""
    if not pattern:
        return "regex must not be empty"
    if len(pattern.encode("utf-8", "surrogatepass")) > 1024:  # Istio: len() of the Go string, in bytes
        return "regex is too large (at most 1024 bytes)"
    try:
        compiled = compile_re2(pattern)
    except RegexError as error:
        problem = str(error)
    else:
        problem = _go_regexp_problem(pattern, compiled)
    if problem:
        return f"invalid regex: {problem}; Istio uses RE2 syntax (https://github.com/google/re2/wiki/Syntax)"
    return None


def _go_regexp_problem(pattern: str, compiled):
    """What Istio's validation (Go's regexp) rejects in a regex that RE2 compiled, or None."""
    index = 0
    while index < len(pattern):  # every escape is two characters here, once RE2 has accepted the regex
        if pattern.startswith("\\Q", index):  # literal up to \E
            end = pattern.find("\\E", index + 2)
            index = len(pattern) if end < 0 else end + 2
        elif pattern[index] == "\\":
            if pattern.startswith("\\C", index):
                return "invalid escape sequence: \\C (RE2's any-byte escape, which Istio does not accept)"
            index += 2
        else:
            index += 1
    for name in group_names(compiled):
        if not _GO_GROUP_NAME.match(name):
            return f"invalid named capture group: {name!r} (Istio accepts ASCII letters, digits and _)"
    return None


def _retries(f: Fields):
    """The route's RetryPolicy, or None when ``attempts`` is 0 (retries disabled)."""
    rf = f.sub("retries", {"attempts", "perTryTimeout", "retryOn"}, _RETRIES_UNSUPPORTED)
    attempts = rf.integer("attempts", minimum=0) or 0
    per_try_timeout = rf.duration("perTryTimeout")
    if attempts == 0:
        if "perTryTimeout" in rf or "retryOn" in rf:
            rf.error("attempts", "retries are disabled (attempts is 0 or missing) but perTryTimeout or "
                                 "retryOn is set; set attempts >= 1 or remove them")
        return None
    retry_on, codes = DEFAULT_RETRY.retry_on, DEFAULT_RETRY.retry_status_codes
    text = rf.string("retryOn")
    if text is not None:
        retry_on, codes = _retry_on(rf, text)
    return RetryPolicy(attempts=attempts, per_try_timeout=per_try_timeout, retry_on=retry_on,
                       retry_status_codes=codes)


def _retry_on(f: Fields, text: str) -> tuple:
    names, codes = set(), set()
    supported = ", ".join(sorted(RETRY_ON_NAMES))
    for entry in (part.strip() for part in text.split(",")):
        if entry.isdigit() and 100 <= int(entry) <= 599:
            codes.add(int(entry))
        elif entry in RETRY_ON_NAMES:
            names.add(entry)
        elif entry in _RETRY_ON_UNSUPPORTED:
            f.error("retryOn", f"retryOn condition '{entry}' is not supported by txmesh; use {supported} "
                               "or HTTP status codes")
        else:
            f.error("retryOn", f"unknown retryOn condition '{entry}'; use {supported} or HTTP status codes "
                               "(100-599), separated by commas")
    if codes:
        names.add("retriable-status-codes")
    return frozenset(names), frozenset(codes)


def _header_name(f: Fields, key, name, path=None) -> str:
    """``name`` lower-cased, or "" after reporting an invalid header name."""
    lower = name.lower() if isinstance(name, str) else ""
    if not _HEADER_NAME.match(lower):
        f.report.add(path or f.path + (key,), f"invalid header name {name!r}")
        return ""
    return lower


def _header_value(report, path, value):
    """``value`` if it may be sent in a header, else None after reporting why."""
    if not isinstance(value, str):
        report.add(path, f"header values must be strings, not {value!r}; quote it")
        return None
    if _BAD_HEADER_VALUE.search(value) or not value.isascii():
        report.add(path, "header values must be ASCII without line breaks")
        return None
    return value


def _header_ops(parent: Fields, key) -> tuple:
    """``(HeaderOps or None, authority or None)`` of ``headers.<key>``.

    Setting ``host``/``:authority`` in ``headers.request`` is Istio's other
    spelling of ``rewrite.authority``; it is returned separately.
    """
    if "headers" not in parent:
        return None, None
    f = parent.sub("headers", {"request", "response"}).sub(key, {"set", "add", "remove"})
    authority = None
    ops = {"set": [], "add": [], "remove": []}
    for op in ("set", "add"):
        for name, value in f.mapping(op).items():
            path = f.path + (op, name)
            value = _header_value(f.report, path, value)
            if name.lower() in ("host", ":authority") and key == "request":
                authority = value
            elif name.lower() == "host" or name.startswith(":"):
                f.report.add(path, "the Host header and pseudo-headers cannot be changed here")
            else:
                lower = _header_name(f, op, name, path)
                if lower and value is not None:
                    ops[op].append((lower.encode(), value.encode()))
    for path, name in f.strings("remove"):
        if name.lower() == "host" or name.startswith(":"):
            f.report.add(path, "the Host header and pseudo-headers cannot be removed")
        else:
            lower = _header_name(f, "remove", name, path)
            if lower:
                ops["remove"].append(lower.encode())
    if not any(ops.values()):
        return None, authority
    return HeaderOps(set=tuple(ops["set"]), add=tuple(ops["add"]), remove=tuple(ops["remove"])), authority


_VALIDATORS = {
    "ServiceEntry": _service_entry,
    "WorkloadEntry": _workload_entry,
    "DestinationRule": _destination_rule,
    "VirtualService": _virtual_service,
    "Gateway": gateway,
    "AuthorizationPolicy": authorization_policy,
    "PeerAuthentication": peer_authentication,
    "RequestAuthentication": request_authentication,
    "Sidecar": sidecar_resource,
}
