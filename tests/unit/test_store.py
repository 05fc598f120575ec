"""The per-resource store: invalid resources rejected alone, last good versions kept, deletions."""

import textwrap
from pathlib import Path

from mesh.config.loader import load_dir
from mesh.control.store import ResourceStore

SE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
spec:
  hosts: [{name}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - number: 80
    name: http
    protocol: HTTP
  endpoints:
  - address: 127.0.0.1
    ports: {{http: {port}}}
"""

VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews}}
      weight: {weight}
"""

BAD_VS = VS.replace("  - route:", "  - timeout: soon\n    route:")


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def store_of(directory, store=None):
    store = store or ResourceStore()
    store.update(load_dir(directory))
    return store


def spec_of(store, kind, name, namespace="default"):
    entry = store.get((kind, namespace, name))
    return entry.resource.spec if entry else None


def test_valid_resources_apply_and_notify(tmp_path):
    write(tmp_path, "a.yaml", SE.format(name="reviews", port=9080) + "---\n" + SE.format(name="ratings", port=9081))
    calls = []
    store = ResourceStore()
    store.subscribe(lambda s, change: calls.append(change))
    change = store.update(load_dir(tmp_path))
    assert change.added == (("ServiceEntry", "default", "ratings"), ("ServiceEntry", "default", "reviews"))
    assert store.errors == [] and len(store) == 2 and store.generation == 1
    assert len(calls) == 1 and calls[0].applied
    # the same content again: nothing changes, nobody is called
    change = store.update(load_dir(tmp_path))
    assert not change.applied and store.generation == 1 and len(calls) == 1


def test_invalid_resource_is_rejected_alone_and_keeps_its_last_good_version(tmp_path):
    write(tmp_path, "se.yaml", SE.format(name="reviews", port=9080))
    vs = write(tmp_path, "vs.yaml", VS.format(weight=100))
    store = store_of(tmp_path)
    version = store.version
    # the VirtualService becomes invalid, and the ServiceEntry changes in the same edit
    vs.write_text(textwrap.dedent(BAD_VS.format(weight=100)).lstrip("\n"))
    write(tmp_path, "se.yaml", SE.format(name="reviews", port=9999))
    change = store.update(load_dir(tmp_path))
    assert change.updated == (("ServiceEntry", "default", "reviews"),)
    assert change.kept == (("VirtualService", "default", "reviews"),)
    assert spec_of(store, "VirtualService", "reviews")["http"][0]["route"][0]["weight"] == 100
    assert spec_of(store, "ServiceEntry", "reviews")["endpoints"][0]["ports"]["http"] == 9999
    assert store.version != version
    [error] = store.errors
    assert str(error).startswith(f"{vs}:8: VirtualService/default/reviews: spec.http[0].timeout")
    [rejection] = store.summary()["rejected"]
    assert rejection["kept"] == f"{vs}:1"
    # fixed: the error goes, the new version applies
    vs.write_text(textwrap.dedent(VS.format(weight=100)).replace("reviews}", "reviews, port: {number: 80}}"))
    change = store.update(load_dir(tmp_path))
    assert change.updated == (("VirtualService", "default", "reviews"),) and store.errors == []


def test_never_valid_resource_stays_absent(tmp_path):
    write(tmp_path, "vs.yaml", BAD_VS.format(weight=100))
    store = store_of(tmp_path)
    assert len(store) == 0
    assert store.summary()["rejected"][0]["kept"] is None


def test_deleted_file_removes_its_resources(tmp_path):
    write(tmp_path, "a.yaml", SE.format(name="reviews", port=9080))
    b = write(tmp_path, "b.yaml", SE.format(name="ratings", port=9081))
    store = store_of(tmp_path)
    b.unlink()
    change = store.update(load_dir(tmp_path))
    assert change.removed == (("ServiceEntry", "default", "ratings"),)
    assert store.keys() == [("ServiceEntry", "default", "reviews")]


def test_document_removed_from_a_file_is_removed(tmp_path):
    write(tmp_path, "a.yaml", SE.format(name="reviews", port=9080) + "---\n" + SE.format(name="ratings", port=9081))
    store = store_of(tmp_path)
    write(tmp_path, "a.yaml", SE.format(name="reviews", port=9080))
    assert store.update(load_dir(tmp_path)).removed == (("ServiceEntry", "default", "ratings"),)


def test_yaml_syntax_error_keeps_everything_the_file_defined(tmp_path):
    write(tmp_path, "a.yaml", SE.format(name="reviews", port=9080))
    broken = write(tmp_path, "b.yaml", SE.format(name="ratings", port=9081))
    store = store_of(tmp_path)
    broken.write_text(broken.read_text() + "  - [unclosed\n")
    change = store.update(load_dir(tmp_path))
    assert change.kept == (("ServiceEntry", "default", "ratings"),) and not change.applied
    assert len(store) == 2
    [error] = store.errors
    assert str(error).startswith(f"{broken}:") and ": yaml: " in str(error)


def test_bad_header_keeps_the_last_good_version(tmp_path):
    path = write(tmp_path, "a.yaml", SE.format(name="reviews", port=9080))
    store = store_of(tmp_path)
    path.write_text(path.read_text().replace("networking.istio.io/v1", "networking.istio.io/v9"))
    change = store.update(load_dir(tmp_path))
    assert change.kept == (("ServiceEntry", "default", "reviews"),)
    assert "apiVersion" in str(store.errors[0])


def test_subscriber_failure_does_not_break_the_store(tmp_path):
    write(tmp_path, "a.yaml", SE.format(name="reviews", port=9080))
    store = ResourceStore()
    seen = []

    def broken(store, change):
        raise RuntimeError("boom")

    store.subscribe(broken)
    store.subscribe(lambda s, change: seen.append(s.version))
    store.update(load_dir(tmp_path))
    assert seen == [store.version]


def test_version_matches_the_standalone_proxy_hash(tmp_path):
    from mesh.config.compile import config_version
    from mesh.config.validate import validate

    write(tmp_path, "a.yaml", SE.format(name="reviews", port=9080))
    write(tmp_path, "b.yaml", VS.format(weight=100))
    store = store_of(tmp_path)
    objects, errors = validate(load_dir(tmp_path).resources)
    assert errors == [] and store.version == config_version(objects)


def test_two_sources_first_definition_wins(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    write(one, "a.yaml", SE.format(name="reviews", port=1))
    write(two, "a.yaml", SE.format(name="reviews", port=2) + "---\n" + SE.format(name="ratings", port=3))
    store = ResourceStore()
    store.update(load_dir(one), source="one")
    store.update(load_dir(two), source="two")
    assert spec_of(store, "ServiceEntry", "reviews")["endpoints"][0]["ports"]["http"] == 1
    assert spec_of(store, "ServiceEntry", "ratings") is not None
    assert "already defined by config source one" in str(store.errors[0])
