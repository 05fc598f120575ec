"""Packaging: the license, what the image build sends and installs, what a release ships, and the CRD
schemas in deploy/ against txmesh's own validation (one source of truth, checked field by field).

docs/release.md is the workflow these pieces serve.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from mesh import __version__
from mesh.config.errors import format_path
from mesh.config.loader import load_documents
from mesh.config.validate import validate

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
#: sha256 of the Apache License 2.0 as the ASF publishes it (LICENSE-2.0.txt).
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
#: What a release's source tree holds that the image must never get.
NEVER_IN_THE_IMAGE = (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "bench/run.py", "plugins/README",
                      "state/control/ca-key.pem", "mesh/x/key.pem", "mesh/__pycache__/x.pyc", "docs/quickstart.md",
                      "twisted/plugins/dropin.cache", ".stamp-apt")


# -- license --------------------------------------------------------------------------------

def test_the_license_is_the_apache_2_0_text_the_metadata_declares():
    assert hashlib.sha256((ROOT / "LICENSE").read_bytes()).hexdigest() == APACHE_2_0_SHA256
    for setup in (ROOT / "setup.cfg", *ROOT.glob("plugins/*/setup.cfg")):
        assert re.search(r"^license = Apache-2\.0$", setup.read_text(), re.M), setup


# -- the image build ------------------------------------------------------------------------

def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves *path* out: Docker's rules (the last matching pattern wins, ``!``
    re-includes, ``*`` stays within a path segment, ``**`` spans any, a pattern matching a parent
    directory matches what is under it)."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        regex = re.escape(body.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:depth])) for depth in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def dockerfile_sources() -> list[str]:
    sources = []
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    return sources


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = dockerfile_sources()
    assert {"mesh", "twisted", "setup.cfg", "LICENSE", "deploy/constraints.txt"} <= set(sources), sources
    for source in sources:
        assert (ROOT / source).exists(), source
        tracked = subprocess.run(["git", "ls-files", "--", source], cwd=ROOT, capture_output=True, text=True,
                                 timeout=30).stdout.split()
        for path in tracked or [source]:  # the source files (git's view), or a new file not yet added
            assert not dockerignore_excludes(path, patterns), path
    for path in NEVER_IN_THE_IMAGE:
        assert dockerignore_excludes(path, patterns), path


def test_the_image_installs_pinned_versions_the_tests_ran_with():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "COPY deploy/constraints.txt ./constraints.txt" in dockerfile
    assert re.search(r'pip install -c constraints\.txt "\.\[kubernetes\]"', dockerfile)
    assert "-c deploy/constraints.txt -e '.[test]'" in (ROOT / "Makefile").read_text()
    lines = [line for line in (DEPLOY / "constraints.txt").read_text().splitlines() if not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[a-z0-9-]+==[0-9][^\s=]*", line) for line in lines), lines
    pinned = {line.split("==")[0] for line in lines}
    assert {"twisted", "pyopenssl", "cryptography", "kubernetes", "pluggy", "h2", "httptools"} <= pinned
    result = subprocess.run([sys.executable, str(DEPLOY / "tools" / "pin_image_deps.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# -- a release: one version, wheel and sdist ------------------------------------------------

def test_the_version_is_written_once_and_the_manifests_use_its_image():
    """docs/release.md: bump mesh.__version__; setup.cfg reads it, and deploy/ names the image of that version."""
    assert re.search(r"^version = attr: mesh\.__version__$", (ROOT / "setup.cfg").read_text(), re.M)
    tags = {(path.relative_to(ROOT), tag) for path in DEPLOY.rglob("*.yaml")
            for tag in re.findall(r"txmesh/txmesh:(\S+)", path.read_text())}
    assert tags and {tag for _, tag in tags} == {__version__}, tags
    assert re.search(rf"^## {re.escape(__version__)}\b", (ROOT / "CHANGELOG.md").read_text(), re.M)


def test_the_wheel_and_the_sdist_hold_the_dropin_the_demo_config_and_the_license(tmp_path):
    """Built as docs/release.md says (from a copy of the tree, so the checkout stays clean)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for name in ("mesh", "twisted"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", "dist", "."]
    result = subprocess.run(build, cwd=source, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-c", "from setuptools import build_meta; build_meta.build_sdist('dist')"],
                            cwd=source, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (wheel,) = (source / "dist").glob("txmesh-*.whl")
    (sdist,) = (source / "dist").glob("txmesh-*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {"twisted/plugins/mesh_services.py", "mesh/demo/mesh-config/user-service.yaml", "mesh/cli/main.py"} <= names
    assert not any(name.startswith(("twisted/__init__", "twisted/plugins/__init__", "tests/")) for name in names)
    assert any(name.endswith(".dist-info/LICENSE") for name in names)
    assert "License: Apache-2.0" in metadata and "meshctl = mesh.cli.main:main" in entry_points
    assert f"\nVersion: {__version__}\n" in metadata and wheel.name == f"txmesh-{__version__}-py3-none-any.whl"
    with tarfile.open(sdist) as archive:
        members = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "setup.cfg", "pyproject.toml", "twisted/plugins/mesh_services.py",
            "mesh/demo/mesh-config/services.yaml"} <= members


# -- one source of truth for the CRD schemas ------------------------------------------------

sys.path.insert(0, str(DEPLOY / "tools"))
import gen_crds  # noqa: E402  (deploy/tools is not a package)

PROBE = "zzProbeField"
MAP_KEY = "8080"  # a key for map-valued fields (port-level settings want a port number)
#: Fields txmesh's validation knows only to reject them with advice, which the CRD leaves out so that the
#: API server rejects them at apply time: (kind, field path, key) -> words of the validator's reason.
REJECTED_WITH_ADVICE = {
    ("VirtualService", 'spec.http[0].match[0].queryParams["8080"]', "prefix"):
        "prefix matching of query parameters is not supported (by Istio either)",
}


def schema_nodes(schema: dict, path: tuple = ()):
    """``(path, schema)`` of every node of a CRD schema: object properties, map values, array items."""
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from schema_nodes(sub, path + (key,))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from schema_nodes(schema["additionalProperties"], path + (MAP_KEY,))
    if "items" in schema:
        yield from schema_nodes(schema["items"], path + (0,))


def document_with(path: tuple, leaf):
    """The smallest spec with *leaf* at *path* (ints are list indexes)."""
    if not path:
        return leaf
    head, rest = path[0], path[1:]
    return [document_with(rest, leaf)] if head == 0 else {head: document_with(rest, leaf)}


def validation_errors(group: str, kind: str, spec) -> list:
    api = "networking.istio.io/v1" if group.startswith("networking.") else "security.istio.io/v1"
    loaded = load_documents([{"apiVersion": api, "kind": kind, "metadata": {"name": "probe", "namespace": "default"},
                              "spec": spec}], "probe")
    assert loaded.errors == []
    return validate(loaded.resources)[1]


def reason_at(group, kind, path, leaf, field) -> str:
    errors = [error for error in validation_errors(group, kind, document_with(path, leaf)) if error.field == field]
    assert errors, f"{kind}: txmesh's validation says nothing about {field}"
    return errors[0].reason


CRD_OBJECTS = [(group, kind, path, schema) for group, kind, _plural, spec, _columns in gen_crds.KINDS
               for path, schema in schema_nodes(spec) if "properties" in schema]
CRD_ENUMS = [(group, kind, path, schema) for group, kind, _plural, spec, _columns in gen_crds.KINDS
             for path, schema in schema_nodes(spec) if "enum" in schema]


@pytest.mark.parametrize("group, kind, path, schema", CRD_OBJECTS,
                         ids=[f"{kind}:{format_path(('spec', *path))}" for _, kind, path, _ in CRD_OBJECTS])
def test_every_crd_object_has_the_fields_txmesh_validation_supports(group, kind, path, schema):
    """An unknown field there makes the validator list what it supports: the CRD's properties, exactly."""
    field = format_path(("spec", *path))
    reason = reason_at(group, kind, path, {PROBE: 1}, format_path(("spec", *path, PROBE)))
    supported = set(re.search(r"supported: (.*)$", reason)[1].split(", "))
    in_crd = set(schema["properties"])
    assert not in_crd - supported, f"{kind} {field}: the CRD accepts what txmesh rejects: {in_crd - supported}"
    for key in sorted(supported - in_crd):
        advice = REJECTED_WITH_ADVICE.get((kind, field, key))
        assert advice, (f"{kind} {field}: txmesh supports {key!r}, which the CRD lacks (the API server would "
                        "refuse it): add it to deploy/tools/gen_crds.py and regenerate")
        assert advice in reason_at(group, kind, path, {key: "a"}, format_path(("spec", *path, key)))


@pytest.mark.parametrize("group, kind, path, schema", CRD_ENUMS,
                         ids=[f"{kind}:{format_path(('spec', *path))}" for _, kind, path, _ in CRD_ENUMS])
def test_every_crd_enum_is_the_set_txmesh_validation_accepts(group, kind, path, schema):
    field = format_path(("spec", *path))
    reason = reason_at(group, kind, path, "ZZ_PROBE", field)
    accepted = set(re.search(r"use one of: (.*)$", reason)[1].split(", "))
    assert accepted == set(schema["enum"]), f"{kind} {field}: CRD {schema['enum']}, txmesh {sorted(accepted)}"


def test_the_agreement_tests_cover_every_kind():
    assert {kind for _, kind, _, _ in CRD_OBJECTS} == {kind for _, kind, *_ in gen_crds.KINDS}
    assert len(CRD_OBJECTS) >= 60 and len(CRD_ENUMS) >= 10
