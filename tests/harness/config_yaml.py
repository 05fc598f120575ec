"""Mesh config written as YAML text in a test, then loaded, validated and compiled as the sidecar does.

- :func:`validate_yaml`: write the documents to a file, load it (a YAML error fails the test) and
  validate it: the objects, the :class:`mesh.config.errors.ValidationError` list and the file's path
- :func:`compile_yaml`: the same, valid (asserted), compiled for one workload

Each document is dedented and loses its leading blank lines, so a test may indent it with its code:
its first line is line 1 of the file, the line numbers errors name.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from mesh.config.compile import compile_proxy_config
from mesh.config.loader import load_files
from mesh.config.validate import validate


def validate_yaml(directory: Path, *documents: str, name: str = "config.yaml") -> tuple[list, list, str]:
    """``(objects, errors, path)`` of the YAML ``documents`` (one ``---`` stream in ``directory/name``).

    ``str(error)`` is what the loader logs: ``PATH:LINE: Kind/namespace/name: field: reason``.
    """
    path = directory / name
    path.write_text("---\n".join(textwrap.dedent(document).lstrip("\n") for document in documents))
    loaded = load_files([path])
    assert loaded.errors == [], [str(error) for error in loaded.errors]
    objects, errors = validate(loaded.resources)
    return objects, errors, str(path)


def compile_yaml(directory: Path, *documents: str, workload, name: str = "config.yaml", **options):
    """The config of ``workload`` compiled from the YAML ``documents``, which must be valid."""
    objects, errors, _ = validate_yaml(directory, *documents, name=name)
    assert errors == [], [str(error) for error in errors]
    return compile_proxy_config(objects, workload, **options)
