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

from mesh import hookspecs

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


def fast_caller(caller):
    """A callable equivalent to the pluggy hook caller ``caller``, for the hot path.

    pluggy's call machinery (argument lists, result collection, wrapper
    support) costs about a microsecond per call.  Once every plugin is
    registered, the implementations of a hook are fixed, so they can be
    called in pluggy's order directly: the result is the same for
    *firstresult* hooks (first non-None) and for collecting hooks (the list of
    non-None results).  A hook with wrappers keeps pluggy's own caller.
    """
    impls = caller.get_hookimpls()
    if any(impl.hookwrapper or impl.wrapper for impl in impls):
        return caller
    calls = tuple((impl.function, _positional(impl.argnames)) for impl in reversed(impls))
    if caller.spec.opts.get("firstresult"):
        if len(calls) == 1:
            (function, arguments), = calls
            return lambda **kwargs: function(*arguments(kwargs))

        def first_result(**kwargs):
            for function, arguments in calls:
                result = function(*arguments(kwargs))
                if result is not None:
                    return result
            return None

        return first_result

    def all_results(**kwargs):
        results = []
        for function, arguments in calls:
            result = function(*arguments(kwargs))
            if result is not None:
                results.append(result)
        return results

    return all_results


def _positional(names):
    """``kwargs -> tuple`` of the values of ``names``, in order (itemgetter is C)."""
    if len(names) == 1:
        name, = names
        return lambda kwargs: (kwargs[name],)
    return operator.itemgetter(*names)
