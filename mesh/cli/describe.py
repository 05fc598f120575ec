"""``meshctl describe pod|service NAME``: what applies to a workload or a service, and why.

As ``istioctl x describe``: for a **pod** (a proxy, named as ``meshctl proxy-status`` lists it)
the services it is an endpoint of and why, the DestinationRule subsets it belongs to or not, the
routes that lead to it, its inbound mTLS mode and from which PeerAuthentication, and the
AuthorizationPolicies that apply (and those of its namespace that do not); for a **service** its
ServiceEntry, endpoints, subsets, routes and the policies of its endpoints.
See :mod:`mesh.cli.workload_view`.

By default everything comes from the control plane: the resources in force (admin ``/resources``,
loopback only) and the proxies it registered.  With ``-f PATH`` the resources come from YAML files
instead, and with ``--label`` a pod is described from its labels alone (no control plane at all).
"""

from __future__ import annotations

import dataclasses
import sys

from mesh.cli.admin_client import AdminError
from mesh.cli.proxies import add_control_option, fetch_control, find_proxy, list_proxies
from mesh.cli.validate import PathError, load_and_validate
from mesh.cli.workload_view import DescribeError, Pod, describe_pod, describe_service
from mesh.config.loader import load_documents
from mesh.config.security_compile import DEFAULT_ROOT_NAMESPACE
from mesh.config.validate import validate
from mesh.sidecar_contract import INBOUND_PORT


def add_parser(subparsers):
    parser = subparsers.add_parser("describe", help="what routes, subsets and policies apply to a pod or service")
    parser.add_argument("kind", choices=("pod", "service"), help="pod: a proxy's workload; service: a host")
    parser.add_argument("name", metavar="NAME", help="pod: node, workload or NAMESPACE/WORKLOAD as meshctl "
                                                     "proxy-status lists it; service: its host (short or full)")
    parser.add_argument("-n", "--namespace", default="default",
                        help="namespace of a service's short name, or of a pod given with --label (default: "
                             "%(default)s)")
    parser.add_argument("-f", "--filename", action="append", metavar="PATH",
                        help="read the resources from these YAML files or directories instead of the control plane")
    parser.add_argument("--label", action="append", metavar="KEY=VALUE",
                        help="describe a pod with these labels (repeatable) without asking the control plane")
    parser.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE,
                        help="namespace of mesh-wide security policies (default: %(default)s)")
    add_control_option(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    try:
        objects = _resources(args)
        if args.kind == "pod":
            pod = _offline_pod(args) if args.label else Pod.from_row(find_proxy(args.control_admin, args.name))
            lines = describe_pod(objects, pod, args.root_namespace)
        else:
            pods = () if args.filename else _registered(args)
            lines = describe_service(objects, args.name, args.namespace, args.root_namespace, pods)
    except (AdminError, DescribeError, PathError, ValueError) as error:
        print(f"meshctl describe: {error}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def _resources(args) -> list:
    """Validated objects from ``-f`` or the control plane; invalid resources are reported and left out."""
    if args.filename:
        objects, _, errors, _ = load_and_validate(args.filename)
    else:
        listed = fetch_control(args.control_admin, "/resources").get("resources", [])
        loaded = load_documents([item["document"] for item in listed], "control plane",
                                names=[item["source"] for item in listed])
        objects, errors = validate([_at_source(resource) for resource in loaded.resources])
        errors = loaded.errors + errors
    if errors:
        print(f"meshctl describe: {len(errors)} invalid resource(s) left out (meshctl validate shows them)",
              file=sys.stderr)
    return objects


def _at_source(resource):
    """A resource named ``FILE:LINE`` by the control plane, with that file and line (for messages)."""
    file, _, line = resource.file.rpartition(":")
    return dataclasses.replace(resource, file=file, line=int(line)) if file and line.isdigit() else resource


def _offline_pod(args) -> Pod:
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--label {item!r}: give KEY=VALUE")
        labels[key] = value
    return Pod(name=args.name, namespace=args.namespace, labels=labels, inbound_port=INBOUND_PORT)


def _registered(args) -> list:
    """The connected proxies the control plane registered, as :class:`Pod` objects."""
    return [Pod.from_row(row) for row in list_proxies(args.control_admin)
            if row.get("connected", True) and row.get("namespace")]
