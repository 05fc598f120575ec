"""``meshctl analyze PATH...``: cross-resource checks of Istio YAML.

Loads and validates the files the way the mesh does (invalid resources are
reported as by ``meshctl validate`` and left out), then runs
:func:`mesh.config.analyze.analyze` on the valid ones: routes to unknown hosts
or subsets, subsets matching no endpoint, conflicting VirtualServices,
AuthorizationPolicy selectors that match nothing, STRICT mTLS towards
workloads without a sidecar.  Prints ``FILE:LINE: Kind/namespace/name: field:
reason`` per finding; exits 1 on any finding or error, 0 when clean.

With ``--control-admin HOST:PORT`` the proxies connected to that control plane
join the analysis with the labels they announced (admin ``/proxies``): a
proxy that no selector of its namespace's policies matches is a finding, and a
table shows which policy (and ServiceEntry ``workloadSelector``) selects which
proxy.
"""

from __future__ import annotations

import sys

from mesh.cli.proxy_config import AdminError, fetch_json, parse_address, table
from mesh.cli.validate import PathError, load_and_validate
from mesh.config.analyze import analyze, selection
from mesh.config.compile import Workload
from mesh.config.security_compile import DEFAULT_ROOT_NAMESPACE
from mesh.sidecar_contract import CONTROL_ADMIN_PORT


def add_parser(subparsers):
    parser = subparsers.add_parser("analyze", help="cross-resource checks of Istio YAML files or directories")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="YAML file or directory of *.yaml")
    parser.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE,
                        help="namespace of mesh-wide security policies (default: %(default)s)")
    parser.add_argument("--control-admin", metavar="HOST:PORT",
                        help="also analyze the proxies connected to this control plane's admin port "
                             "(their labels): which policies select which proxy")
    parser.set_defaults(func=run)


def run(args) -> int:
    try:
        objects, _, errors, files = load_and_validate(args.paths)
        proxies = connected_proxies(args.control_admin) if args.control_admin else []
    except PathError as error:
        print(error, file=sys.stderr)
        return 1
    except AdminError as error:
        print(f"meshctl analyze: {error}", file=sys.stderr)
        return 1
    findings = analyze(objects, root_namespace=args.root_namespace, proxies=proxies)
    for error in errors:
        print(error)
    for finding in findings:
        print(finding)
    if args.control_admin:
        print(render_selection(selection(objects, proxies, args.root_namespace), len(proxies)))
    if errors or findings:
        parts = [f"{len(findings)} finding(s)"]
        if errors:
            parts.append(f"{len(errors)} validation error(s) (run meshctl validate; invalid resources were "
                         "not analyzed)")
        print(f"{', '.join(parts)} in {files} file(s)", file=sys.stderr)
        return 1
    print(f"{len(objects)} resource(s) in {files} file(s): no findings")
    return 0


def connected_proxies(address: str) -> list:
    """``(node, Workload)`` of every connected proxy of the control plane's ``/proxies``, by node."""
    host, port = parse_address(address, CONTROL_ADMIN_PORT)
    hint = (f"is mesh-control running with --admin-port {port}? Its admin port listens on 127.0.0.1 unless "
            f"--admin-address opens it (check with: curl http://{host}:{port}/proxies)")
    rows = fetch_json(host, port, "/proxies", "the control plane's admin port", hint)
    if isinstance(rows, dict):
        rows = rows.get("proxies", [])
    proxies = [(row["node"], Workload(name=row.get("workload") or row["node"], namespace=row["namespace"],
                                      labels=dict(row.get("labels") or {})))
               for row in rows if row.get("connected") and row.get("namespace")]
    return sorted(proxies, key=lambda pair: pair[0])


def render_selection(rows, proxies: int) -> str:
    """The table of :func:`mesh.config.analyze.selection`: resource, selector, selected proxies."""
    header = f"which resources select which of the {proxies} connected proxy(ies):"
    body = table(("KIND", "RESOURCE", "SELECTOR", "PROXIES"),
                 [[kind, name, selector, ", ".join(nodes) or "(none)"] for kind, name, selector, nodes in rows])
    if not rows:
        return f"{header} no AuthorizationPolicy, PeerAuthentication or ServiceEntry with a workloadSelector"
    return f"{header}\n{body}"
