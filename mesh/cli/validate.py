"""``meshctl validate PATH...``: check Istio YAML the way the mesh will read it.

Runs the same loader and validator as the proxy and (later) the control plane.
Prints every problem as ``FILE:LINE: Kind/namespace/name: field: reason`` and
exits 1 if there is any, 0 when the files are clean.
"""

from __future__ import annotations

import os
import sys

from mesh.config.loader import load_dir, load_files
from mesh.config.validate import validate


def add_parser(subparsers):
    parser = subparsers.add_parser("validate", help="validate Istio YAML files or directories")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="YAML file or directory of *.yaml")
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
    _, problems = validate(resources)
    errors.extend(problems)
    for error in errors:
        print(error)
    if errors:
        print(f"{len(errors)} error(s) in {files} file(s); nothing was applied", file=sys.stderr)
        return 1
    print(f"{len(resources)} resource(s) in {files} file(s): valid")
    return 0
