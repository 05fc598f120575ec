"""``meshctl why [NAME | --admin HOST:PORT] [--log-line JSON | --flags FLAGS] < access.log``.

Explains failed requests: for each access-log line (``--log-line``, or lines on stdin) the
route, cluster and endpoint, who answered (the proxy, with response flags, or the app), what each
flag means and what to do (:mod:`mesh.response_flags`), and the AuthorizationPolicy that denied
it.  With a proxy (NAME or ``--admin``) it adds that sidecar's live view: the route's timeout and
retries, the cluster's endpoints and their health, the denying policy's rules.  ``--flags``
explains flags alone, as seen in an ``x-mesh-flags`` header or a metric label.
"""

from __future__ import annotations

import json
import sys

from mesh import response_flags
from mesh.cli.admin_client import AdminError, fetch_json
from mesh.cli.proxies import SIDECAR, add_proxy_arguments, resolve_admin, sidecar_hint
from mesh.cli.workload_view import rule_text
from mesh.config.security_tables import NO_ALLOW_MATCHED


def add_parser(subparsers):
    parser = subparsers.add_parser("why", help="explain a failed request from its access-log line or flags")
    add_proxy_arguments(parser, "that logged the request, for its live route, endpoints and policies (optional)")
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--log-line", metavar="JSON", help="one JSON access-log line (default: lines on stdin)")
    given.add_argument("--flags", metavar="FLAGS", help="response flags alone, e.g. UF,URX or RBAC:ns/name")
    parser.set_defaults(func=run)


def run(args) -> int:
    try:
        entries = _entries(args)
        live = _live_view(args) if (args.name or args.admin) else None
    except (AdminError, ValueError) as error:
        print(f"meshctl why: {error}", file=sys.stderr)
        return 1
    print("\n\n".join("\n".join(explain(entry, live)) for entry in entries))
    return 0


def _entries(args) -> list:
    if args.flags:
        return [{"response_flags": args.flags}]
    if args.log_line is not None:
        lines = [args.log_line]
    elif sys.stdin.isatty():
        raise ValueError("give an access-log line with --log-line '{...}', pipe lines on stdin, or give --flags")
    else:
        lines = sys.stdin.read().splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            raise ValueError(f"line {number} is not a JSON access-log line ({line[:60]!r}); give lines of the "
                             "sidecar's --access-log output")
        entries.append(entry)
    if not entries:
        raise ValueError("no access-log line given (stdin was empty)")
    return entries


def _live_view(args) -> dict:
    """The named sidecar's ``/config_dump`` and ``/clusters``."""
    host, port, dump = resolve_admin(args)
    return {"dump": dump, "clusters": fetch_json(host, port, "/clusters", SIDECAR, sidecar_hint(port))}


def explain(entry: dict, live=None) -> list:
    """The lines explaining one access-log entry (``live``: the sidecar's dumps, or None)."""
    flags = response_flags.parse(entry.get("response_flags"))
    status = entry.get("response_code")
    lines = [_summary(entry), _verdict(entry, flags, status)]
    route = entry.get("route_name")
    if route or any(flag.code == "NR" for flag in flags):
        lines.append(f"route:    {route or '(none matched)'}{_route_detail(route, live)}")
    if entry.get("upstream_cluster"):
        lines.append(f"cluster:  {entry['upstream_cluster']}{_cluster_detail(entry['upstream_cluster'], live)}")
    if entry.get("upstream_host"):
        lines.append(f"endpoint: {entry['upstream_host']}")
    for key in ("response_code_details", "upstream_transport_failure_reason"):
        if entry.get(key):
            lines.append(f"{key.replace('_', ' ')}: {entry[key]}")
    policy = entry.get("authz_policy") or response_flags.denying_policy(entry.get("response_flags"),
                                                                         entry.get("response_code_details"))
    if policy == NO_ALLOW_MATCHED:
        lines.append("policy:   ALLOW AuthorizationPolicies apply to this workload and none matched the request")
    elif policy:
        lines.append(f"policy:   AuthorizationPolicy {policy}{_policy_detail(policy, live)}")
    for flag in flags:
        lines.append(f"flag {flag.code} ({flag.name}): {flag.meaning}")
        lines.append(f"    what to do: {flag.what_to_do}")
    return lines


def _summary(entry) -> str:
    if "method" not in entry and "path" not in entry:
        return f"flags {entry.get('response_flags')}"
    request_id = entry.get("request_id")
    return (f"request:  {entry.get('method')} {entry.get('authority')}{entry.get('path')} "
            f"({entry.get('direction', 'unknown direction')}, x-request-id {request_id}) at "
            f"{entry.get('start_time')}: {entry.get('response_code')} after {entry.get('duration')} ms")


def _verdict(entry, flags, status) -> str:
    if flags:
        return f"verdict:  the proxy ended it ({', '.join(flag.code for flag in flags)}); see the flags below"
    if status is None:
        return "verdict:  no response flags: nothing the proxy saw went wrong"
    if status == 0:
        return "verdict:  no response was sent: the client left first"
    if status >= 400 and entry.get("direction") == "inbound":
        return (f"verdict:  the app behind this sidecar answered {status} itself (no response flags: the sidecar "
                "passed it on); look at the app's logs")
    if status >= 400:
        return (f"verdict:  the upstream answered {status} (no response flags here). If it has a sidecar, that "
                "sidecar may have ended it (403: an AuthorizationPolicy): explain its inbound access-log line "
                f"with the same x-request-id; else look at the upstream app's logs")
    return f"verdict:  no failure: {status} without response flags"


def _route_detail(route, live) -> str:
    if not live or not route:
        return ""
    for vhost in (live["dump"].get("config") or {}).get("routes", []):
        for entry in vhost.get("routes", []):
            action = entry.get("action") or {}
            if action.get("name") == route:
                retry = action.get("retry")
                parts = [f"match {entry.get('match')}",
                         f"timeout {action['timeout']:g}s" if action.get("timeout") else "no timeout",
                         f"retries {retry['attempts']}x on {','.join(retry['retry_on'])}" if retry else "no retries"]
                return f" ({'; '.join(parts)})"
    return " (not in this sidecar's config now: the config changed since, or it is another sidecar's line)"


def _cluster_detail(cluster, live) -> str:
    if not live:
        return ""
    endpoints = (live["clusters"].get(cluster) or {}).get("endpoints")
    if endpoints is None:
        return " (no such cluster in this sidecar now: a route to a host, port or subset nobody defines?)"
    if not endpoints:
        return " (it has no endpoints now)"
    return " (" + ", ".join(f"{e.get('address')} {'HEALTHY' if e.get('healthy') else 'EJECTED'}"
                            for e in endpoints) + ")"


def _policy_detail(policy, live) -> str:
    if not live:
        return ""
    authz = (live["dump"].get("config") or {}).get("authz") or {}
    for action in ("deny", "allow"):
        for entry in authz.get(action, []):
            if entry.get("name") == policy:
                rules = " | ".join(rule_text(rule) for rule in entry.get("rules", []))
                return f" ({action.upper()}; rules: {rules or 'none'})"
    return " (not in this sidecar's config now)"
