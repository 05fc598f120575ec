"""``meshctl apply -f FILE`` and ``meshctl delete -f FILE``: kubectl's two verbs for a config directory.

Istio's task pages say ``kubectl apply -f samples/.../virtual-service-reviews-test-v2.yaml``, which
replaces the ``reviews`` VirtualService an earlier file defined.  A config directory does not merge:
two files defining one resource are a duplicate, an error.  These commands do what kubectl does, on
the directory the control plane watches (``meshctl up``'s, or ``--config-dir``):

- every document of the files is validated first, as the mesh reads it; if one is invalid, each
  problem is printed and nothing is written;
- ``apply`` writes each resource to the file that already holds it alone, or to a new file
  ``KIND-NAMESPACE-NAME.yaml``; ``delete`` removes that file;
- a resource the directory defines among other resources in one file is not touched: the command
  says which file and line, and writes nothing (edit that file, or move the resource to its own);
- each file is written whole under a temporary name and renamed into place, so the control plane
  never reads half a file.

A resource whose text is the same is reported ``unchanged`` and its file is left alone.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import yaml

from mesh.cli.local import LocalError, LocalMesh, add_state_dir_option
from mesh.config.loader import load_dir, load_files, resource_document
from mesh.config.validate import validate


def add_parser(subparsers):
    for verb, summary in (("apply", "create or replace resources in the config directory (kubectl apply -f)"),
                          ("delete", "remove resources from the config directory (kubectl delete -f)")):
        parser = subparsers.add_parser(verb, help=summary)
        parser.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                            help="a YAML file of Istio resources ('-' reads stdin); repeat for more")
        parser.add_argument("-n", "--namespace", metavar="NS",
                            help="the namespace of the resources that name none (default: default)")
        parser.add_argument("--config-dir", type=Path, metavar="DIR",
                            help="the config directory (default: the one of the control plane `meshctl up` runs)")
        add_state_dir_option(parser)
        parser.set_defaults(func=run, verb=verb)


class ApplyError(Exception):
    """Why nothing was written; the message says what to do."""


def run(args) -> int:
    try:
        config_dir = _config_dir(args)
        resources = _read(args.filename, args.namespace, check=args.verb == "apply")
        plan = _plan(config_dir, resources, args.verb)
    except (ApplyError, LocalError) as error:
        print(f"meshctl {args.verb}: {error}", file=sys.stderr)
        return 1
    for line in _carry_out(plan):
        print(line)
    return 0


def _config_dir(args) -> Path:
    if args.config_dir is not None:
        if not args.config_dir.is_dir():
            raise ApplyError(f"--config-dir {args.config_dir} is not a directory")
        return args.config_dir
    return Path(LocalMesh(args.state_dir).require_control()["config_dir"])


def _read(filenames, namespace, check: bool) -> list:
    """The resources of the files (``namespace`` for those that name none); ApplyError lists every problem."""
    paths, stdin_dir = [], None
    for name in filenames:
        if name == "-":
            stdin_dir = stdin_dir or tempfile.mkdtemp(prefix="meshctl-stdin-")
            path = Path(stdin_dir) / "stdin.yaml"
            path.write_text(sys.stdin.read())
            paths.append(path)
        elif not os.path.isfile(name):
            raise ApplyError(f"{name}: no such file")
        else:
            paths.append(Path(name))
    loaded = load_files(paths)
    if stdin_dir is not None:
        shutil.rmtree(stdin_dir)
    resources = [_in_namespace(resource, namespace) for resource in loaded.resources]
    problems = list(loaded.errors) + (validate(resources)[1] if check else [])
    if problems:
        raise ApplyError("\n".join(str(problem) for problem in problems) + "\nnothing was written")
    return resources


def _in_namespace(resource, namespace):
    if namespace is None or resource.metadata.get("namespace") is not None:
        return resource
    return dataclasses.replace(resource, namespace=namespace)


@dataclasses.dataclass
class _Step:
    """What to do for one resource: write ``text`` to ``path`` (None: remove ``path``), and how to say it."""

    label: str
    path: Path
    text: str | None
    outcome: str


def _plan(config_dir: Path, resources, verb: str) -> list:
    existing = load_dir(config_dir)
    per_file = Counter(resource.file for resource in existing.resources)
    where = {_key(resource): resource for resource in existing.resources}
    steps = []
    for resource in resources:
        label = f"{resource.kind.lower()}/{resource.name} (namespace {resource.namespace})"
        found = where.get(_key(resource))
        if found is not None and per_file[found.file] > 1:
            raise ApplyError(f"{found.file}:{found.line} defines {resource.kind} {resource.namespace}/"
                             f"{resource.name} among other resources; move it to a file of its own (or edit "
                             "that file), then run this again; nothing was written")
        if verb == "delete":
            if found is None:
                raise ApplyError(f"{label} is not in {config_dir}; nothing was written")
            steps.append(_Step(label, Path(found.file), None, "deleted"))
            continue
        text = yaml.safe_dump(resource_document(resource), sort_keys=False)
        if found is None:
            path = config_dir / f"{resource.kind.lower()}-{resource.namespace}-{resource.name}.yaml"
            steps.append(_Step(label, path, text, "created"))
        else:
            path = Path(found.file)
            same = path.read_text() == text
            steps.append(_Step(label, path, None if same else text, "unchanged" if same else "configured"))
    return steps


def _key(resource) -> tuple:
    return resource.kind, resource.namespace, resource.name


def _carry_out(steps) -> list:
    lines = []
    for step in steps:
        if step.outcome == "deleted":
            step.path.unlink()
        elif step.text is not None:
            _write_whole(step.path, step.text)
        lines.append(f"{step.label} {step.outcome}")
    return lines


def _write_whole(path: Path, text: str) -> None:
    """Write ``path`` under a name the loader skips (not ``*.yaml``), then rename it into place."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".meshctl-", suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)
