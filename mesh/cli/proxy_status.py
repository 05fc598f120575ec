"""``meshctl proxy-status [--control-admin 127.0.0.1:15014] [-o json]``.

Every proxy the control plane knows (admin ``/proxies``): its identity, the
config version sent and the version it applied (ACKed), its last NACK with
the error, and whether it is stale (disconnected, or not running the latest
version sent).  Below the table: which policies select each proxy by the
labels it announced, a warning for each proxy that none of its namespace's
policy selectors matches (:mod:`mesh.config.selection`), the control plane's
own config version and the resources it rejected (admin ``/ready``), with
FILE:LINE.
"""

from __future__ import annotations

import json
import sys

from mesh.cli.proxy_config import AdminError, fetch_json, parse_address, table
from mesh.config.selection import format_labels


def add_parser(subparsers):
    parser = subparsers.add_parser("proxy-status", help="config sync status of every proxy (from the control plane)")
    parser.add_argument("--control-admin", default="127.0.0.1:15014", metavar="HOST:PORT",
                        help="the control plane's admin port (default: %(default)s)")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    parser.set_defaults(func=run)


def run(args) -> int:
    host, port = parse_address(args.control_admin, 15014)
    hint = (f"is mesh-control running with --admin-port {port}? Its admin port listens on 127.0.0.1 unless "
            f"--admin-address opens it: run meshctl on the control plane's host, or point --control-admin at it "
            f"(check with: curl http://127.0.0.1:{port}/ready)")
    try:
        proxies = fetch_json(host, port, "/proxies", "the control plane's admin port", hint)
        ready = fetch_json(host, port, "/ready", "the control plane's admin port", hint, statuses=(200, 503))
    except AdminError as error:
        print(f"meshctl proxy-status: {error}", file=sys.stderr)
        return 1
    if isinstance(proxies, dict):
        proxies = proxies.get("proxies", [])
    config = ready.get("config") or {}
    if args.output == "json":
        print(json.dumps({"proxies": proxies, "config": config,
                          "config_errors": ready.get("config_errors", [])}, indent=2, sort_keys=True))
        return 0
    print(render(proxies, config, ready.get("config_errors", [])))
    return 0


def render_selection(proxies) -> list:
    """Lines: the resources selecting each proxy (``selected_by`` of ``/proxies``), then the warnings.

    Nothing for rows without ``selected_by`` (a control plane that does not report it).
    """
    known = [proxy for proxy in proxies if "selected_by" in proxy]
    if not known:
        return []
    rows = [[proxy.get("node"), format_labels(proxy.get("labels") or {}),
             ", ".join(describe_selector(row) for row in proxy["selected_by"]) or "nothing"] for proxy in known]
    lines = ["", table(("NODE", "LABELS", "SELECTED BY"), rows)]
    warned = [proxy for proxy in known if proxy.get("selection_warning")]
    if warned:
        lines += ["", f"{len(warned)} proxy(ies) match no selector of their namespace's policies (restart the sidecar "
                      "with the right --label if a policy is meant for it):"]
        lines += [f"  {proxy.get('node')}: {proxy['selection_warning']}" for proxy in warned]
    return lines


def describe_selector(row) -> str:
    """``AuthorizationPolicy shop/deny-admin (app=api)``, or ``(namespace-wide)``/``(mesh-wide)``."""
    how = row.get("selector") or f"{row.get('scope')}-wide"
    return f"{row.get('kind')} {row.get('namespace')}/{row.get('name')} ({how})"


def _short(version):
    return version[:12] if isinstance(version, str) else version


def render(proxies, config, config_errors) -> str:
    rows = []
    for proxy in proxies:
        workload = proxy.get("workload")
        if workload and proxy.get("namespace"):
            workload = f"{proxy['namespace']}/{workload}"
        sent, acked = proxy.get("version_sent"), proxy.get("version_acked")
        if proxy.get("last_nack"):
            last = f"NACK {_short(proxy.get('last_nack_version'))}: {proxy['last_nack']}"
        elif acked is not None:
            last = f"ACK {_short(acked)}"
        else:
            last = "waiting for ACK" if sent else "no config sent"
        if not proxy.get("connected", True):
            state = "STALE (disconnected)"
        elif proxy.get("stale"):
            state = "STALE"
        else:
            state = "SYNCED"
        rows.append([proxy.get("node"), workload, proxy.get("identity"), proxy.get("address"),
                     _short(acked), _short(sent), state, last])
    lines = [table(("NODE", "WORKLOAD", "IDENTITY", "ADDRESS", "APPLIED", "SENT", "STATUS", "LAST ACK/NACK"),
                   rows) if rows else "no proxies connected"]
    lines += render_selection(proxies)
    if config:
        lines.append("")
        lines.append(f"control plane config {config.get('version')} (generation {config.get('generation')}, "
                     f"{config.get('resources')} resource(s))")
    rejected = config.get("rejected") if config else None
    errors = [r["error"] for r in rejected] if rejected is not None else list(config_errors)
    if errors:
        lines.append(f"{len(errors)} resource(s) rejected (fix them; meshctl validate shows the same):")
        for rejection in (rejected or [{"error": e, "kept": None} for e in errors]):
            kept = (f" [last good version in force: {rejection['kept']}]" if rejection.get("kept")
                    else " [not applied]")
            lines.append(f"  {rejection['error']}{kept}")
    return "\n".join(lines)
