"""Typed, checked reading of one YAML mapping, with every problem recorded.

:class:`Fields` wraps a mapping of a resource (``spec``, ``spec.http[0]`` ...)
together with its field path.  Creating it reports unknown and unsupported
keys; its getters check types and ranges and report problems instead of
raising, so that one pass over a resource finds all of its problems.  A getter
returns None (or the default) for a missing or invalid value.
"""

from __future__ import annotations

import re
from decimal import Decimal

from mesh.config.errors import unknown_field

_DURATION = re.compile(r"(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+\Z")
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NANOS = {"ns": 1, "us": 10 ** 3, "µs": 10 ** 3, "μs": 10 ** 3, "ms": 10 ** 6, "s": 10 ** 9,
          "m": 60 * 10 ** 9, "h": 3600 * 10 ** 9}
_LABEL_NAME = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                         r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?\Z")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?\Z")
_DURATION_HINT = 'use a number and a unit, like "1s", "0.5s", "100ms", "1m" or "1h"'


def parse_duration(value, zero: bool = False) -> float:
    """Parse an Istio (protobuf/Go) duration string into seconds.

    Accepts ``"1s"``, ``"0.5s"``, ``"100ms"``, ``"1m"``, ``"1h30m"``...; like
    Istio, requires at least 1ms (or exactly 0 where ``zero`` allows it, for
    fields where 0 turns a timeout off) and millisecond precision.  Raises
    :class:`ValueError` with the reason.
    """
    if not isinstance(value, str) or not _DURATION.match(value):
        shown = f"'{value}'" if isinstance(value, str) else f"{value!r} (a number without a unit)"
        raise ValueError(f"invalid duration {shown}; {_DURATION_HINT}")
    nanos = sum(Decimal(number) * _NANOS[unit] for number, unit in _DURATION_PART.findall(value))
    if nanos < 10 ** 6 and not (zero and nanos == 0):
        raise ValueError(f"duration '{value}' is too short; it must be at least 1ms")
    if nanos % 10 ** 6:
        raise ValueError(f"duration '{value}' is finer than a millisecond; only millisecond precision "
                         "is supported")
    return float(nanos / 10 ** 9)


def label_problem(key, value) -> str | None:
    """Why ``key: value`` is not a valid Kubernetes label, or None."""
    if not isinstance(key, str) or len(key) > 316 or not _LABEL_NAME.match(key):
        return f"invalid label name {key!r}: use [prefix/]name with letters, digits, '-', '_' and '.'"
    if not isinstance(value, str):
        return f"label values must be strings; quote {value!r}"
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        return f"invalid label value {value!r}: at most 63 letters, digits, '-', '_' and '.'"
    return None


def _type_name(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


class Report:
    """The problems of one resource, as ``(path, reason)`` pairs."""

    def __init__(self):
        self.problems = []

    def add(self, path: tuple, reason: str) -> None:
        self.problems.append((path, reason))


class Fields:
    """Checked access to one mapping at ``path`` of a resource.

    ``supported`` names the keys txmesh reads; ``unsupported`` maps keys that
    Istio knows but txmesh does not implement to what the user should do.  Any
    other key is reported as unknown.  A null value counts as an empty mapping.
    """

    __slots__ = ("report", "path", "data")

    def __init__(self, report: Report, path: tuple, value, supported, unsupported=None):
        self.report = report
        self.path = path
        if value is None:
            value = {}
        elif not isinstance(value, dict):
            report.add(path, f"must be a mapping, not {_type_name(value)}")
            value = {}
        unsupported = unsupported or {}
        for key in value:
            if key in supported:
                continue
            if key in unsupported:
                report.add(path + (key,), f"'{key}' is not supported by txmesh; {unsupported[key]}")
            else:
                report.add(path + (key,), unknown_field(key, supported))
        self.data = {key: item for key, item in value.items() if key in supported}

    def __contains__(self, key) -> bool:
        return key in self.data

    def error(self, key, reason: str) -> None:
        """Report a problem with field ``key`` (None: with this mapping itself)."""
        self.report.add(self.path if key is None else self.path + (key,), reason)

    def sub(self, key, supported, unsupported=None) -> Fields:
        """The mapping under ``key`` (empty if absent)."""
        return Fields(self.report, self.path + (key,), self.data.get(key), supported, unsupported)

    def _typed(self, key, types, what, required):
        value = self.data.get(key)
        if value is None:
            if required:
                self.error(key, f"'{key}' is required")
            return None
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            hint = "; quote it" if str in types and isinstance(value, (int, float)) else ""
            self.error(key, f"must be {what}, not {_type_name(value)}{hint}")
            return None
        return value

    def string(self, key, required=False) -> str | None:
        """A string; an empty string counts as missing when ``required``."""
        value = self._typed(key, (str,), "a string", required)
        if value == "" and required:
            self.error(key, f"'{key}' must not be empty")
            return None
        return value

    def boolean(self, key) -> bool:
        return bool(self._typed(key, (bool,), "true or false", False))

    def integer(self, key, minimum=None, maximum=None, required=False) -> int | None:
        value = self._typed(key, (int,), "an integer", required)
        if value is not None and ((minimum is not None and value < minimum)
                                  or (maximum is not None and value > maximum)):
            low = "" if minimum is None else f" >= {minimum}"
            high = "" if maximum is None else f" <= {maximum}"
            self.error(key, f"must be{low}{' and' if low and high else ''}{high}, not {value}")
            return None
        return value

    def port(self, key, required=False) -> int | None:
        return self.integer(key, minimum=1, maximum=65535, required=required)

    def duration(self, key, zero: bool = False) -> float | None:
        """A duration in seconds (see :func:`parse_duration`; ``zero``: "0s" is allowed too)."""
        value = self.data.get(key)
        if value is None:
            return None
        try:
            return parse_duration(value, zero)
        except ValueError as error:
            self.error(key, str(error))
            return None

    def enum(self, key, allowed, rejected=None, default=None) -> str | None:
        """One of ``allowed`` (a dict maps spellings to results); ``rejected`` maps values to advice."""
        value = self._typed(key, (str,), "a string", False)
        if value is None:
            return default
        if value in allowed:
            return allowed[value] if isinstance(allowed, dict) else value
        if rejected and value in rejected:
            self.error(key, f"{key} {value} is not supported by txmesh; {rejected[value]}")
        else:
            self.error(key, f"invalid {key} '{value}'; use one of: {', '.join(allowed)}")
        return default

    def items(self, key, required=False) -> list:
        """``[(path, item), ...]`` of the list under ``key``."""
        value = self._typed(key, (list,), "a list", required)
        if required and value == []:
            self.error(key, f"'{key}' must not be empty")
        return [(self.path + (key, index), item) for index, item in enumerate(value or ())]

    def strings(self, key, required=False) -> list:
        """``[(path, string), ...]``: the list under ``key``, non-strings reported."""
        out = []
        for path, item in self.items(key, required):
            if isinstance(item, str) and item:
                out.append((path, item))
            else:
                self.report.add(path, f"must be a non-empty string, not {_type_name(item)}")
        return out

    def mapping(self, key) -> dict:
        """The mapping under ``key`` as a dict (keys are strings); {} if absent."""
        value = self._typed(key, (dict,), "a mapping", False) or {}
        for name in value:
            if not isinstance(name, str):
                self.error(key, f"keys must be strings; quote {name!r}")
        return {name: item for name, item in value.items() if isinstance(name, str)}

    def labels(self, key) -> tuple:
        """Kubernetes labels as sorted ``(key, value)`` pairs."""
        value = self.mapping(key)
        for name, item in value.items():
            problem = label_problem(name, item)
            if problem:
                self.report.add(self.path + (key, name), problem)
        return tuple(sorted((name, item) for name, item in value.items() if isinstance(item, str)))
