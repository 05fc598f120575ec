"""The plugin manager: built-in plugins first, then entry points.

Built-in behaviour (routing, balancing, retries, ...) lives in
:mod:`mesh.builtin` and is registered here exactly like a third-party plugin.
Third-party plugins are found under the ``mesh.plugins`` entry-point group;
since pluggy calls later registrations first, they can override built-ins.

Any plugin can be disabled by name (``--disable-plugin NAME`` on the command
line, or the ``MESH_DISABLE_PLUGINS`` environment variable, comma-separated).
"""

from __future__ import annotations

import importlib
import operator
import os

import pluggy
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mesh import hookspecs

log = Logger()

ENTRY_POINT_GROUP = "mesh.plugins"

#: name -> module path of the built-in plugins, in registration order.
BUILTIN_PLUGINS = (
    ("builtin.routing", "mesh.builtin.routing"),
    ("builtin.balancing", "mesh.builtin.balancing"),
    ("builtin.retry", "mesh.builtin.retry"),
    ("builtin.authz", "mesh.builtin.authz"),
)

def disabled_from_env() -> set:
    value = os.environ.get("MESH_DISABLE_PLUGINS", "")
    return {name.strip() for name in value.split(",") if name.strip()}


def make_plugin_manager(disabled=(), load_entry_points=True) -> pluggy.PluginManager:
    """Build the plugin manager with every enabled plugin registered.

    :param disabled: names of plugins not to register (built-in names such as
        ``builtin.balancing``, or entry-point names).
    :param load_entry_points: load the ``mesh.plugins`` entry points.
    """
    disabled = set(disabled) | disabled_from_env()
    pm = pluggy.PluginManager("mesh")
    pm.add_hookspecs(hookspecs)
    for name, module_path in BUILTIN_PLUGINS:
        if name not in disabled:
            pm.register(importlib.import_module(module_path), name=name)
    if load_entry_points:
        for name in disabled:
            pm.set_blocked(name)
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


def describe_plugins(pm: pluggy.PluginManager) -> list:
    """``[(name, distribution or "builtin", [hook names])]`` for ``meshctl plugins``."""
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
        self.counts = {}  # (plugin, hook, exception type, "file:line") -> occurrences
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


def fast_caller(caller):
    """A callable equivalent to the pluggy hook caller ``caller``, for the hot path.

    pluggy's call machinery (argument lists, result collection, wrapper
    support) costs about a microsecond per call.  Once every plugin is
    registered, the implementations of a hook are fixed, so they can be
    called in pluggy's order directly: the result is the same for
    *firstresult* hooks (first non-None) and for collecting hooks (the list of
    non-None results).  A hook with wrappers keeps pluggy's own caller,
    wrapped.

    Unlike pluggy's, the callable raises :class:`PluginError` (naming the
    plugin and the hook) when an implementation raises, after
    :data:`failures` has logged it.  A ``try`` costs nothing until something
    is raised (Python 3.11).
    """
    impls = caller.get_hookimpls()
    hook = caller.name
    if any(impl.hookwrapper or impl.wrapper for impl in impls):
        return _guarded(caller, hook, impls)
    calls = tuple((impl.function, _positional(impl.argnames), impl.plugin_name) for impl in reversed(impls))
    if caller.spec.opts.get("firstresult"):
        if len(calls) == 1:
            (function, arguments, plugin), = calls

            def only_one(**kwargs):
                try:
                    return function(*arguments(kwargs))
                except Exception as error:
                    raise _failed(plugin, hook, error) from error

            return only_one

        def first_result(**kwargs):
            for function, arguments, plugin in calls:
                try:
                    result = function(*arguments(kwargs))
                except Exception as error:
                    raise _failed(plugin, hook, error) from error
                if result is not None:
                    return result
            return None

        return first_result

    def all_results(**kwargs):
        results = []
        for function, arguments, plugin in calls:
            try:
                result = function(*arguments(kwargs))
            except Exception as error:
                raise _failed(plugin, hook, error) from error
            if result is not None:
                results.append(result)
        return results

    return all_results


def _guarded(caller, hook, impls):
    """pluggy's ``caller`` (a hook with wrappers), raising :class:`PluginError` as :func:`fast_caller`'s do."""

    def call(**kwargs):
        try:
            return caller(**kwargs)
        except Exception as error:
            raise _failed(_plugin_of(error, impls), hook, error) from error

    return call


def _plugin_of(error: BaseException, impls) -> str:
    """The plugin in whose implementation ``error`` was raised: the innermost of their frames in its
    traceback (a wrapper that lets the exception through is further out)."""
    plugins = {getattr(impl.function, "__code__", None): impl.plugin_name for impl in impls}
    found = None
    tb = error.__traceback__
    while tb is not None:
        found = plugins.get(tb.tb_frame.f_code, found)
        tb = tb.tb_next
    return found or " or ".join(impl.plugin_name for impl in impls)


def _positional(names):
    """``kwargs -> tuple`` of the values of ``names``, in order (itemgetter is C)."""
    if len(names) == 1:
        name, = names
        return lambda kwargs: (kwargs[name],)
    return operator.itemgetter(*names)
