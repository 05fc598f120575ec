"""Plugin API 1 (docs/hooks.md): the plugin manager's lifecycle, DEFAULT_PLUGINS, the mesh.api views.

Real plugin managers with real (built-in and entry-point) plugins; the hooks are called as the
proxy and the control plane call them.  The processes themselves are tests/integration's
(test_proxy_plugins.py, test_example_plugin.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python import usage

from mesh import api, hookimpl, hookspecs
from mesh.api import AuthzDecision, Config, OptionParser
from mesh.config.tables import ClusterSpec, EndpointSpec
from mesh.control.tap import ControlOptions
from mesh.plugins import (
    DEFAULT_PLUGINS,
    PluginError,
    PluginRegistrationError,
    configure_or_exit,
    disabled_in_argv,
    failures,
    fast_caller,
    make_plugin_manager,
    plugin_options,
)
from mesh.proxy.clusters import Cluster, Endpoint
from mesh.proxy.context import RequestContext
from mesh.proxy.tap import Options as ProxyOptions
from mesh.proxy.tap import ProxyOptions as BuiltinProxyOptions
from mesh.proxy.tap import makeService
from mesh.response_flags import FLAGS

ROOT = Path(__file__).resolve().parents[2]
BUILTIN_NAMES = [name for name, _ in DEFAULT_PLUGINS]
CONTROL_ONLY = ["builtin.ca", "builtin.config_sources", "builtin.kubernetes_registry", "builtin.kubernetes_crds",
                "builtin.kubernetes_root_cert", "builtin.kubernetes_webhook_ca"]


class Recorder:
    """A plugin that records its lifecycle calls."""

    def __init__(self, idle=False):
        self.calls = []
        self.idle = idle

    @hookimpl
    def mesh_configure(self, config):
        self.calls.append(("configure", config.role))
        if self.idle:
            config.set_idle(self, "not here")

    @hookimpl
    def mesh_unconfigure(self, config):
        self.calls.append(("unconfigure", config.role))

    @hookimpl
    def mesh_request_complete(self, ctx, outcome):
        self.calls.append(("complete", outcome))


def _config(pm, role="proxy", options=None, service=None):
    return Config(role, options or {}, Clock(), service, pm)


# -- DEFAULT_PLUGINS --------------------------------------------------------------------------------
def test_every_builtin_is_registered_before_the_entry_points():
    pm = make_plugin_manager()
    names = pm.plugin_names()
    assert names[:len(BUILTIN_NAMES)] == BUILTIN_NAMES
    assert {"peak_ewma", "otlp"} <= set(names[len(BUILTIN_NAMES):])
    # pluggy calls the last registered first: an installed plugin runs before the built-in (unless the
    # built-in says tryfirst, as builtin.tracing's mesh_request_complete does)
    assert [impl.plugin_name for impl in reversed(pm.hook.mesh_pick_endpoint.get_hookimpls())] == [
        "peak_ewma", "builtin.balancing"]
    complete = [impl.plugin_name for impl in reversed(pm.hook.mesh_request_complete.get_hookimpls())]
    assert complete.index("peak_ewma") < complete.index("builtin.metrics")


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_every_builtin_can_be_disabled_on_the_command_line(name):
    options = plugin_options(BuiltinProxyOptions, "proxy", argv=["twistd", "mesh-proxy", "--disable-plugin", name])
    assert name not in options.pluginmanager.plugin_names()
    assert options.pluginmanager.is_blocked(name)


def test_a_builtin_disabled_from_the_environment_is_left_out(monkeypatch):
    monkeypatch.setenv("MESH_DISABLE_PLUGINS", "builtin.tap, builtin.ca")
    names = make_plugin_manager(load_entry_points=False).plugin_names()
    assert "builtin.tap" not in names and "builtin.ca" not in names and "builtin.metrics" in names


def test_disabled_plugins_are_picked_out_of_the_command_line():
    argv = ["twistd", "-n", "mesh-proxy", "--disable-plugin", "a", "--workload", "w", "--disable-plugin=b"]
    assert disabled_in_argv(argv) == {"a", "b"}


# -- lifecycle ---------------------------------------------------------------------------------------
def test_configure_then_registration_is_closed():
    pm = make_plugin_manager(load_entry_points=False, disabled=BUILTIN_NAMES)
    recorder = Recorder()
    pm.register(recorder, name="recorder")
    pm.configure(_config(pm))
    assert recorder.calls == [("configure", "proxy")]
    with pytest.raises(PluginRegistrationError, match="plugin 'late' registered after mesh_configure"):
        pm.register(Recorder(), name="late")
    pm.unconfigure()
    pm.unconfigure()  # once only
    assert recorder.calls == [("configure", "proxy"), ("unconfigure", "proxy")]


def test_a_failing_unconfigure_is_logged_and_the_others_still_run():
    class Failing(Recorder):
        @hookimpl
        def mesh_unconfigure(self, config):
            raise RuntimeError("cannot flush")

    pm = make_plugin_manager(load_entry_points=False, disabled=BUILTIN_NAMES)
    first = Recorder()
    pm.register(first, name="first")
    pm.register(Failing(), name="failing")  # called first: registered last
    pm.configure(_config(pm))
    pm.unconfigure()
    assert first.calls[-1] == ("unconfigure", "proxy")
    assert [entry["plugin"] for entry in failures.describe()].count("failing") == 1


def test_an_idle_plugin_is_listed_but_never_called():
    pm = make_plugin_manager(load_entry_points=False, disabled=BUILTIN_NAMES)
    idle, busy = Recorder(idle=True), Recorder()
    pm.register(idle, name="idle")
    pm.register(busy, name="busy")
    pm.configure(_config(pm))
    assert pm.plugin_names() == ["idle", "busy"]
    assert pm.idle == {"idle": (idle, "not here")}
    fast_caller(pm.hook.mesh_request_complete)(ctx=None, outcome="done")
    pm.unconfigure()
    assert idle.calls == [("configure", "proxy")]
    assert busy.calls == [("configure", "proxy"), ("complete", "done"), ("unconfigure", "proxy")]


def test_a_sidecar_configures_its_builtins_and_leaves_the_control_planes_idle(tmp_path):
    options = ProxyOptions()
    options.parseOptions(["--config-dir", str(tmp_path), "--workload", "w", "--access-log", str(tmp_path / "a.log")])
    proxy = makeService(options)
    try:
        dump = proxy.config_dump()
        assert dump["plugins"] == options.pluginmanager.plugin_names()
        assert dump["plugins"][:len(BUILTIN_NAMES)] == BUILTIN_NAMES
        assert {name: reason for name, reason in dump["plugins_idle"].items() if name.startswith("builtin.")} == {
            "builtin.ca": "control plane only", "builtin.config_sources": "control plane only",
            **{name: "mesh-control --kubernetes only" for name in CONTROL_ONLY[2:]}}
        assert dump["tracing"] == {"sampling_percent": 1.0, "zipkin": None}
        with pytest.raises(PluginRegistrationError):
            options.pluginmanager.register(Recorder(), name="late")
    finally:
        for service in proxy:
            if hasattr(service, "_stream"):
                service.stopService()  # the access log closes its file


def test_telemetry_options_make_the_telemetry_plugins_idle(tmp_path):
    options = ProxyOptions()
    options.parseOptions(["--config-dir", str(tmp_path), "--workload", "w", "--access-log", "off",
                          "--metrics-port", "0"])
    idle = makeService(options).config_dump()["plugins_idle"]
    assert idle["builtin.accesslog"] == "--access-log off" and idle["builtin.metrics"] == "--metrics-port 0"


def test_a_failing_mesh_configure_exits_with_one_line_naming_the_plugin(capsys):
    class Broken:
        @hookimpl
        def mesh_configure(self, config):
            raise RuntimeError("no such file: /etc/broken.conf")

    pm = make_plugin_manager(load_entry_points=False, disabled=BUILTIN_NAMES)
    pm.register(Broken(), name="broken")
    with pytest.raises(SystemExit) as exit_info:
        configure_or_exit("mesh-proxy", _config(pm))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "mesh-proxy: plugin 'broken' failed in mesh_configure: RuntimeError: no such file: /etc/broken.conf (the "
        "log has the traceback); fix the plugin or leave it out with --disable-plugin broken\n")


# -- API version ------------------------------------------------------------------------------------
class FromTheFuture:
    MESH_API_VERSION = hookspecs.API_VERSION + 1

    @hookimpl
    def mesh_route(self, ctx, table):
        return None


def test_a_plugin_for_a_newer_api_is_refused_with_what_to_do():
    pm = make_plugin_manager(load_entry_points=False)
    with pytest.raises(PluginRegistrationError) as error:
        pm.register(FromTheFuture(), name="future")
    assert str(error.value) == (
        f"plugin 'future' needs txmesh plugin API {hookspecs.API_VERSION + 1}, and this txmesh has plugin API "
        f"{hookspecs.API_VERSION}: upgrade txmesh, install a version of the plugin written for API "
        f"{hookspecs.API_VERSION}, or leave it out with --disable-plugin future")
    current = FromTheFuture()
    current.MESH_API_VERSION = hookspecs.API_VERSION
    assert pm.register(current, name="current") == "current"


@pytest.fixture
def broken_dist(tmp_path, monkeypatch):
    """An installed distribution whose ``mesh.plugins`` entry point ``broken`` fails to import."""
    (tmp_path / "txmesh_broken_plugin.py").write_text("raise ImportError('libfoo.so.1: cannot open shared object')\n")
    info = tmp_path / "txmesh_broken-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: txmesh-broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mesh.plugins]\nbroken = txmesh_broken_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_plugin_that_cannot_be_imported_is_named_with_what_to_do(broken_dist):
    with pytest.raises(PluginRegistrationError) as error:
        make_plugin_manager()
    assert str(error.value) == ("plugin 'broken' cannot be loaded (ImportError: libfoo.so.1: cannot open shared "
                                "object): fix or reinstall it, or leave it out with --disable-plugin broken")
    with pytest.raises(usage.UsageError, match="plugin 'broken' cannot be loaded"):
        plugin_options(BuiltinProxyOptions, "proxy", argv=[])  # twistd prints it under the usage, no traceback
    options = plugin_options(BuiltinProxyOptions, "proxy", argv=["mesh-proxy", "--disable-plugin", "broken"])
    assert "broken" not in options.pluginmanager.plugin_names()


def test_api_version_is_one_number():
    assert api.API_VERSION == hookspecs.API_VERSION == 1


# -- options -----------------------------------------------------------------------------------------
class WithOptions:
    @hookimpl
    def mesh_addoption(self, parser):
        parser.addoption("shout", default="no", help="Shout.", role="both")
        parser.addoption("proxy-only", default=1, coerce=int, help="Only in proxies.")


def test_addoption_puts_plugin_options_on_the_roles_command_line(monkeypatch):
    monkeypatch.setattr("mesh.plugins.make_plugin_manager", _with(WithOptions()))
    proxy = plugin_options(BuiltinProxyOptions, "proxy", argv=[])
    proxy.parseOptions(["--workload", "w", "--config-dir", ".", "--proxy-only", "7"])
    assert (proxy["shout"], proxy["proxy-only"]) == ("no", 7)
    assert "Shout. (plugin with)" in str(proxy)
    control = plugin_options(ControlOptions, "control", argv=[])
    with pytest.raises(usage.UsageError, match="proxy-only"):
        control.parseOptions(["--state-dir", ".", "--proxy-only", "7"])


def test_an_option_that_exists_is_a_usage_error_naming_the_plugin(monkeypatch):
    class Clash:
        @hookimpl
        def mesh_addoption(self, parser):
            parser.addoption("workload")

    monkeypatch.setattr("mesh.plugins.make_plugin_manager", _with(Clash()))
    with pytest.raises(usage.UsageError, match="plugin 'with': option --workload exists already in mesh-proxy"):
        plugin_options(BuiltinProxyOptions, "proxy", argv=[])


def test_option_names_and_roles_are_checked():
    parser = OptionParser()
    parser.current_plugin = "p"
    for name, role in (("--x", "proxy"), ("X", "proxy"), ("x", "sidecar")):
        with pytest.raises(ValueError, match="plugin 'p'"):
            parser.addoption(name, role=role)
    parser.addoption("x", role="both")
    assert [option.name for option in parser.for_role("control")] == ["x"]


def _with(plugin):
    """A make_plugin_manager that registers only ``plugin``, as ``with``."""
    def make(disabled=(), load_entry_points=True):
        pm = make_plugin_manager(BUILTIN_NAMES, load_entry_points=False)
        pm.register(plugin, name="with")
        return pm
    return make


# -- hook tracing ------------------------------------------------------------------------------------
def test_mesh_trace_hooks_logs_every_call_through_twisted_logger(monkeypatch):
    monkeypatch.setenv("MESH_TRACE_HOOKS", "1")
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        pm = make_plugin_manager(load_entry_points=False)
        ctx = RequestContext.for_test(host="nowhere")
        assert fast_caller(pm.hook.mesh_route)(ctx=ctx, table=_empty_table()) is None
    finally:
        globalLogPublisher.removeObserver(events.append)
    traces = [event["trace"] for event in events if "trace" in event]
    assert any("mesh_route" in trace for trace in traces), traces


def test_without_mesh_trace_hooks_nothing_is_logged(monkeypatch):
    monkeypatch.delenv("MESH_TRACE_HOOKS", raising=False)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        pm = make_plugin_manager(load_entry_points=False)
        fast_caller(pm.hook.mesh_route)(ctx=RequestContext.for_test(host="nowhere"), table=_empty_table())
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not [event for event in events if "trace" in event]


def _empty_table():
    from mesh.config.compile import Workload, compile_proxy_config
    return compile_proxy_config([], Workload("w", "default", {})).routes


# -- mesh.api ------------------------------------------------------------------------------------------
def test_the_proxys_objects_provide_the_views():
    assert isinstance(RequestContext.for_test(), api.RequestView)
    spec = ClusterSpec(name="outbound|80||a", service="a", port=80)
    endpoint = Endpoint(EndpointSpec("10.0.0.1", 80), pool=None)
    assert isinstance(endpoint, api.EndpointView) and isinstance(endpoint.spec, api.EndpointSpecView)
    cluster = Cluster(spec, [endpoint])
    assert isinstance(cluster, api.ClusterView) and isinstance(cluster.spec, api.ClusterSpecView)


def test_result_types_are_the_plain_forms():
    assert AuthzDecision(False, "ns/deny") == (False, "ns/deny")
    allowed, policy = AuthzDecision(True, None)
    assert allowed and policy is None
    assert api.SignedCertificate(b"c", b"ch") == (b"c", b"ch")
    assert api.GIVE_UP is False
    assert api.RESPONSE_FLAGS is FLAGS and api.RESPONSE_FLAGS["UF"].name == "UpstreamConnectionFailure"


def test_a_plugin_error_names_plugin_and_hook():
    error = PluginError("p", "mesh_route")
    assert str(error) == "plugin 'p' failed in mesh_route"


# -- mypy ----------------------------------------------------------------------------------------------
def test_the_plugin_api_type_checks():
    """mypy (configured in setup.cfg) on the plugin API: what plugins type-check against."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "mesh/hookspecs.py", "mesh/api.py", "mesh/plugins.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
