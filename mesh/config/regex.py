"""Istio's regexes, run by RE2 as Envoy runs them: StringMatch ``regex`` (uri, method, authority,
headers, queryParams, CORS ``allowOrigins``) and ``rewrite.uriRegexRewrite``.

Istio's regex syntax is RE2's (https://github.com/google/re2/wiki/Syntax), and Envoy runs the C++ RE2
library with its default options (``RE2::Quiet``).  This module compiles with that same library (the
``google-re2`` binding), so ``[[:digit:]]``, ``a{,2}`` (a literal), ASCII-only ``\\d``/``\\w``/``\\s``,
``(?U)`` (ungreedy), ``\\pN`` and the rest mean what they mean in Istio, and what RE2 rejects
(lookaround, backreferences, ...) is rejected with RE2's own message.

Envoy matches the bytes of a request as received, and RE2 reads them as UTF-8; txmesh holds them as
``str`` decoded as Latin-1 (one character per byte), so a value is encoded back to those bytes before it
is matched: a header ``é`` sent as UTF-8 matches the regex ``é`` and ``.``, as in Envoy.

The calls go to the binding's compiled object (``re2._re2.RE2``) and not through its ``re``-like
wrapper: the wrapper costs about ten times more per match (a generator, offset maps, a match object),
and a route table tests its regexes on every request.  Everything is compiled once, with the config.
The binding is imported with the first regex (:func:`_engine`): it adds about 2.4 MiB to a process,
which a sidecar whose routes have no regex does not need.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace

__all__ = ["RegexError", "compile_re2", "full_matcher", "global_replace", "group_count", "group_names", "subject"]

_NO_MATCH = (-1, -1)


class RegexError(ValueError):
    """A regex RE2 does not compile; ``str(error)`` is RE2's message."""


@functools.cache
def _engine() -> SimpleNamespace:
    """The RE2 binding, imported on first use: its compiled-object class (``RE2``), the options of a
    regex with and without capturing groups, and the anchors used here (``both``, ``unanchored``)."""
    import re2
    from re2 import _re2

    def options(capture: bool):
        """Envoy's ``RE2::Quiet``: RE2's defaults (UTF-8, Perl classes, 8 MiB max_mem), no error log."""
        chosen = re2.Options()
        chosen.log_errors = False
        chosen.never_capture = not capture
        return chosen

    return SimpleNamespace(RE2=_re2.RE2, capture=options(True), no_capture=options(False),
                           both=_re2.RE2.Anchor.ANCHOR_BOTH, unanchored=_re2.RE2.Anchor.UNANCHORED)


def compile_re2(pattern: str, capture: bool = True):
    """``pattern`` compiled by RE2 (a ``re2._re2.RE2``); raises :class:`RegexError` with RE2's message.

    ``capture=False`` compiles without capturing groups, for a test that only asks whether it matches
    (RE2 can then answer from its DFA).
    """
    try:
        encoded = pattern.encode("utf-8")
    except UnicodeEncodeError:
        raise RegexError("invalid UTF-8") from None
    engine = _engine()
    regexp = engine.RE2(encoded, engine.capture if capture else engine.no_capture)
    if not regexp.ok():
        raise RegexError(regexp.error().decode("utf-8", "replace"))
    return regexp


def group_count(regexp) -> int:
    """The number of capturing groups of a compiled regex."""
    return regexp.NumberOfCapturingGroups()


def group_names(regexp) -> list:
    """The names of the named groups of a compiled regex (``str``)."""
    return [name.decode("utf-8", "replace") for name, _ in regexp.NamedCapturingGroups()]


def subject(value: str) -> bytes:
    """The bytes RE2 matches for ``value``: the bytes it was decoded from (Latin-1), or, for a ``str``
    that cannot have come off the wire (a character above U+00FF), its UTF-8."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def full_matcher(pattern: str) -> Callable[[str | None], bool]:
    """``value -> bool``: whether RE2's ``FullMatch`` (Envoy's test) matches ``value``; None (absent)
    never matches.  ``pattern`` must compile (validation checked it)."""
    match, both = compile_re2(pattern, capture=False).Match, _engine().both

    def matches(value: str | None) -> bool:
        if value is None:
            return False
        try:
            data = value.encode("latin-1")
        except UnicodeEncodeError:
            data = value.encode("utf-8", "surrogatepass")
        return match(both, data, 0, len(data))[0] != _NO_MATCH
    return matches


def global_replace(regexp, parts: tuple, text: str) -> str:
    """RE2's ``GlobalReplace`` (Envoy's ``regex_rewrite``) of ``text``: every non-overlapping match of
    ``regexp`` replaced by ``parts`` (bytes literals and group numbers, ``0`` the whole match; a group
    that did not take part is empty).  As in RE2, an empty match right where the previous match ended
    is skipped, stepping on by one UTF-8 character.  ``text`` is returned as is when nothing matched.
    """
    data = subject(text)
    match, end_of_data, unanchored = regexp.Match, len(data), _engine().unanchored
    out, position, last_end, count = [], 0, -1, 0
    while position <= end_of_data:
        spans = match(unanchored, data, position, end_of_data)
        start, end = spans[0]
        if start < 0:
            break
        out.append(data[position:start])
        if start == end == last_end:  # no empty match where the previous one ended: step on
            step = _char_length(data, start)
            out.append(data[start:start + step])
            position = start + step
            continue
        for part in parts:
            if isinstance(part, bytes):
                out.append(part)
            else:
                group_start, group_end = spans[part]
                if group_start >= 0:
                    out.append(data[group_start:group_end])
        position = last_end = end
        count += 1
    if count == 0:
        return text
    out.append(data[position:])
    return b"".join(out).decode("latin-1")


def _char_length(data: bytes, index: int) -> int:
    """The length of the UTF-8 character at ``data[index]``, 1 if it is not one (RE2's ``chartorune``)."""
    lead = data[index] if index < len(data) else 0
    length = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 else 1
    if length > 1:
        try:
            data[index:index + length].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return 1
    return length
