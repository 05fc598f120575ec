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


class PathError(Exception):
    """A path given on the command line does not exist."""


def load_and_validate(paths):
    """Load files and directories, validate every resource.

    Returns ``(valid_objects, resources, errors, file_count)``; raises
    :class:`PathError` for a path that does not exist.
    """
    resources, errors, files = [], [], 0
    for path in paths:
        if os.path.isdir(path):
            result = load_dir(path)
        elif os.path.exists(path):
            result = load_files([path])
        else:
            raise PathError(f"{path}: no such file or directory")
        resources.extend(result.resources)
        errors.extend(result.errors)
        files += len(result.files)
    objects, problems = validate(resources)
    return objects, resources, errors + problems, files


def run(args) -> int:
    try:
        _, resources, errors, files = load_and_validate(args.paths)
    except PathError as error:
        print(error, file=sys.stderr)
        return 1
    for error in errors:
        print(error)
    if errors:
        print(f"{len(errors)} error(s) in {files} file(s); nothing was applied", file=sys.stderr)
        return 1
    print(f"{len(resources)} resource(s) in {files} file(s): valid")
    return 0
