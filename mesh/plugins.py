"""The plugin manager: every built-in plugin first, then entry points.

Built-in behaviour (routing, balancing, retries, authorization, tracing,
metrics, the access log, ``/tap``, the CA signer, the config sources) is a set
of plugins listed in :data:`DEFAULT_PLUGINS` and registered here, in one place,
exactly like a third-party plugin.  Third-party plugins are found under the
``mesh.plugins`` entry-point group and registered after the built-ins; since
pluggy calls later registrations first, an installed plugin runs before the
built-in one and can override it.

Any plugin can be disabled by name (``--disable-plugin NAME`` on the command
line, or the ``MESH_DISABLE_PLUGINS`` environment variable, comma-separated).

A process's plugins go through the lifecycle of docs/hooks.md:
:func:`plugin_options` calls ``mesh_addoption`` before the command line is
parsed; :meth:`MeshPluginManager.configure` calls ``mesh_configure`` before
any listener opens and then closes registration (the hot path's
:func:`fast_caller` callers are built after it); :meth:`MeshPluginManager.unconfigure`
calls ``mesh_unconfigure`` when the service stops.  ``MESH_TRACE_HOOKS=1``
logs every hook call through pluggy's tracing (slow: for debugging a plugin).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pluggy
from twisted.logger import Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure

from mesh import hookspecs
from mesh.api import Config, OptionParser

log = Logger()

ENTRY_POINT_GROUP = "mesh.plugins"

#: Every built-in plugin, in registration order: ``(name, "module")`` registers the module,
#: ``(name, "module:Class")`` one instance of the class (made without arguments; it gets its
#: settings and collaborators in ``mesh_configure``).  A plugin that does not apply to a process
#: (the CA signer in a sidecar, the Kubernetes sources without ``--kubernetes``) stays idle there.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("builtin.routing", "mesh.builtin.routing"),
    ("builtin.balancing", "mesh.builtin.balancing"),
    ("builtin.retry", "mesh.builtin.retry"),
    ("builtin.authz", "mesh.builtin.authz"),
    ("builtin.tracing", "mesh.builtin.telemetry:TracingPlugin"),
    ("builtin.metadata_exchange", "mesh.builtin.telemetry:MetadataExchangePlugin"),
    ("builtin.metrics", "mesh.builtin.telemetry:MetricsPlugin"),
    ("builtin.accesslog", "mesh.builtin.telemetry:AccessLogPlugin"),
    ("builtin.tap", "mesh.builtin.telemetry:TapPlugin"),
    ("builtin.ca", "mesh.builtin.ca:BuiltinSigner"),
    ("builtin.config_sources", "mesh.control.sources:BuiltinConfigSources"),
    ("builtin.kubernetes_registry", "mesh.control.kube.plugin:RegistryPlugin"),
    ("builtin.kubernetes_crds", "mesh.control.kube.plugin:CRDsPlugin"),
    ("builtin.kubernetes_root_cert", "mesh.control.kube.plugin:RootCertPlugin"),
    ("builtin.kubernetes_webhook_ca", "mesh.control.kube.plugin:WebhookCAPlugin"),
)

#: ``MESH_TRACE_HOOKS=1``: log every hook call (see :meth:`MeshPluginManager.trace_hooks`).
TRACE_HOOKS_ENV = "MESH_TRACE_HOOKS"


class PluginRegistrationError(Exception):
    """A plugin cannot be registered: it cannot be imported, it needs a newer plugin API, or registration
    is closed (after :meth:`MeshPluginManager.configure`).

    The message names the plugin and says what to do.
    """


def disabled_from_env() -> set:
    """The plugin names of ``MESH_DISABLE_PLUGINS`` (comma-separated)."""
    value = os.environ.get("MESH_DISABLE_PLUGINS", "")
    return {name.strip() for name in value.split(",") if name.strip()}


def hook_tracing_requested() -> bool:
    """Whether ``MESH_TRACE_HOOKS`` asks for every hook call to be logged."""
    return os.environ.get(TRACE_HOOKS_ENV, "") not in ("", "0")


class MeshPluginManager(pluggy.PluginManager):
    """pluggy's plugin manager with txmesh's lifecycle: registration closes at :meth:`configure`.

    ``idle`` maps the name of each plugin that said, in ``mesh_configure``,
    that it does nothing in this process to ``(plugin, reason)``; those
    plugins are unregistered then (see :meth:`mesh.api.Config.set_idle`).
    """

    def __init__(self) -> None:
        super().__init__("mesh")
        self.add_hookspecs(hookspecs)
        self.config: Config | None = None  # between configure and unconfigure
        self.closed = False  # registration, from configure on
        self.idle: dict[str, tuple[object, str]] = {}
        self._names: list[str] = []

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register ``plugin`` like pluggy does; refused after :meth:`configure`, or when the plugin's
        ``MESH_API_VERSION`` is newer than :data:`mesh.hookspecs.API_VERSION`."""
        label = name or self.get_canonical_name(plugin)
        if self.closed:
            raise PluginRegistrationError(
                f"plugin {label!r} registered after mesh_configure: the hook callers are built by then, so it "
                "would never be called; register it before (install it under the mesh.plugins entry point "
                "group, or add it to mesh.plugins.DEFAULT_PLUGINS)")
        wanted = getattr(plugin, "MESH_API_VERSION", None)
        if wanted is not None and (not isinstance(wanted, int) or wanted > hookspecs.API_VERSION):
            raise PluginRegistrationError(
                f"plugin {label!r} needs txmesh plugin API {wanted!r}, and this txmesh has plugin API "
                f"{hookspecs.API_VERSION}: upgrade txmesh, install a version of the plugin written for API "
                f"{hookspecs.API_VERSION}, or leave it out with --disable-plugin {label}")
        registered = super().register(plugin, name)
        if registered is not None:
            self._names.append(registered)
        return registered

    def load_entry_points(self) -> None:
        """Register the plugins of the ``mesh.plugins`` entry points not registered or blocked yet.

        :raises PluginRegistrationError: naming the first plugin that cannot be imported or registered.
        """
        try:
            self.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except PluginRegistrationError:
            raise
        except Exception as error:
            name = self._first_unloaded_entry_point()
            raise PluginRegistrationError(
                f"plugin {name!r} cannot be loaded ({type(error).__name__}: {error}): fix or reinstall it, or leave "
                f"it out with --disable-plugin {name}") from error

    def _first_unloaded_entry_point(self) -> str:
        """The entry point pluggy stopped at: the first of the group, in its order, neither registered nor blocked."""
        for dist in importlib.metadata.distributions():
            for entry in dist.entry_points:
                if entry.group == ENTRY_POINT_GROUP and not self.has_plugin(entry.name) \
                        and not self.is_blocked(entry.name):
                    return entry.name
        return "?"

    def plugin_names(self) -> list[str]:
        """The names of every plugin of this process, in registration order, idle ones included."""
        return [name for name in self._names if name in self.idle or self.get_plugin(name) is not None]

    def configure(self, config: Config) -> None:
        """Call ``mesh_configure(config)``, set idle plugins aside and close registration.

        :raises PluginError: naming the plugin whose ``mesh_configure`` raised.
        """
        fast_caller(self.hook.mesh_configure)(config=config)
        for name, reason in config.idle.items():
            plugin = self.get_plugin(name)
            if plugin is not None:
                self.idle[name] = (plugin, reason)
                self.unregister(plugin)  # still in plugin_names(), as idle
        self.config = config
        self.closed = True

    def unconfigure(self) -> None:
        """Call ``mesh_unconfigure`` once, for every plugin configured (idle ones left out): one that raises
        is logged (:data:`failures`) and the others are still called."""
        config, self.config = self.config, None
        if config is None:
            return
        for impl in reversed(self.hook.mesh_unconfigure.get_hookimpls()):
            try:
                _call_one(impl, config=config)
            except Exception as error:
                failures.report(impl.plugin_name, "mesh_unconfigure", error)

    def trace_hooks(self) -> None:
        """Log every hook call, its arguments and its result with twisted.logger (pluggy's tracing).

        :func:`fast_caller` then keeps pluggy's own callers, so that the hot
        path's calls are traced too.
        """
        def write(text: str) -> None:
            log.info("hook trace: {trace}", trace=text.rstrip("\n"))

        self.trace.root.setwriter(write)
        self.enable_tracing()


def _call_one(impl: pluggy.HookImpl, **kwargs: Any) -> Any:
    """Call one hook implementation with the arguments it names (a lifecycle hook, called plugin by plugin)."""
    return impl.function(*[kwargs[name] for name in impl.argnames])


def _load(spec: str) -> object:
    """The plugin a :data:`DEFAULT_PLUGINS` entry names: the module, or a new instance of ``module:Class``."""
    module_path, _, attribute = spec.partition(":")
    module = importlib.import_module(module_path)
    return getattr(module, attribute)() if attribute else module


def make_plugin_manager(disabled: Iterable[str] = (), load_entry_points: bool = True) -> MeshPluginManager:
    """Build the plugin manager with every enabled plugin registered: :data:`DEFAULT_PLUGINS`, then the
    ``mesh.plugins`` entry points.

    :param disabled: names of plugins not to register (built-in names such as
        ``builtin.balancing``, or entry-point names), on top of ``MESH_DISABLE_PLUGINS``.
    :param load_entry_points: load the ``mesh.plugins`` entry points.
    :raises PluginRegistrationError: when a plugin cannot be registered.
    """
    disabled = set(disabled) | disabled_from_env()
    pm = MeshPluginManager()
    if hook_tracing_requested():
        pm.trace_hooks()
    for name in disabled:
        pm.set_blocked(name)
    for name, spec in DEFAULT_PLUGINS:
        if name not in disabled:
            pm.register(_load(spec), name=name)
    if load_entry_points:
        pm.load_entry_points()
    return pm


def describe_plugins(pm: pluggy.PluginManager) -> list:
    """``[(name, distribution or "builtin", [hook names])]`` for ``meshctl plugins``, in registration order."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or ())
        dist = dists.get(id(plugin))
        origin = f"{dist.project_name} {dist.version}" if dist is not None else "builtin"
        rows.append((name, origin, hooks))
    return rows


# -- lifecycle: the plugins' command-line options -------------------------------------------
def disabled_in_argv(argv: Sequence[str]) -> set:
    """The names ``--disable-plugin NAME`` (or ``--disable-plugin=NAME``) gives in ``argv``.

    The plugins' options must be known before the command line is parsed, so
    the disabled plugins are picked out of it first (as pytest does for
    ``-p no:NAME``).
    """
    names = set()
    for index, arg in enumerate(argv):
        if arg == "--disable-plugin" and index + 1 < len(argv):
            names.add(argv[index + 1])
        elif arg.startswith("--disable-plugin="):
            names.add(arg.partition("=")[2])
    return names


def plugin_options(base: type, role: str, argv: Sequence[str] | None = None) -> usage.Options:
    """An instance of ``base`` (a twisted ``usage.Options`` class) extended with the options the plugins
    add in ``mesh_addoption``; its ``pluginmanager`` attribute is the process's plugin manager.

    ``base`` is subclassed with the plugins' ``optParameters``, since
    ``usage.Options`` gathers them from the class hierarchy.  A plugin that
    cannot be registered or whose ``mesh_addoption`` fails is a usage error
    naming it (twistd prints it under the usage, with no traceback).

    :param argv: the command line, to leave out the plugins it disables
        (default: ``sys.argv``).
    """
    disabled = disabled_in_argv(sys.argv if argv is None else argv)
    try:
        pm = make_plugin_manager(disabled)
    except PluginRegistrationError as error:
        raise usage.UsageError(str(error)) from None
    existing = {role: _option_names(base)}
    parser = OptionParser(existing)
    for impl in reversed(pm.hook.mesh_addoption.get_hookimpls()):
        parser.current_plugin = impl.plugin_name
        try:
            _call_one(impl, parser=parser)
        except ValueError as error:
            raise usage.UsageError(str(error)) from None
        except Exception as error:
            raise usage.UsageError(f"plugin {impl.plugin_name!r} failed in mesh_addoption: "
                                   f"{type(error).__name__}: {error}; fix it or leave it out with "
                                   f"--disable-plugin {impl.plugin_name}") from None
    extra = [[option.name, None, option.default, f"{option.help} (plugin {option.plugin})", option.coerce]
             for option in parser.for_role(role)]
    options_class = type(base.__name__, (base,), {"optParameters": extra, "__module__": base.__module__,
                                                  "__doc__": base.__doc__})
    options = options_class()
    options.pluginmanager = pm
    return options


def _option_names(options_class: type) -> set:
    """Every long option name of a ``usage.Options`` class (its parameters, flags and ``opt_`` methods)."""
    names: set = set()
    for attribute in ("optParameters", "optFlags"):
        collected: list = []
        for klass in reversed(options_class.__mro__):
            collected.extend(klass.__dict__.get(attribute, ()))
        names.update(entry[0] for entry in collected)
    names.update(name[4:].replace("_", "-") for name in dir(options_class) if name.startswith("opt_"))
    return names


def configure_or_exit(program: str, config: Config) -> None:
    """``mesh_configure`` every plugin of ``config.pluginmanager``; when one raises, exit with one line
    naming it (its traceback is in the log) and what to do."""
    try:
        config.pluginmanager.configure(config)
    except PluginError as error:
        cause = error.__cause__
        sys.stderr.write(f"{program}: {error}: {type(cause).__name__}: {cause} (the log has the traceback); "
                         f"fix the plugin or leave it out with --disable-plugin {error.plugin}\n")
        raise SystemExit(1) from None


def disable_after_parse(pm: MeshPluginManager, names: Iterable[str]) -> None:
    """Unregister and block ``names`` (``--disable-plugin`` values) the command-line pre-scan missed,
    e.g. when the options were parsed from a list in a test."""
    for name in names:
        plugin = pm.get_plugin(name)
        if plugin is not None:
            pm.unregister(plugin)
        pm.set_blocked(name)


class PluginError(Exception):
    """A plugin's implementation of a hook raised; what it raised is the ``__cause__``.

    Raised by the callers :func:`fast_caller` makes, once :data:`failures` has
    seen the exception.  ``plugin`` is the plugin's registered name (as
    ``meshctl plugins`` lists it) and ``hook`` the hook's name.
    """

    def __init__(self, plugin: str, hook: str):
        super().__init__(f"plugin {plugin!r} failed in {hook}")
        self.plugin = plugin
        self.hook = hook


class PluginFailures:
    """Logs each distinct plugin failure once, with its traceback, and counts the repeats.

    Two failures are the same when the plugin, the hook, the exception's type
    and the line that raised it are: a message often holds per-request values,
    so it is left out.  A repeat is logged as one line at its 10th, 100th,
    1000th... occurrence.  At most ``limit`` distinct failures are remembered;
    past that, new ones are only counted (``unlogged``), so a plugin that fails
    differently on every request cannot flood the log either.
    """

    def __init__(self, limit: int = 256):
        self.limit = limit
        self.counts: dict[tuple[str, str, str, str], int] = {}  # (plugin, hook, error type, "file:line") -> count
        self.unlogged = 0

    def report(self, plugin: str, hook: str, error: BaseException) -> None:
        """Count ``error``, raised by ``plugin`` in ``hook``; log it if it is new."""
        key = (plugin, hook, type(error).__qualname__, _raised_at(error))
        count = self.counts.get(key)
        if count is not None:
            self.counts[key] = count = count + 1
            if _is_power_of_ten(count):
                log.warn("plugin {plugin!r} still fails in {hook} ({error_type} at {where}): {count} times",
                         plugin=plugin, hook=hook, error_type=key[2], where=key[3], count=count)
        elif len(self.counts) < self.limit:
            self.counts[key] = 1
            log.failure("plugin {plugin!r} failed in {hook}: {error_type}: {error} (logged once; repeats are "
                        "counted)", failure=Failure(error), level=LogLevel.error, plugin=plugin, hook=hook,
                        error_type=key[2], error=error)
        else:
            self.unlogged += 1
            if self.unlogged == 1:
                log.error("more than {limit} distinct plugin failures: new ones are counted but no longer logged",
                          limit=self.limit)

    def describe(self) -> list:
        """``[{plugin, hook, error, where, count}]``, for ``/config_dump``."""
        return [{"plugin": plugin, "hook": hook, "error": error, "where": where, "count": count}
                for (plugin, hook, error, where), count in self.counts.items()]


#: The plugin failures of this process (one process is one sidecar).
failures = PluginFailures()


def _raised_at(error: BaseException) -> str:
    """``file:line`` of the innermost frame of ``error``'s traceback."""
    tb = error.__traceback__
    if tb is None:
        return "?"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"


def _is_power_of_ten(count: int) -> bool:
    while count % 10 == 0:
        count //= 10
    return count == 1


def _failed(plugin: str, hook: str, error: BaseException) -> PluginError:
    """Report ``error`` to :data:`failures`; the :class:`PluginError` to raise from it."""
    failures.report(plugin, hook, error)
    return PluginError(plugin, hook)


def fast_caller(caller: pluggy.HookCaller) -> Callable[..., Any]:
    """A callable equivalent to the pluggy hook caller ``caller``, for the hot path.

    pluggy's call machinery (argument lists, result collection, wrapper
    support) costs about a microsecond per call.  Once every plugin is
    registered, the implementations of a hook are fixed, so they can be
    called in pluggy's order directly: the result is the same for
    *firstresult* hooks (first non-None) and for collecting hooks (the list of
    non-None results).  A hook with wrappers keeps pluggy's own caller,
    wrapped, and so does every hook when ``MESH_TRACE_HOOKS`` asks for
    pluggy's tracing.  It takes exactly the hook's arguments, by keyword
    (pluggy's warns about a missing one; this one raises TypeError).

    Unlike pluggy's, the callable raises :class:`PluginError` (naming the
    plugin and the hook) when an implementation raises, after
    :data:`failures` has logged it.  A ``try`` costs nothing until something
    is raised (Python 3.11).
    """
    impls = caller.get_hookimpls()
    hook = caller.name
    if hook_tracing_requested() or any(impl.hookwrapper or impl.wrapper for impl in impls):
        return _guarded(caller, hook, impls)
    spec = caller.spec
    if spec is None:  # every mesh hook has a spec; a hook without one keeps pluggy's caller
        return _guarded(caller, hook, impls)
    return _compiled(hook, spec.argnames, bool(spec.opts.get("firstresult")), tuple(reversed(impls)))


def _guarded(caller: pluggy.HookCaller, hook: str, impls: Sequence[pluggy.HookImpl]) -> Callable[..., Any]:
    """pluggy's ``caller`` (a hook with wrappers), raising :class:`PluginError` as :func:`fast_caller`'s do."""

    def call(**kwargs: Any) -> Any:
        try:
            return caller(**kwargs)
        except Exception as error:
            raise _failed(_plugin_of(error, impls), hook, error) from error

    return call


def _plugin_of(error: BaseException, impls: Sequence[pluggy.HookImpl]) -> str:
    """The plugin in whose implementation ``error`` was raised: the innermost of their frames in its
    traceback (a wrapper that lets the exception through is further out)."""
    plugins = {getattr(impl.function, "__code__", None): impl.plugin_name for impl in impls}
    found = None
    tb = error.__traceback__
    while tb is not None:
        found = plugins.get(tb.tb_frame.f_code, found)
        tb = tb.tb_next
    return found or " or ".join(impl.plugin_name for impl in impls)


def _compiled(hook: str, argnames: Sequence[str], firstresult: bool,
              impls: Sequence[pluggy.HookImpl]) -> Callable[..., Any]:
    """The caller of :func:`fast_caller`: a function compiled for this hook's implementations.

    It takes the hook's arguments as keyword-only parameters and calls each
    implementation in turn with the ones it names, positionally, in a
    ``try`` of its own: no keyword dict, argument tuple or loop per call
    (5 % of a small request's instructions, with five hooks per
    request).  The source is made from the argument names alone (Python
    identifiers, checked by pluggy); the functions and plugin names are
    bound as the generated function's globals.
    """
    namespace: dict[str, Any] = {"_failed": _failed, "_hook": hook}
    name = "first_result" if firstresult else "all_results"
    lines = [f"def {name}({'*, ' if argnames else ''}{', '.join(argnames)}):"]
    if not firstresult:
        lines.append("    _results = []")
    for index, impl in enumerate(impls):
        namespace[f"_function{index}"] = impl.function
        namespace[f"_plugin{index}"] = impl.plugin_name
        lines += ["    try:",
                  f"        _result = _function{index}({', '.join(impl.argnames)})",
                  "    except Exception as _error:",
                  f"        raise _failed(_plugin{index}, _hook, _error) from _error",
                  "    if _result is not None:",
                  "        return _result" if firstresult else "        _results.append(_result)"]
    lines.append("    return None" if firstresult else "    return _results")
    exec(compile("\n".join(lines), f"<mesh hook {hook}>", "exec"), namespace)
    return namespace[name]
