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

import os
import sys

from mesh.config.analyze import analyze
from mesh.config.loader import load_dir, load_files
from mesh.config.security_compile import DEFAULT_ROOT_NAMESPACE
from mesh.config.validate import validate


def add_parser(subparsers):
    parser = subparsers.add_parser("analyze", help="cross-resource checks of Istio YAML files or directories")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="YAML file or directory of *.yaml")
    parser.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE,
                        help="namespace of mesh-wide security policies (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args) -> int:
    resources, errors, files = [], [], 0
    for path in args.paths:
        if os.path.isdir(path):
            result = load_dir(path)
        elif os.path.exists(path):
            result = load_files([path])
        else:
            print(f"{path}: no such file or directory", file=sys.stderr)
            return 1
        resources.extend(result.resources)
        errors.extend(result.errors)
        files += len(result.files)
    objects, problems = validate(resources)
    errors.extend(problems)
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
