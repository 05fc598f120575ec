"""``meshctl proxy-config routes|clusters|endpoints|authz|cert [NAME | --admin HOST:PORT] [-o json]``.

Shows one sidecar's effective config, read from its admin port
(``/config_dump`` and ``/clusters``), as human-readable tables by default or
as JSON with ``-o json``.  The sidecar is named as ``meshctl proxy-status``
lists it (found through the control plane, :mod:`mesh.cli.proxies`) or by its
admin port.  The admin port listens on loopback only: run meshctl on the
sidecar's host (or through ``kubectl port-forward``).
"""

from __future__ import annotations

import json
import sys

# AdminError, fetch_json, parse_address and table are also imported from here by mesh.cli.proxy_status
from mesh.cli.admin_client import AdminError, fetch_json, parse_address, table  # noqa: F401
from mesh.cli.proxies import SIDECAR, add_proxy_arguments, resolve_admin, sidecar_hint

SECTIONS = ("routes", "clusters", "endpoints", "authz", "cert")


def add_parser(subparsers):
    parser = subparsers.add_parser("proxy-config", help="show a sidecar's effective config (from its admin port)")
    parser.add_argument("section", choices=SECTIONS, help="what to show")
    add_proxy_arguments(parser, "to show")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    parser.set_defaults(func=run)


def run(args) -> int:
    try:
        host, port, dump = resolve_admin(args)
        if args.section == "endpoints":
            data = fetch_json(host, port, "/clusters", SIDECAR, sidecar_hint(port))
        else:
            data = section_of(dump, args.section)
    except AdminError as error:
        print(f"meshctl proxy-config: {error}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(RENDER[args.section](data))
    return 0


def section_of(dump: dict, section: str):
    config = dump.get("config") or {}
    if section == "routes":
        return config.get("routes", [])
    if section == "clusters":
        return config.get("clusters", [])
    if section == "authz":
        return {"authz": config.get("authz"), "peer_authentication": config.get("peer_authentication")}
    return dump.get("certificate")


def _routes(routes) -> str:
    rows = []
    for vhost in routes:
        domains = vhost.get("domains") or []
        shown = ", ".join(domains[:3]) + (f" (+{len(domains) - 3})" if len(domains) > 3 else "")
        for route in vhost.get("routes", []):
            action = route.get("action", {})
            clusters = ", ".join(f"{c['name']} {c['weight']}%" if len(action.get("clusters", [])) > 1
                                 else c["name"] for c in action.get("clusters", []))
            retry = action.get("retry")
            rows.append([vhost.get("name"), shown, route.get("match"), clusters or "(none)",
                         action.get("timeout") and f"{action['timeout']}s",
                         retry and f"{retry['attempts']}x {','.join(retry['retry_on'])}"])
    return table(("NAME", "DOMAINS", "MATCH", "CLUSTERS", "TIMEOUT", "RETRY"), rows) if rows else "no routes"


def _clusters(clusters) -> str:
    rows = [[c["name"], c.get("service"), c.get("port"), c.get("subset"), c.get("lb_policy"),
             len(c.get("endpoints", [])),
             "mTLS" if any(e.get("identity") for e in c.get("endpoints", [])) else "plaintext"]
            for c in clusters]
    return table(("CLUSTER", "SERVICE", "PORT", "SUBSET", "LB", "ENDPOINTS", "TLS"), rows) if rows \
        else "no clusters"


def _endpoints(clusters) -> str:
    rows = []
    for name, cluster in sorted(clusters.items()):
        for e in cluster.get("endpoints", []):
            health = "HEALTHY" if e.get("healthy") else f"EJECTED {e.get('ejected_for_s')}s"
            rows.append([e.get("address"), health, name, e.get("active_requests"), e.get("total_requests"),
                         e.get("total_failures"), e.get("identity")])
    return table(("ENDPOINT", "STATUS", "CLUSTER", "ACTIVE", "REQUESTS", "FAILURES", "IDENTITY"), rows) if rows \
        else "no endpoints"


def _authz(data) -> str:
    out = []
    peer = data.get("peer_authentication") or {}
    ports = ", ".join(f"{port}={mode}" for port, mode in sorted((peer.get("port_modes") or {}).items()))
    policies = ", ".join(f"{level}: {name}" for level, name in sorted((peer.get("policies") or {}).items()))
    out.append(table(("MTLS MODE", "PORT MODES", "FROM"), [[peer.get("mode", "PERMISSIVE"), ports, policies]]))
    out.append("")
    authz = data.get("authz")
    if not authz:
        out.append("no AuthorizationPolicy applies: every request is allowed")
        return "\n".join(out)
    rows = []
    dry_run = authz.get("dry_run") or {}
    for shown, policies in (("DENY", authz.get("deny", [])), ("DENY (dry run)", dry_run.get("deny", [])),
                            ("ALLOW", authz.get("allow", [])), ("ALLOW (dry run)", dry_run.get("allow", []))):
        for policy in policies:
            for index, rule in enumerate(policy.get("rules", [])):
                def clauses(key, rule=rule):
                    return " OR ".join(" AND ".join(clause) for clause in rule.get(key, [])) or "*"
                rows.append([shown, policy["name"], index, clauses("from"), clauses("to"),
                             " AND ".join(rule.get("when", [])) if isinstance(rule.get("when"), list) else None])
            if not policy.get("rules"):
                rows.append([shown, policy["name"], "-", "(no rules: matches nothing)", "", ""])
    out.append(table(("ACTION", "POLICY", "RULE", "FROM", "TO", "WHEN"), rows))
    if dry_run:
        out.append("dry-run policies are evaluated, logged and counted, never enforced")
    return "\n".join(out)


#: The rows of ``proxy-config cert``: (shown, key of the ``certificate`` of ``/config_dump``).  ``issuer`` is
#: the certificate's issuer name, ``ca`` the CA that signed it as the control plane describes it (``--ca``).
_CERT_ROWS = (("identity", "identity"), ("serial", "serial"), ("issuer", "issuer"), ("ca", "ca_issuer"),
              ("not_before", "not_before"), ("not_after", "not_after"), ("expires_in_s", "expires_in_s"),
              ("trust_bundle_roots", "trust_bundle_roots"), ("source", "source"), ("renewals", "renewals"),
              ("last_renewal_error", "last_renewal_error"))


def _cert(cert) -> str:
    if not cert:
        return "no workload certificate (the sidecar runs plaintext only)"
    return table(("FIELD", "VALUE"), [[shown, cert.get(key)] for shown, key in _CERT_ROWS])


RENDER = {"routes": _routes, "clusters": _clusters, "endpoints": _endpoints, "authz": _authz, "cert": _cert}
