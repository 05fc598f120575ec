"""``meshctl plugins``: list loaded plugins and the hooks each implements."""

from __future__ import annotations

import sys

from mesh.plugins import PluginRegistrationError, describe_plugins, make_plugin_manager


def add_parser(subparsers):
    parser = subparsers.add_parser("plugins", help="list loaded plugins and their hooks")
    parser.add_argument("--disable-plugin", action="append", default=[], metavar="NAME",
                        help="leave this plugin out, as mesh-proxy would")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Print one line per plugin: name, origin, hooks; exit 1 with the reason when a plugin cannot load."""
    try:
        rows = describe_plugins(make_plugin_manager(args.disable_plugin))
    except PluginRegistrationError as error:
        print(f"meshctl plugins: {error}", file=sys.stderr)
        return 1
    width = max(len(name) for name, _, _ in rows)
    origin_width = max(len(origin) for _, origin, _ in rows)
    for name, origin, hooks in rows:
        print(f"{name:<{width}}  {origin:<{origin_width}}  {', '.join(hooks)}")
    return 0
