"""docs/cli.md documents every meshctl command: a section ``## meshctl NAME`` with an example that runs it."""

from __future__ import annotations

import re
from pathlib import Path

from mesh.cli.main import build_parser

PAGE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def commands() -> list[str]:
    parser = build_parser()
    (subparsers,) = [action for action in parser._actions if action.dest == "command"]
    return sorted(subparsers.choices)


def test_every_command_has_a_section_with_an_example():
    text = PAGE.read_text()
    sections = dict(re.findall(r"^## meshctl (\S+)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    missing = [name for name in commands() if name not in sections]
    assert not missing, f"docs/cli.md has no section for: {missing}"
    without_example = [name for name in commands() if f"$ meshctl {name}" not in sections[name]
                       and not re.search(rf"\$ .*meshctl {name}\b", sections[name])]
    assert not without_example, f"docs/cli.md shows no example of: {without_example}"
    assert not set(sections) - set(commands()), "docs/cli.md documents a command meshctl does not have"
