"""Label and field selectors of the test Kubernetes API server, parsed like the real API server parses them.

Label selectors: ``a=b``, ``a==b``, ``a!=b``, ``a`` (exists), ``!a`` (does not exist),
``a in (x,y)``, ``a notin (x,y)``, joined by commas. Field selectors: ``metadata.name``
and ``metadata.namespace`` with ``=``, ``==`` or ``!=`` (the only fields every resource supports).
A selector that does not parse raises :class:`SelectorError` with the real server's wording.
"""

from __future__ import annotations

import re

#: Fields every resource can be selected by (the real server adds a few per resource; txmesh uses none of those).
FIELDS = {"metadata.name": ("metadata", "name"), "metadata.namespace": ("metadata", "namespace")}

_SET_TERM = re.compile(r"^\s*(?P<key>[^\s!=,()]+)\s+(?P<op>in|notin)\s+\((?P<values>[^()]*)\)\s*$")
_EQ_TERM = re.compile(r"^\s*(?P<key>[^\s!=,()]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=,()]*)\s*$")
_EXISTS_TERM = re.compile(r"^\s*(?P<neg>!?)\s*(?P<key>[^\s!=,()]+)\s*$")


class SelectorError(ValueError):
    """A label or field selector that does not parse; the message says which term and why."""


def _split_terms(text: str) -> list[str]:
    """Split on the commas that are not inside ``(...)``."""
    terms, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(text[start:index])
            start = index + 1
    terms.append(text[start:])
    return [term for term in terms if term.strip()]


def _label_term(term: str):
    """One requirement as a predicate over a labels dict."""
    if match := _SET_TERM.match(term):
        values = {value.strip() for value in match["values"].split(",") if value.strip()}
        key, wanted = match["key"], match["op"] == "in"
        return lambda labels: (labels.get(key) in values) == wanted if key in labels else not wanted
    if match := _EQ_TERM.match(term):
        key, value, equal = match["key"], match["value"], match["op"] != "!="
        return lambda labels: (labels.get(key) == value) == equal
    if match := _EXISTS_TERM.match(term):
        key, present = match["key"], not match["neg"]
        return lambda labels: (key in labels) == present
    raise SelectorError(f"unable to parse requirement: {term.strip()!r}: use key=value, key!=value, key, !key, "
                        "key in (a,b) or key notin (a,b), joined by commas")


def label_selector(text: str | None):
    """A predicate over an object's ``metadata.labels`` (always true for an empty selector)."""
    requirements = [_label_term(term) for term in _split_terms(text or "")]
    return lambda labels: all(requirement(labels or {}) for requirement in requirements)


def field_selector(text: str | None):
    """A predicate over a whole object for a ``metadata.name``/``metadata.namespace`` field selector."""
    requirements = []
    for term in _split_terms(text or ""):
        match = _EQ_TERM.match(term)
        if not match:
            raise SelectorError(f"invalid selector: {term.strip()!r}; the field selector must be FIELD=VALUE or "
                                "FIELD!=VALUE, joined by commas")
        if match["key"] not in FIELDS:
            raise SelectorError(f'field label not supported: {match["key"]} (this server supports '
                                f"{', '.join(sorted(FIELDS))})")
        section, name = FIELDS[match["key"]]
        value, equal = match["value"], match["op"] != "!="
        requirements.append(lambda obj, s=section, n=name, v=value, e=equal: (obj.get(s, {}).get(n, "") == v) == e)
    return lambda obj: all(requirement(obj) for requirement in requirements)


def selector(label_text: str | None, field_text: str | None):
    """A predicate over a whole object that both selectors accept."""
    labels, fields = label_selector(label_text), field_selector(field_text)
    return lambda obj: labels(obj.get("metadata", {}).get("labels")) and fields(obj)
