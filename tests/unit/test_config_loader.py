"""Loading YAML into resources: documents, line numbers, headers, duplicates."""

import textwrap
from pathlib import Path

import pytest

from mesh.config.errors import ConfigError, format_path
from mesh.config.loader import API_VERSIONS, load_dir, load_files

DATA = Path(__file__).parent.parent / "data" / "config"
NETWORKING = ("networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3, "
              "networking.txmesh.io/v1")


def _write(directory, name, text):
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def test_loads_every_document_of_every_yaml_file_in_name_order():
    result = load_dir(DATA / "bookinfo")
    assert result.errors == []
    assert [Path(f).name for f in result.files] == [
        "00-services.yaml", "01-workloads.yaml", "02-destinationrules.yaml", "03-virtualservices.yaml"]
    assert [(r.kind, r.namespace, r.name) for r in result.resources][:4] == [
        ("ServiceEntry", "bookinfo", "reviews"), ("ServiceEntry", "bookinfo", "ratings"),
        ("ServiceEntry", "bookinfo", "external-api"), ("WorkloadEntry", "bookinfo", "ratings-vm-1")]
    assert len(result.resources) == 10


def test_resource_knows_the_line_of_every_field(tmp_path):
    path = _write(tmp_path, "vs.yaml", """
        # a comment
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts:
          - reviews
          http:
          - route:
            - destination:
                host: reviews
              weight: 100
        """)
    [resource] = load_files([path]).resources
    assert (resource.file, resource.line, resource.namespace, resource.api_version) == (
        path, 2, "default", "networking.istio.io/v1")
    assert resource.spec["http"][0]["route"][0]["weight"] == 100
    assert resource.line_of(("spec", "hosts", 0)) == 8
    assert resource.line_of(("spec", "http", 0, "route", 0, "weight")) == 13
    # a field that is not there is reported at its nearest parent
    assert resource.line_of(("spec", "http", 0, "timeout")) == 10
    error = resource.error(("spec", "http", 0, "route", 0, "weight"), "weights must sum to 100")
    assert str(error) == f"{path}:13: VirtualService/default/reviews: spec.http[0].route[0].weight: " \
                         "weights must sum to 100"


def test_multi_document_lines_are_per_document(tmp_path):
    path = _write(tmp_path, "two.yml", """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: istio-system}
        spec:
          mtls: {mode: STRICT}
        ---
        apiVersion: security.istio.io/v1beta1
        kind: AuthorizationPolicy
        metadata:
          name: deny-all
          namespace: foo
        spec: {}
        """)
    first, second = load_files([path]).resources
    assert (first.kind, first.line, first.spec) == ("PeerAuthentication", 1, {"mtls": {"mode": "STRICT"}})
    assert (second.kind, second.line, second.namespace) == ("AuthorizationPolicy", 7, "foo")
    assert second.line_of(("metadata", "namespace")) == 11


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, "bad.yaml", """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: x
        spec:
          hosts: [a, b
        """)
    result = load_files([path])
    assert result.resources == []
    [error] = result.errors
    assert error.kind is None and error.line == 7
    assert str(error).startswith(f"{path}:7: yaml: ")
    assert "expected ',' or ']'" in str(error)


@pytest.mark.parametrize("api_version,kind", [
    ("networking.istio.io/v1", "ServiceEntry"), ("networking.istio.io/v1beta1", "DestinationRule"),
    ("networking.istio.io/v1alpha3", "VirtualService"), ("networking.istio.io/v1beta1", "WorkloadEntry"),
    ("security.istio.io/v1", "AuthorizationPolicy"), ("security.istio.io/v1beta1", "PeerAuthentication"),
    ("networking.txmesh.io/v1", "VirtualService"), ("security.txmesh.io/v1", "AuthorizationPolicy"),
])
def test_accepted_api_versions(tmp_path, api_version, kind):
    path = _write(tmp_path, "r.yaml", f"apiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: x}}\n")
    result = load_files([path])
    assert result.errors == []
    assert result.resources[0].kind == kind and result.resources[0].spec == {}


@pytest.mark.parametrize("header,expected", [
    ("apiVersion: networking.istio.io/v2\nkind: ServiceEntry\nmetadata: {name: x}\n",
     "{path}:1: ServiceEntry/default/x: apiVersion: apiVersion 'networking.istio.io/v2' is not valid for "
     f"ServiceEntry; use one of: {NETWORKING}"),
    ("apiVersion: security.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\n",
     "{path}:1: VirtualService/default/x: apiVersion: apiVersion 'security.istio.io/v1' is not valid for "
     f"VirtualService; use one of: {NETWORKING}"),
    ("apiVersion: networking.istio.io/v1\nkind: EnvoyFilter\nmetadata: {name: ef, namespace: a}\n",
     "{path}:2: EnvoyFilter/a/ef: kind: unknown kind 'EnvoyFilter'; txmesh supports: "
     + ", ".join(sorted(API_VERSIONS))),
    ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  namespace: a\n",
     "{path}:3: ServiceEntry/a/<unnamed>: metadata.name: metadata.name is required"),
    ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: My_Service}\n",
     "{path}:3: ServiceEntry/default/My_Service: metadata.name: invalid name 'My_Service': use lower-case "
     "letters, digits, '-' and '.', starting and ending with a letter or digit"),
    ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x}\nspex: {}\n",
     "{path}:4: ServiceEntry/default/x: spex: unknown field 'spex' (did you mean 'spec'?); supported: "
     "apiVersion, kind, metadata, spec, status"),
    ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x}\nspec: [1]\n",
     "{path}:4: ServiceEntry/default/x: spec: spec must be a mapping"),
    ("- just\n- a list\n",
     "{path}:1: yaml: a document must be a mapping with apiVersion, kind, metadata and spec"),
])
def test_invalid_headers_are_reported_and_dropped(tmp_path, header, expected):
    path = _write(tmp_path, "r.yaml", header)
    result = load_files([path])
    assert result.resources == []
    assert [str(error) for error in result.errors] == [expected.format(path=path)]


def test_duplicate_keys_are_errors(tmp_path):
    path = _write(tmp_path, "dup.yaml", """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: r}
        spec:
          host: a
          host: b
        """)
    result = load_files([path])
    assert [str(error) for error in result.errors] == [
        f"{path}:6: DestinationRule/default/r: spec.host: duplicate key 'host'; remove one of them"]


def test_duplicate_resource_is_an_error_naming_the_first(tmp_path):
    first = _write(tmp_path, "a.yaml", """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: r, namespace: shop}
        spec: {host: a}
        """)
    second = _write(tmp_path, "b.yaml", """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: r, namespace: shop}
        spec: {hosts: [a]}
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata:
          namespace: shop
          name: r
        spec: {host: b}
        """)
    result = load_dir(tmp_path)
    assert [r.kind for r in result.resources] == ["DestinationRule", "VirtualService"]
    assert [str(error) for error in result.errors] == [
        f"{second}:10: DestinationRule/shop/r: metadata.name: duplicate DestinationRule shop/r: also "
        f"defined at {first}:1; names must be unique per kind and namespace"]


def test_anchors_work_and_recursive_aliases_are_rejected(tmp_path):
    path = _write(tmp_path, "anchors.yaml", """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: a, labels: &labels {app: a}}
        spec: {hosts: [a], workloadSelector: {labels: *labels}}
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: b}
        spec: &loop {x: *loop}
        """)
    result = load_files([path])
    assert result.resources[0].spec["workloadSelector"]["labels"] == {"app": "a"}
    assert [str(error) for error in result.errors] == [f"{path}:6: yaml: recursive YAML alias; expand it"]


def test_non_yaml_files_are_ignored_and_missing_directory_raises(tmp_path):
    (tmp_path / "README.md").write_text("not yaml: [")
    assert load_dir(tmp_path).files == ()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dir(tmp_path / "nope")


def test_format_path_and_yaml_error_format():
    assert format_path(("spec", "http", 0, "route", 1, "weight")) == "spec.http[0].route[1].weight"
    assert format_path(("spec", "subsets", 0, "labels", "app.kubernetes.io/name")) == \
        'spec.subsets[0].labels["app.kubernetes.io/name"]'
    assert str(ConfigError(file="f.yaml", line=3, reason="bad")) == "f.yaml:3: yaml: bad"
