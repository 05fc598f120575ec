"""Config problems that name a file, a line, a resource, a field and a reason.

Every problem a user sees prints as ``FILE:LINE: Kind/namespace/name: field:
reason`` (YAML syntax problems, which belong to no resource yet, as
``FILE:LINE: yaml: reason``).  Field paths are written the way a reader finds
them in the YAML: ``spec.http[0].route[1].weight``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def format_path(path: tuple) -> str:
    """``("spec", "http", 0, "route")`` -> ``"spec.http[0].route"``.

    Map keys that are not plain identifiers (label keys, header names with
    dots) are quoted: ``spec.subsets[0].labels["app.kubernetes.io/name"]``.
    """
    out = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _PLAIN_KEY.match(part):
            out.append(f".{part}" if out else part)
        else:
            out.append(f'["{part}"]')
    return "".join(out)


def unknown_field(key, supported) -> str:
    """The reason for an unknown field, with the closest supported name if any."""
    names = sorted(supported)
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown field '{key}'{hint}; supported: {', '.join(names)}"


@dataclass(frozen=True)
class ConfigError:
    """One problem in the configuration.

    ``kind`` is None for problems found before a document could be read as a
    resource (YAML syntax, a document that is not a mapping).  ``field`` is a
    path as printed by :func:`format_path`.  This is a value, not an
    exception: raise :class:`ConfigErrors` to report problems.
    """

    file: str
    line: int
    reason: str
    kind: str | None = None
    namespace: str | None = None
    name: str | None = None
    field: str = ""

    def __str__(self) -> str:
        if self.kind is None:
            return f"{self.file}:{self.line}: yaml: {self.reason}"
        return f"{self.file}:{self.line}: {self.kind}/{self.namespace}/{self.name}: {self.field}: {self.reason}"


class ConfigWarning(ConfigError):
    """A problem that does not make the config invalid (``meshctl analyze``).

    For example a route to a host that no ServiceEntry defines: it compiles,
    and the proxy answers 503 for it until the host exists.
    """


class ConfigErrors(Exception):
    """The configuration is invalid; ``errors`` lists every problem found."""

    def __init__(self, errors):
        self.errors = sorted(errors, key=lambda error: (error.file, error.line))
        super().__init__("\n".join(str(error) for error in self.errors))


class LineMap:
    """Line numbers of the keys and items of one YAML document, by field path.

    ``line_of(path)`` answers the line of the nearest enclosing field that is
    in the document, so a missing required field is reported at its parent.
    """

    __slots__ = ("_lines", "first")

    def __init__(self, lines: dict, first: int):
        self._lines = lines
        self.first = first

    def line_of(self, path: tuple) -> int:
        lines = self._lines
        while path:
            line = lines.get(path)
            if line is not None:
                return line
            path = path[:-1]
        return self.first
