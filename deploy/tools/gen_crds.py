"""Generate deploy/base/crds/*.yaml: txmesh's CRDs, with Istio's kinds and the fields txmesh supports.

    python deploy/tools/gen_crds.py          # rewrite the files
    python deploy/tools/gen_crds.py --check  # exit 1 if they are out of date (the tests run this)

The schemas follow docs/configuration.md: every field txmesh reads, with its
type and, where the set is closed, its allowed values.  Fields Istio defines
but txmesh rejects are left out, so the API server refuses them at apply time
(kubectl's strict field validation) instead of storing a resource that the
control plane would then reject.  Finer rules (weights that do not sum to 0, RE2
regexes, host names) are txmesh's own validation, which names the field.
``x-kubernetes-preserve-unknown-fields`` appears only on ``status``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "base" / "crds"

STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$",
            "description": "A duration such as 1s, 100ms, 1h30m."}


def obj(properties: dict, required=(), description=None, **extra) -> dict:
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    schema.update(extra)
    return schema


def array(items: dict, **extra) -> dict:
    return {"type": "array", "items": items, **extra}


def strmap(values=STR) -> dict:
    return {"type": "object", "additionalProperties": values}


def enum(*values) -> dict:
    return {"type": "string", "enum": list(values)}


STRINGS = array(STR)
STRING_MATCH = obj({"exact": STR, "prefix": STR, "regex": STR}, maxProperties=1,
                   description="Exactly one of exact, prefix, regex; {} means present.")
SELECTOR = obj({"matchLabels": strmap()})
EXPORT_TO = array(STR, description="*, ., ~ or namespace names.")

WORKLOAD = {
    "address": STR, "ports": strmap(PORT), "labels": strmap(), "weight": {"type": "integer", "minimum": 0},
    "serviceAccount": STR,
}

SERVICE_ENTRY = obj({
    "hosts": array(STR, minItems=1),
    "addresses": STRINGS,
    "ports": array(obj({"number": PORT, "name": STR, "protocol": STR, "targetPort": PORT},
                       required=("number", "name")), minItems=1),
    "location": enum("MESH_EXTERNAL", "MESH_INTERNAL"),
    "resolution": enum("STATIC", "DNS", "DNS_ROUND_ROBIN"),
    "endpoints": array(obj(dict(WORKLOAD), required=("address",))),
    "workloadSelector": obj({"labels": strmap()}),
    "subjectAltNames": array(STR, maxItems=1),
    "exportTo": EXPORT_TO,
}, required=("hosts", "ports"))

WORKLOAD_ENTRY = obj(dict(WORKLOAD), required=("address",))

SETTINGS = {
    "loadBalancer": obj({
        "simple": enum("UNSPECIFIED", "ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN", "RANDOM"),
        "consistentHash": obj({"httpHeaderName": STR, "httpCookie": obj({"name": STR}, required=("name",)),
                               "useSourceIp": BOOL, "httpQueryParameterName": STR}, maxProperties=1),
    }),
    "connectionPool": obj({
        "tcp": obj({"connectTimeout": DURATION, "maxConnections": {"type": "integer", "minimum": 0},
                    "maxConnectionDuration": DURATION, "idleTimeout": DURATION,
                    "tcpKeepalive": obj({"time": DURATION, "interval": DURATION,
                                         "probes": {"type": "integer", "minimum": 1, "maximum": 127}})}),
        "http": obj({"maxRequestsPerConnection": {"type": "integer", "minimum": 0}, "idleTimeout": DURATION,
                     "http1MaxPendingRequests": {"type": "integer", "minimum": 0},
                     "http2MaxRequests": {"type": "integer", "minimum": 0},
                     "maxRetries": {"type": "integer", "minimum": 0},
                     "h2UpgradePolicy": {"type": "string", "enum": ["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"]},
                     "useClientProtocol": BOOL, "maxConcurrentStreams": {"type": "integer", "minimum": 0}}),
    }),
    "outlierDetection": obj({
        "consecutive5xxErrors": {"type": "integer", "minimum": 0},
        "consecutiveGatewayErrors": {"type": "integer", "minimum": 0},
        "interval": DURATION, "baseEjectionTime": DURATION,
        "maxEjectionPercent": {"type": "integer", "minimum": 0, "maximum": 100},
    }),
    "tls": obj({"mode": enum("ISTIO_MUTUAL", "DISABLE", "SIMPLE", "MUTUAL"), "clientCertificate": STR,
                "privateKey": STR, "caCertificates": STR, "sni": STR, "subjectAltNames": array(STR),
                "insecureSkipVerify": BOOL}),
}
TRAFFIC_POLICY = obj({**SETTINGS, "portLevelSettings": array(obj(
    {"port": obj({"number": PORT}, required=("number",)), **SETTINGS}, required=("port",)))})

DESTINATION_RULE = obj({
    "host": STR,
    "trafficPolicy": TRAFFIC_POLICY,
    "subsets": array(obj({"name": STR, "labels": strmap(), "trafficPolicy": TRAFFIC_POLICY}, required=("name",))),
    "exportTo": EXPORT_TO,
}, required=("host",))

HEADER_OPS = obj({"set": strmap(), "add": strmap(), "remove": STRINGS})
HEADERS = obj({"request": HEADER_OPS, "response": HEADER_OPS})
DESTINATION = {
    "destination": obj({"host": STR, "subset": STR, "port": obj({"number": PORT})}, required=("host",)),
    "weight": {"type": "integer", "minimum": 0, "maximum": 2 ** 31 - 1},
}
ROUTE_DESTINATIONS = array(obj(DESTINATION, required=("destination",)), minItems=1)
HTTP_STATUS = {"type": "integer", "minimum": 200, "maximum": 599}
PERCENT = obj({"value": {"type": "number", "minimum": 0, "maximum": 100}})
HTTP_ROUTE = obj({
    "name": STR,
    "match": array(obj({
        "name": STR, "uri": STRING_MATCH, "ignoreUriCase": BOOL, "method": STRING_MATCH,
        "authority": STRING_MATCH, "headers": strmap(STRING_MATCH), "withoutHeaders": strmap(STRING_MATCH),
        "queryParams": strmap(obj({"exact": STR, "regex": STR}, maxProperties=1)), "gateways": STRINGS,
        "port": PORT, "sourceLabels": strmap(), "sourceNamespace": STR,
    })),
    "route": array(obj({**DESTINATION, "headers": HEADERS}, required=("destination",)), minItems=1),
    "redirect": obj({"uri": STR, "authority": STR, "port": PORT,
                     "derivePort": enum("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"),
                     "scheme": enum("http", "https"), "redirectCode": INT}),
    "directResponse": obj({"status": HTTP_STATUS, "body": obj({"string": STR, "bytes": STR}, maxProperties=1)},
                          required=("status",)),
    "rewrite": obj({"uri": STR, "authority": STR,
                    "uriRegexRewrite": obj({"match": STR, "rewrite": STR}, required=("match", "rewrite"))}),
    "timeout": DURATION,
    "retries": obj({"attempts": {"type": "integer", "minimum": 0}, "perTryTimeout": DURATION, "retryOn": STR}),
    "fault": obj({
        "delay": obj({"fixedDelay": DURATION, "percentage": PERCENT,
                      "percent": {"type": "integer", "minimum": 0, "maximum": 100}}, required=("fixedDelay",)),
        "abort": obj({"httpStatus": HTTP_STATUS, "grpcStatus": STR, "percentage": PERCENT}),
    }),
    "corsPolicy": obj({
        "allowOrigins": array(STRING_MATCH), "allowOrigin": STRINGS, "allowMethods": STRINGS,
        "allowHeaders": STRINGS, "exposeHeaders": STRINGS, "maxAge": DURATION, "allowCredentials": BOOL,
        "unmatchedPreflights": enum("UNSPECIFIED", "FORWARD", "IGNORE"),
    }),
    "headers": HEADERS,
    "mirror": DESTINATION["destination"],
    "mirrors": array(obj({"destination": DESTINATION["destination"], "percentage": PERCENT},
                         required=("destination",))),
    "mirrorPercentage": PERCENT,
}, description="One of route, redirect and directResponse.")

L4_MATCH = {"destinationSubnets": STRINGS, "port": PORT, "sourceLabels": strmap(), "sourceNamespace": STR,
            "gateways": STRINGS}
TCP_ROUTE = obj({"match": array(obj(L4_MATCH)), "route": ROUTE_DESTINATIONS}, required=("route",))
TLS_ROUTE = obj({"match": array(obj({**L4_MATCH, "sniHosts": array(STR, minItems=1)}, required=("sniHosts",)),
                                minItems=1),
                 "route": ROUTE_DESTINATIONS}, required=("match", "route"))

VIRTUAL_SERVICE = obj({
    "hosts": array(STR, minItems=1),
    "gateways": STRINGS,
    "http": array(HTTP_ROUTE, minItems=1),
    "tcp": array(TCP_ROUTE, minItems=1),
    "tls": array(TLS_ROUTE, minItems=1),
    "exportTo": EXPORT_TO,
}, required=("hosts",), description="At least one of http, tcp and tls.")

AUTHORIZATION_POLICY = obj({
    "selector": SELECTOR,
    "action": enum("ALLOW", "DENY"),
    "rules": array(obj({
        "from": array(obj({"source": obj({name: STRINGS for name in (
            "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces", "notNamespaces",
            "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")})},
            required=("source",))),
        "to": array(obj({"operation": obj({name: STRINGS for name in (
            "hosts", "notHosts", "methods", "notMethods", "paths", "notPaths", "ports", "notPorts")})},
            required=("operation",))),
        "when": array(obj({"key": STR, "values": STRINGS, "notValues": STRINGS}, required=("key",))),
    })),
})

MTLS = obj({"mode": enum("UNSET", "DISABLE", "PERMISSIVE", "STRICT")})
PEER_AUTHENTICATION = obj({
    "selector": SELECTOR,
    "mtls": MTLS,
    "portLevelMtls": strmap(MTLS),
})

REQUEST_AUTHENTICATION = obj({
    "selector": SELECTOR,
    "jwtRules": array(obj({
        "issuer": STR,
        "audiences": STRINGS,
        "jwksUri": STR,
        "jwks": STR,
        "fromHeaders": array(obj({"name": STR, "prefix": STR}, required=("name",))),
        "fromParams": STRINGS,
        "fromCookies": STRINGS,
        "outputPayloadToHeader": STR,
        "outputClaimToHeaders": array(obj({"header": STR, "claim": STR}, required=("header", "claim"))),
        "forwardOriginalToken": BOOL,
        "timeout": DURATION,
        "spaceDelimitedClaims": STRINGS,
    }, required=("issuer",), description="jwksUri or jwks (txmesh does not discover keys from the issuer).")),
})

SIDECAR = obj({
    "workloadSelector": obj({"labels": strmap()}),
    "egress": array(obj({"hosts": STRINGS}, required=("hosts",)), maxItems=1,
                    description="One listener without port; hosts are namespace/dnsName."),
    "outboundTrafficPolicy": obj({"mode": enum("ALLOW_ANY", "REGISTRY_ONLY")}),
}, minProperties=1)

TLS_VERSION = enum("TLS_AUTO", "TLSV1_2", "TLSV1_3")
GATEWAY = obj({
    "selector": strmap(),
    "servers": array(obj({
        "port": obj({"number": PORT, "name": STR, "protocol": enum("HTTP", "HTTP2", "GRPC", "HTTPS", "TCP")},
                    required=("number", "protocol")),
        "hosts": array(STR, minItems=1),
        "tls": obj({"mode": enum("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL"), "serverCertificate": STR,
                    "privateKey": STR, "caCertificates": STR, "credentialName": STR, "httpsRedirect": BOOL,
                    "minProtocolVersion": TLS_VERSION, "maxProtocolVersion": TLS_VERSION},
                   description="Certificate files are paths in the gateway's pod; credentialName is a Secret "
                               "mounted in its --gateway-credentials-dir."),
        "name": STR,
    }, required=("port", "hosts")), minItems=1),
}, required=("servers",))

#: (group, kind, plural, spec schema, printer columns)
KINDS = [
    ("networking.txmesh.io", "ServiceEntry", "serviceentries", SERVICE_ENTRY,
     [("Hosts", ".spec.hosts"), ("Resolution", ".spec.resolution")]),
    ("networking.txmesh.io", "WorkloadEntry", "workloadentries", WORKLOAD_ENTRY, [("Address", ".spec.address")]),
    ("networking.txmesh.io", "DestinationRule", "destinationrules", DESTINATION_RULE, [("Host", ".spec.host")]),
    ("networking.txmesh.io", "VirtualService", "virtualservices", VIRTUAL_SERVICE, [("Hosts", ".spec.hosts")]),
    ("networking.txmesh.io", "Sidecar", "sidecars", SIDECAR, [("Selector", ".spec.workloadSelector.labels")]),
    ("networking.txmesh.io", "Gateway", "gateways", GATEWAY, [("Selector", ".spec.selector")]),
    ("security.txmesh.io", "AuthorizationPolicy", "authorizationpolicies", AUTHORIZATION_POLICY,
     [("Action", ".spec.action")]),
    ("security.txmesh.io", "PeerAuthentication", "peerauthentications", PEER_AUTHENTICATION,
     [("Mode", ".spec.mtls.mode")]),
    ("security.txmesh.io", "RequestAuthentication", "requestauthentications", REQUEST_AUTHENTICATION,
     [("Selector", ".spec.selector.matchLabels")]),
]


def crd(group, kind, plural, spec, columns) -> dict:
    columns = [{"name": name, "type": "string", "jsonPath": path} for name, path in columns]
    columns.append({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"})
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}", "labels": {"app.kubernetes.io/part-of": "txmesh"}},
        "spec": {
            "group": group,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "categories": ["txmesh"]},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": obj({
                    "apiVersion": STR, "kind": STR, "metadata": {"type": "object"},
                    "spec": spec,
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                }, required=("spec",), description=f"txmesh {kind}: Istio's {kind} fields that txmesh supports "
                                                   "(docs/configuration.md).")},
            }],
        },
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


def render() -> dict:
    """file name -> YAML text."""
    files = {}
    for group, kind, plural, spec, columns in KINDS:
        text = yaml.dump(crd(group, kind, plural, spec, columns), Dumper=_Dumper, sort_keys=False, width=120)
        files[f"{plural}.{group}.yaml"] = ("# Generated by deploy/tools/gen_crds.py: edit that file, not this "
                                           "one.\n" + text)
    names = sorted(files)
    files["kustomization.yaml"] = ("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                                   "resources:\n" + "".join(f"- {name}\n" for name in names))
    return files


def main(argv) -> int:
    files = render()
    if "--check" in argv:
        stale = [name for name, text in files.items()
                 if not (OUT / name).exists() or (OUT / name).read_text() != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python deploy/tools/gen_crds.py", file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
