"""``meshctl``: the txmesh command line.

Each sub-command lives in its own module under :mod:`mesh.cli` and exposes
``add_parser(subparsers)``; the parser's ``func(args) -> int`` runs it.
"""

from __future__ import annotations

import argparse
import os
import sys

from mesh import __version__
from mesh.cli import (
    analyze,
    apply,
    bug_report,
    check,
    demo,
    describe,
    inject,
    iptables,
    plugins,
    proxy_config,
    proxy_status,
    run,
    stat,
    tap,
    token,
    top,
    up,
    validate,
    version,
    why,
)

COMMANDS = (plugins, validate, apply, analyze, proxy_status, proxy_config, describe, stat, top, tap, why, version,
            token, demo, up, run, check, bug_report, iptables, inject)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshctl", description="Operate a txmesh service mesh.")
    parser.add_argument("--version", action="version", version=f"txmesh {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except BrokenPipeError:
        # the reader of our output left (meshctl tap | head): stop quietly; stdout now goes to /dev/null so
        # that the flush at exit cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
