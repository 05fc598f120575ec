"""Finding sidecars by name through the control plane, for the commands that take a proxy NAME.

The control plane's admin ``/proxies`` lists every proxy with what it announced in its HELLO (node,
workload, namespace, address, admin and metrics ports, txmesh version).  A sidecar's admin port
listens on 127.0.0.1 only, so a proxy found by name is reached at ``127.0.0.1:<its admin port>``,
which works when meshctl runs on the proxy's host; :func:`check_node` makes sure that port is the
proxy asked for, not another one on this host.
"""

from __future__ import annotations

from mesh.cli.admin_client import AdminError, fetch_json, parse_address
from mesh.sidecar_contract import ADMIN_PORT, CONTROL_ADMIN_PORT

DEFAULT_CONTROL_ADMIN = f"127.0.0.1:{CONTROL_ADMIN_PORT}"
DEFAULT_ADMIN = f"127.0.0.1:{ADMIN_PORT}"
SIDECAR = "the sidecar's admin port"


def add_control_option(parser) -> None:
    """``--control-admin HOST:PORT``, as ``meshctl proxy-status`` has it."""
    parser.add_argument("--control-admin", default=DEFAULT_CONTROL_ADMIN, metavar="HOST:PORT",
                        help="the control plane's admin port, to find proxies by name (default: %(default)s)")


def add_proxy_arguments(parser, what: str) -> None:
    """``[NAME]``, ``--admin HOST:PORT`` and ``--control-admin``: the ways to name one sidecar."""
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help=f"the proxy {what}: its node, workload or NAMESPACE/WORKLOAD as meshctl proxy-status "
                             "lists it (found through the control plane)")
    parser.add_argument("--admin", metavar="HOST:PORT",
                        help=f"the sidecar's admin port instead of NAME (default without NAME: {DEFAULT_ADMIN})")
    add_control_option(parser)


def control_hint(port: int) -> str:
    """What to check when the control plane's admin port cannot be read."""
    return (f"is mesh-control running with --admin-port {port}? Its admin port listens on 127.0.0.1 unless "
            f"--admin-address opens it: run meshctl on the control plane's host, or point --control-admin at it "
            f"(check with: curl http://127.0.0.1:{port}/ready)")


def sidecar_hint(port: int) -> str:
    """What to check when a sidecar's admin port cannot be read."""
    return (f"is mesh-proxy running with --admin-port {port}? The admin port listens on 127.0.0.1 only: "
            f"run meshctl on the sidecar's host, and check with: curl http://127.0.0.1:{port}/ready")


def fetch_control(control_admin: str, path: str):
    """GET a JSON page of the control plane's admin port; :class:`AdminError` saying what to do.

    ``/ready`` is read whether the control plane is ready (200) or not (503, e.g. its CA is not).
    """
    host, port = parse_address(control_admin, 15014)
    return fetch_json(host, port, path, "the control plane's admin port", control_hint(port),
                      statuses=(200, 503) if path == "/ready" else (200,))


def list_proxies(control_admin: str) -> list:
    """The rows of the control plane's ``/proxies``."""
    rows = fetch_control(control_admin, "/proxies")
    return rows.get("proxies", []) if isinstance(rows, dict) else rows


def find_proxy(control_admin: str, name: str) -> dict:
    """The ``/proxies`` row of the proxy called ``name`` (node, workload or NAMESPACE/WORKLOAD).

    Raises :class:`AdminError` when no proxy or several proxies have that name.
    """
    rows = list_proxies(control_admin)
    matches = [row for row in rows if name in _names(row)]
    connected = [row for row in matches if row.get("connected", True)]
    if len(connected) == 1 or (len(matches) == 1 and not connected):
        return (connected or matches)[0]
    if not matches:
        known = ", ".join(sorted({row.get("node") for row in rows if row.get("node")})) or "none"
        raise AdminError(f"no proxy named {name!r} is known to the control plane at {control_admin} "
                         f"(known nodes: {known}); meshctl proxy-status --control-admin {control_admin} lists "
                         "them with their workloads")
    nodes = ", ".join(sorted(row["node"] for row in (connected or matches)))
    raise AdminError(f"{name!r} names several proxies ({nodes}); give one node name from that list")


def _names(row) -> set:
    names = {row.get("node"), row.get("workload")}
    if row.get("namespace") and row.get("workload"):
        names.add(f"{row['namespace']}/{row['workload']}")
    return names - {None}


def admin_address_of(row) -> tuple:
    """``(host, port)`` of a found proxy's admin port (its host's loopback)."""
    if not row.get("connected", True):
        raise AdminError(f"proxy {row['node']} is disconnected from the control plane; is it running? "
                         "If it is, give its admin port with --admin HOST:PORT")
    if not row.get("admin_port"):
        raise AdminError(f"proxy {row['node']} did not announce its admin port (an older txmesh?); "
                         "give it with --admin HOST:PORT")
    return "127.0.0.1", row["admin_port"]


def check_node(dump: dict, row: dict, port: int) -> None:
    """Raise :class:`AdminError` unless the ``/config_dump`` ``dump`` is the proxy of ``row``."""
    node = (dump.get("control") or {}).get("node")
    if node != row["node"]:
        raise AdminError(f"127.0.0.1:{port} is not proxy {row['node']} but {node or 'a standalone proxy'}: "
                         f"proxy {row['node']} runs on another host ({row.get('address')}), and its admin port "
                         f"listens on loopback only; run meshctl there, or forward its admin port "
                         f"(kubectl port-forward POD {row.get('admin_port')}) and give --admin 127.0.0.1:PORT")


def resolve_admin(args) -> tuple:
    """``(host, port, dump)`` of the sidecar named by ``args.name`` / ``args.admin``.

    ``dump`` is its ``/config_dump``, read once to check that the port is
    the proxy asked for; raises :class:`AdminError` saying what to do.
    """
    if args.name and args.admin:
        raise AdminError("give either a proxy NAME or --admin HOST:PORT, not both")
    if not args.name:
        host, port = parse_address(args.admin or DEFAULT_ADMIN, ADMIN_PORT)
        return host, port, fetch_json(host, port, "/config_dump", SIDECAR, sidecar_hint(port))
    row = find_proxy(args.control_admin, args.name)
    host, port = admin_address_of(row)
    dump = fetch_json(host, port, "/config_dump", SIDECAR, sidecar_hint(port))
    check_node(dump, row, port)
    return host, port, dump
