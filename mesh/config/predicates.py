"""Compiling VirtualService ``match`` lists into per-request predicates.

A predicate is a closure ``ctx -> bool`` over a
:class:`mesh.proxy.context.RequestContext`, built once per config: values are
bound as closure variables and regexes are compiled ahead, so a request costs
a few attribute reads, ``==``/``startswith`` and precompiled RE2 full matches.

Semantics follow Istio (and Envoy under it):

- ``uri`` exact and regex test the path without the query string; prefix tests
  the request target as received (Envoy's ``prefix``).  ``ignoreUriCase``
  applies to exact and prefix only.
- Regexes are RE2's, compiled and run by RE2 as Envoy does
  (:mod:`mesh.config.regex`), and are full matches (anchored at both ends).
- ``headers`` see repeated headers joined with ``", "``; a ``{}`` value only
  requires the header to be present.  ``withoutHeaders`` matches when the
  header condition does not hold; an absent header is tested as ``""`` (Istio
  sets Envoy's ``treat_missing_header_as_empty``), except for ``{}``.
- ``queryParams`` test the first value of a parameter, not URL-decoded;
  ``?key`` has the value ``""``.
- ``port`` is the port the request was sent to
  (:meth:`~mesh.proxy.context.RequestContext.request_port`: the captured
  original destination's, else the Host header's, else 80).  ``sourceLabels``
  and ``sourceNamespace`` are not here: the compiler keeps or drops a match
  for the proxy's own workload.
"""

from __future__ import annotations

from collections.abc import Callable

from mesh.config.regex import full_matcher


def compile_match(match) -> tuple:
    """``(predicate or None, text)`` for one :class:`~mesh.config.resources.HTTPMatch`.

    The predicate is the AND of the match's conditions; None means the match
    accepts every request.  ``text`` describes the match for ``/config_dump``.
    """
    tests = []
    if match.uri is not None:
        tests.append(_uri(match.uri, match.ignore_uri_case))
    if match.method is not None:
        tests.append(_attribute("method", match.method, lambda ctx: ctx.method))
    if match.authority is not None:
        tests.append(_attribute("authority", match.authority, lambda ctx: ctx.authority.decode("latin-1")))
    for name, string_match in match.headers:
        tests.append(_header(name, string_match))
    for name, string_match in match.without_headers:
        tests.append(_without_header(name, string_match))
    for name, string_match in match.query_params:
        tests.append(_query(name, string_match))
    if match.port is not None:
        tests.append(_port(match.port))
    if not tests:
        return None, "*"
    return _combine([test for test, _ in tests], stop_on=False), " && ".join(text for _, text in tests)


def compile_matches(matches) -> tuple:
    """``(predicate or None, text)`` for a whole ``match`` list: the OR of its entries."""
    compiled = [compile_match(match) for match in matches]
    if not compiled or any(test is None for test, _ in compiled):
        return None, "*"
    if len(compiled) == 1:
        return compiled[0]
    return (_combine([test for test, _ in compiled], stop_on=True),
            " || ".join(f"({text})" for _, text in compiled))


def _combine(tests, stop_on: bool) -> Callable:
    """AND (``stop_on=False``) or OR (``stop_on=True``) of predicates, short-circuiting."""
    if len(tests) == 1:
        return tests[0]
    tests = tuple(tests)

    def combined(ctx) -> bool:
        for test in tests:
            if test(ctx) is stop_on:
                return stop_on
        return not stop_on
    return combined


def _negate(test: Callable) -> Callable:
    return lambda ctx: not test(ctx)


def _describe(what: str, string_match) -> str:
    if string_match.kind == "present":
        return f"{what} present"
    return f"{what} {string_match.kind} {string_match.value!r}"


def value_test(string_match) -> Callable[[str | None], bool]:
    """``value -> bool`` for a StringMatch; None (absent) never matches."""
    kind, expected = string_match.kind, string_match.value
    if kind == "present":
        return lambda value: value is not None
    if kind == "exact":
        return lambda value: value == expected
    if kind == "prefix":
        return lambda value: value is not None and value.startswith(expected)
    return full_matcher(expected)


def _uri(string_match, ignore_case: bool) -> tuple:
    kind, expected = string_match.kind, string_match.value
    text = _describe("uri", string_match) + (" (ignore case)" if ignore_case else "")
    if kind == "regex":
        matches = full_matcher(expected)
        return (lambda ctx: matches(ctx.uri_path)), text
    if not ignore_case:
        if kind == "exact":
            return (lambda ctx: ctx.uri_path == expected), text
        return (lambda ctx: ctx.path.startswith(expected)), text
    expected = expected.lower()
    if kind == "exact":
        return (lambda ctx: ctx.uri_path.lower() == expected), text
    length = len(expected)
    return (lambda ctx: ctx.path[:length].lower() == expected), text


def _attribute(what: str, string_match, read: Callable) -> tuple:
    test = value_test(string_match)
    return (lambda ctx: test(read(ctx))), _describe(what, string_match)


def _header(name: str, string_match) -> tuple:
    text = _describe(f"header {name}", string_match)
    if string_match.kind == "present":
        return (lambda ctx: name in ctx.headers), text
    if string_match.kind == "exact":
        expected = string_match.value
        return (lambda ctx: ctx.headers.get(name) == expected), text
    test = value_test(string_match)
    return (lambda ctx: test(ctx.headers.get(name))), text


def _port(port: int) -> tuple:
    return (lambda ctx: ctx.request_port() == port), f"port {port}"


def _without_header(name: str, string_match) -> tuple:
    """Istio's ``withoutHeaders``: Envoy's inverted header match with ``treat_missing_header_as_empty``
    (a ``{}`` condition: plain inverted presence)."""
    if string_match.kind == "present":
        test, text = _header(name, string_match)
        return _negate(test), f"without {text}"
    test = value_test(string_match)
    return (lambda ctx: not test(ctx.headers.get(name, ""))), "without " + _describe(f"header {name}", string_match)


def _query(name: str, string_match) -> tuple:
    test = value_test(string_match)
    prefix = name + "="

    def query_test(ctx) -> bool:
        query = ctx.path.partition("?")[2]
        if not query:
            return test(None)
        for part in query.split("&"):
            if part == name:
                return test("")
            if part.startswith(prefix):
                return test(part[len(prefix):])
        return test(None)
    return query_test, _describe(f"query {name}", string_match)
