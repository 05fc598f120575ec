"""The directory config source: polling fallback, debounce, the built-in mesh_config_sources plugin."""

from twisted.internet.task import Clock

from mesh.api import Config
from mesh.control.sources import BuiltinConfigSources, DirectorySource, IConfigSource
from mesh.control.store import ResourceStore
from mesh.plugins import MeshPluginManager

SE = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
spec:
  hosts: [{name}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: 9080}}}}]
"""


def polling_source(path, clock):
    source = DirectorySource(path, clock, use_inotify=False, poll_interval=1.0, debounce=0.1, max_delay=1.0)
    results = []
    source.watch(results.append)
    source.load()
    source.startService()
    return source, results


def test_polling_notices_new_changed_and_deleted_files(tmp_path):
    clock = Clock()
    source, results = polling_source(tmp_path, clock)
    assert IConfigSource.providedBy(source) and source.mode == "polling"
    (tmp_path / "a.yaml").write_text(SE.format(name="reviews"))
    (tmp_path / "notes.txt").write_text("ignored")
    clock.advance(1.0)
    assert results == []  # debounced
    clock.advance(0.1)
    assert [r.key for r in results[-1].resources] == [("ServiceEntry", "default", "reviews")]
    clock.advance(5)
    assert len(results) == 1  # nothing changed since
    (tmp_path / "a.yaml").unlink()
    clock.advance(1.0)
    clock.advance(0.2)
    assert len(results) == 2 and results[-1].resources == []
    source.stopService()


def test_debounce_coalesces_bursts_but_applies_within_max_delay(tmp_path):
    clock = Clock()
    source, results = polling_source(tmp_path, clock)
    for _ in range(5):  # an editor writing several times
        source.changed()
        clock.advance(0.05)
    assert results == []
    clock.advance(0.1)
    assert len(results) == 1
    # a file rewritten forever still gets applied after max_delay
    for _ in range(30):
        source.changed()
        clock.advance(0.05)
    assert len(results) >= 2
    source.stopService()


def test_missing_directory_is_an_error_not_a_crash(tmp_path):
    source = DirectorySource(tmp_path / "nope", Clock(), use_inotify=False)
    result = source.load()
    assert "cannot read the config directory" in str(result.errors[0])
    store = ResourceStore()
    store.update(result)
    assert len(store) == 0 and store.errors


def test_inotify_source_starts_on_linux(tmp_path):
    from twisted.internet import reactor

    source = DirectorySource(tmp_path, reactor)
    source.load()
    source.startService()
    try:
        assert source.mode == "inotify"
    finally:
        source.stopService()


def test_builtin_plugin_gives_a_directory_source_for_config_dir(tmp_path):
    pm = MeshPluginManager()
    pm.register(BuiltinConfigSources(), name="builtin.config_sources")
    pm.configure(Config("control", {}, Clock(), None, pm))
    [source] = [s for s in pm.hook.mesh_config_sources(options={"config_dir": str(tmp_path)}) if s]
    assert source.path == str(tmp_path)
    assert pm.hook.mesh_config_sources(options={"config_dir": None}) == []
