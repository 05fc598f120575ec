"""``meshctl analyze PATH...``: cross-resource checks of Istio YAML.

Loads and validates the files the way the mesh does (invalid resources are
reported as by ``meshctl validate`` and left out), then runs
:func:`mesh.config.analyze.analyze` on the valid ones: routes to unknown hosts
or subsets, subsets matching no endpoint, conflicting VirtualServices,
AuthorizationPolicy selectors that match nothing, STRICT mTLS towards
workloads without a sidecar.  Prints ``FILE:LINE: Kind/namespace/name: field:
reason`` per finding; exits 1 on any finding or error, 0 when clean.
"""

from __future__ import annotations

import sys

from mesh.cli.validate import PathError, load_and_validate
from mesh.config.analyze import analyze
from mesh.config.security_compile import DEFAULT_ROOT_NAMESPACE


def add_parser(subparsers):
    parser = subparsers.add_parser("analyze", help="cross-resource checks of Istio YAML files or directories")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="YAML file or directory of *.yaml")
    parser.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE,
                        help="namespace of mesh-wide security policies (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args) -> int:
    try:
        objects, _, errors, files = load_and_validate(args.paths)
    except PathError as error:
        print(error, file=sys.stderr)
        return 1
    findings = analyze(objects, root_namespace=args.root_namespace)
    for error in errors:
        print(error)
    for finding in findings:
        print(finding)
    if errors or findings:
        parts = [f"{len(findings)} finding(s)"]
        if errors:
            parts.append(f"{len(errors)} validation error(s) (run meshctl validate; invalid resources were "
                         "not analyzed)")
        print(f"{', '.join(parts)} in {files} file(s)", file=sys.stderr)
        return 1
    print(f"{len(objects)} resource(s) in {files} file(s): no findings")
    return 0
