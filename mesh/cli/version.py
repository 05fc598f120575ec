"""``meshctl version [--client] [--control-admin HOST:PORT] [-o json]``.

The txmesh version of meshctl, of the control plane (admin ``/ready``) and of every proxy it
knows (what each announced in its HELLO, shown by ``/proxies``), as ``istioctl version``.
Proxies that run another version than the control plane are pointed out.
"""

from __future__ import annotations

import json
import sys

from mesh import __version__
from mesh.cli.admin_client import AdminError, table
from mesh.cli.proxies import add_control_option, fetch_control, list_proxies


def add_parser(subparsers):
    parser = subparsers.add_parser("version", help="versions of meshctl, the control plane and every proxy")
    parser.add_argument("--client", action="store_true", help="only meshctl's own version")
    add_control_option(parser)
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    parser.set_defaults(func=run)


def run(args) -> int:
    versions = {"client": __version__}
    if not args.client:
        try:
            versions["control_plane"] = fetch_control(args.control_admin, "/ready").get("control_plane_version")
            versions["proxies"] = [_proxy(row) for row in list_proxies(args.control_admin)]
        except AdminError as error:
            _print(versions, args.output)
            print(f"meshctl version: {error}; or run meshctl version --client", file=sys.stderr)
            return 1
    _print(versions, args.output)
    return 0


def _proxy(row) -> dict:
    version = row.get("proxy_version")
    if version is None:
        version = "unknown (disconnected)" if not row.get("connected", True) else "unknown (older than 0.1.0?)"
    return {"node": row.get("node"), "workload": row.get("workload"), "namespace": row.get("namespace"),
            "version": version}


def _print(versions, output) -> None:
    if output == "json":
        print(json.dumps(versions, indent=2, sort_keys=True))
        return
    print(f"client version: {versions['client']}")
    if "control_plane" not in versions:
        return
    control = versions["control_plane"] or "unknown (older than 0.1.0?)"
    print(f"control plane version: {control}")
    proxies = versions["proxies"]
    if not proxies:
        print("no proxies connected")
        return
    print(table(("NODE", "NAMESPACE", "WORKLOAD", "VERSION"),
                [[p["node"], p["namespace"], p["workload"], p["version"]] for p in proxies]))
    others = sorted({p["node"] for p in proxies if p["version"] != versions["control_plane"]})
    if others:
        print(f"{len(others)} proxy(ies) do not run the control plane's version {control}: {', '.join(others)}; "
              "restart them with the control plane's release")
