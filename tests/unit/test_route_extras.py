"""The pure parts of what a route does besides forwarding (mesh.config.route_extras): Envoy's Location
construction, RE2's global replace, header parsers evaluated in turn, and CORS origin matching."""

from __future__ import annotations

import pytest

from mesh.config.regex import compile_re2, group_count
from mesh.config.resources import StringMatch
from mesh.config.route_extras import (
    Redirect,
    RegexRewrite,
    origin_test,
    request_url,
    sequence_ops,
    substitution_parts,
)
from mesh.config.tables import HeaderOps
from mesh.proxy.codec.heads import _apply_ops


@pytest.mark.parametrize("redirect, host, path, port, expected", [
    # uri replaces the path and keeps the query, unless it has a query of its own
    (Redirect(path=b"/new"), b"old", b"/a?x=1", 80, b"http://old/new?x=1"),
    (Redirect(path=b"/new?y=2"), b"old", b"/a?x=1", 80, b"http://old/new?y=2"),
    (Redirect(path=b"new"), b"old", b"/a", 80, b"http://old/new"),
    # authority replaces the Host header, port and all
    (Redirect(authority=b"www.example.com", status=302), b"old:9080", b"/a", 9080, b"http://www.example.com/a"),
    # a port replaces the request's
    (Redirect(port=8443), b"old:9080", b"/a", 9080, b"http://old:8443/a"),
    (Redirect(port=8443, authority=b"new"), b"old", b"/a", 80, b"http://new:8443/a"),
    (Redirect(port=8443), b"[::1]:9080", b"/a", 9080, b"http://[::1]:8443/a"),
    # derivePort FROM_REQUEST_PORT writes the port the request came to, but not http's default
    (Redirect(port_from_request=True), b"old:9080", b"/a", 9080, b"http://old:9080/a"),
    (Redirect(port_from_request=True), b"old", b"/a", 80, b"http://old/a"),
    (Redirect(port_from_request=True, scheme=b"https"), b"old", b"/a", 80, b"https://old:80/a"),
    # a new scheme drops the old scheme's default port, and keeps any other
    (Redirect(scheme=b"https"), b"old:80", b"/a", 80, b"https://old/a"),
    (Redirect(scheme=b"https"), b"old:9080", b"/a", 9080, b"https://old:9080/a"),
    (Redirect(scheme=b"http", path=b"/b"), b"old:80", b"/a", 80, b"http://old:80/b"),
])
def test_location(redirect, host, path, port, expected):
    assert redirect.location(host, path, port) == expected


def test_the_url_of_the_request_itself():
    assert request_url(b"web:8080", b"/x?y=1") == b"http://web:8080/x?y=1"


def _rewrite(match: str, rewrite: str) -> RegexRewrite:
    pattern = compile_re2(match)
    parts, problem = substitution_parts(rewrite, group_count(pattern))
    assert problem is None
    return RegexRewrite(pattern, parts, (match, rewrite))


@pytest.mark.parametrize("match, rewrite, path, expected", [
    ("^/service/([^/]+)(/.*)$", r"\2/instance/\1", "/service/foo/v1/api", "/v1/api/instance/foo"),
    ("/v1/", "/v2/", "/v1/a/v1/b", "/v2/a/v2/b"),            # every match, as RE2's GlobalReplace
    ("ana", "X", "banana", "bXna"),                          # non-overlapping
    ("a*", "-", "baaac", "-b-c-"),                           # no empty match right after a match (RE2)
    ("x", "y", "/abc", "/abc"),                              # no match: unchanged
    (r"/(\d+)", r"/n\\\0", "/12", r"/n\/12"),                 # \\ is a backslash, \0 the whole match
    ("(a)|(b)", r"[\1\2]", "ab", "[a][b]"),                   # an unmatched group is empty
])
def test_regex_rewrite_is_re2_global_replace(match, rewrite, path, expected):
    assert _rewrite(match, rewrite).apply(path) == expected


@pytest.mark.parametrize("rewrite, problem", [
    (r"\2", "the rewrite uses group \\2, but the match regex has only 1 parenthesized group(s)"),
    ("a\\", "a '\\' may not end the rewrite"),
    (r"\x", "invalid escape '\\x' in the rewrite"),
])
def test_bad_substitutions(rewrite, problem):
    parts, found = substitution_parts(rewrite, 1)
    assert parts == () and found.startswith(problem)


HEADERS = [(b"x-a", b"orig"), (b"x-b", b"orig"), (b"x-keep", b"k")]


def _apply(*parsers):
    return sorted(_apply_ops(HEADERS, sequence_ops(*parsers)))


def test_one_parser_is_itself():
    ops = HeaderOps(set=((b"x-a", b"1"),), add=((b"x-b", b"2"),), remove=(b"x-keep",))
    assert _apply(ops) == sorted(_apply_ops(HEADERS, ops))


def test_a_lone_destination_joins_the_route_parser():
    """Istio joins them: removals first, then the route's set/add, then the destination's."""
    route = HeaderOps(add=((b"x-c", b"route"),))
    destination = HeaderOps(set=((b"x-c", b"dest"),), remove=(b"x-a",))
    assert _apply((route, destination)) == [(b"x-b", b"orig"), (b"x-c", b"dest"), (b"x-keep", b"k")]


def test_weighted_destination_parser_runs_before_the_routes():
    """Envoy: the weighted cluster's parser, then the route's (whose removal wins here)."""
    destination = HeaderOps(add=((b"x-c", b"dest"),))
    route = HeaderOps(set=((b"x-a", b"route"),), remove=(b"x-c",))
    assert _apply(destination, route) == [(b"x-a", b"route"), (b"x-b", b"orig"), (b"x-keep", b"k")]
    assert _apply(route, destination) == [(b"x-a", b"route"), (b"x-b", b"orig"), (b"x-c", b"dest"),
                                          (b"x-keep", b"k")]


def test_nothing_to_do_is_none():
    assert sequence_ops(None, (None, None)) is None


@pytest.mark.parametrize("matches, origin, allowed", [
    ([StringMatch("exact", "https://a.example")], "https://a.example", True),
    ([StringMatch("exact", "https://a.example")], "https://a.example.evil", False),
    ([StringMatch("prefix", "https://b.")], "https://b.example", True),
    ([StringMatch("regex", r"https://.*\.c\.example")], "https://x.c.example", True),
    ([StringMatch("regex", r"https://.*\.c\.example")], "http://x.c.example", False),
    ([StringMatch("exact", "*")], "https://anything", True),       # a match of "*" allows every origin
    ([StringMatch("regex", ".*")], "null", True),
    ([], "https://a.example", False),
])
def test_allowed_origins(matches, origin, allowed):
    assert origin_test(matches)(origin) is allowed


# -- RE2's syntax and GlobalReplace, on the path's bytes, as Envoy runs them -----------------------

@pytest.mark.parametrize("match, rewrite, path, expected", [
    (r"/v([[:digit:]]+)/([^/]+)", r"/api/\2/version/\1", "/v12/items", "/api/items/version/12"),
    (r"/(\w+)/(\d+)", r"/\2/\1", "/caf\u00e9/12", "/caf\u00e9/12"),  # \w is ASCII (a byte E9 is no UTF-8)
    (r"/a{,2}", "/b", "/a{,2}/aa", "/b/aa"),                       # '{,2}' is a literal
    ("(?U)(a+)", r"<\1>", "aaa", "<a><a><a>"),                     # (?U): ungreedy
    ("x*", "-", "a\u00c3\u00a9b", "-a-\u00c3\u00a9-b-"),           # an empty match steps over 'é' (UTF-8)
    ("\u00e9", "e", "caf\u00c3\u00a9", "cafe"),                    # the path's bytes are read as UTF-8
    ("/old", "/n\u00e9w", "/old", "/n\u00c3\u00a9w"),              # a literal is written as UTF-8
])
def test_regex_rewrite_is_re2(match, rewrite, path, expected):
    assert _rewrite(match, rewrite).apply(path) == expected


def test_rewrite_groups_are_ascii_digits():
    parts, found = substitution_parts("\\\u0663", 3)  # ARABIC-INDIC DIGIT THREE is no group for RE2
    assert parts == () and found.startswith("invalid escape '\\\u0663' in the rewrite")


@pytest.mark.parametrize("matches, origin, allowed", [
    ([StringMatch("regex", r"https://[[:alnum:]]+\.example")], "https://app1.example", True),
    ([StringMatch("regex", r"https://[[:alnum:]]+\.example")], "https://a].example", False),
    ([StringMatch("regex", r"https://\w+\.example")], "https://b\u00c3\u00bccher.example", False),  # ASCII \w
    ([StringMatch("regex", r"https://(?i)APP\.example(:\d{,4})?")], "https://app.example:\u0668\u0660", False),
    ([StringMatch("regex", r"https://(?i)APP\.example(:\d{,4})?")], "https://app.example:8{,4}", True),
])
def test_allowed_origins_by_re2(matches, origin, allowed):
    assert origin_test(matches)(origin) is allowed
