"""Compiled match predicates against real request contexts."""

import pytest

from mesh.config.predicates import compile_match, compile_matches
from mesh.config.resources import HTTPMatch, StringMatch
from mesh.proxy.context import RequestContext


def _ctx(path="/", method="GET", headers=None, host="web"):
    return RequestContext.for_test(method=method, path=path, host=host, headers=headers)


def _check(match, ctx):
    predicate, _ = compile_match(match)
    return predicate(ctx)


@pytest.mark.parametrize("uri,ignore_case,path,expected", [
    (StringMatch("exact", "/api"), False, "/api", True),
    (StringMatch("exact", "/api"), False, "/api?x=1", True),  # exact ignores the query string
    (StringMatch("exact", "/api"), False, "/api/", False),
    (StringMatch("exact", "/API"), True, "/api?x", True),
    (StringMatch("prefix", "/api/"), False, "/api/v1", True),
    (StringMatch("prefix", "/api/"), False, "/apiv1", False),
    (StringMatch("prefix", "/Api/"), True, "/API/v1", True),
    (StringMatch("prefix", "/Api/"), False, "/API/v1", False),
    (StringMatch("prefix", ""), False, "/anything", True),
    (StringMatch("regex", "/v[0-9]+/.*"), False, "/v2/items", True),
    (StringMatch("regex", "/v[0-9]+"), False, "/v2/items", False),  # full match, not search
    (StringMatch("regex", "/v[0-9]+"), False, "/v2?q=1", True),  # regex sees the path without query
    (StringMatch("regex", "/V[0-9]+"), True, "/v2", False),  # ignoreUriCase does not apply to regex
])
def test_uri(uri, ignore_case, path, expected):
    assert _check(HTTPMatch(uri=uri, ignore_uri_case=ignore_case), _ctx(path)) is expected


@pytest.mark.parametrize("method,request_method,expected", [
    (StringMatch("exact", "GET"), "GET", True),
    (StringMatch("exact", "GET"), "get", False),
    (StringMatch("prefix", "P"), "PUT", True),
    (StringMatch("regex", "GET|HEAD"), "HEAD", True),
    (StringMatch("regex", "GET|HEAD"), "HEADX", False),
])
def test_method(method, request_method, expected):
    assert _check(HTTPMatch(method=method), _ctx(method=request_method)) is expected


def test_authority_reads_the_host_header_as_received():
    match = HTTPMatch(authority=StringMatch("regex", r"web(:\d+)?"))
    assert _check(match, _ctx(host="web")) is True
    assert _check(match, _ctx(host="web2")) is False


@pytest.mark.parametrize("condition,headers,expected", [
    (StringMatch("exact", "bob"), {"x-user": "bob"}, True),
    (StringMatch("exact", "bob"), {"x-user": "Bob"}, False),
    (StringMatch("exact", "bob"), {}, False),
    (StringMatch("exact", ""), {"x-user": ""}, True),
    (StringMatch("prefix", "bo"), {"x-user": "bob"}, True),
    (StringMatch("prefix", "bo"), {}, False),
    (StringMatch("regex", "b.b"), {"x-user": "bob"}, True),
    (StringMatch("regex", "b.b"), {"x-user": "bobby"}, False),
    (StringMatch("present"), {"x-user": ""}, True),
    (StringMatch("present"), {"x-other": "1"}, False),
])
def test_headers(condition, headers, expected):
    assert _check(HTTPMatch(headers=(("x-user", condition),)), _ctx(headers=headers)) is expected


@pytest.mark.parametrize("condition,headers,expected", [
    (StringMatch("present"), {}, True),
    (StringMatch("present"), {"x-debug": "1"}, False),
    (StringMatch("exact", "1"), {"x-debug": "1"}, False),
    (StringMatch("exact", "1"), {"x-debug": "2"}, True),
    (StringMatch("exact", "1"), {}, True),  # an absent header is "" (Istio's treat_missing_header_as_empty)
    (StringMatch("exact", ""), {}, False),
    (StringMatch("regex", "a*"), {}, False),
    (StringMatch("regex", "a+"), {}, True),
    (StringMatch("exact", ""), {"x-debug": "1"}, True),
])
def test_without_headers(condition, headers, expected):
    assert _check(HTTPMatch(without_headers=(("x-debug", condition),)), _ctx(headers=headers)) is expected


@pytest.mark.parametrize("condition,path,expected", [
    (StringMatch("exact", "true"), "/p?debug=true", True),
    (StringMatch("exact", "true"), "/p?a=1&debug=true&b", True),
    (StringMatch("exact", "true"), "/p?debug=false", False),
    (StringMatch("exact", "true"), "/p?debugx=true", False),
    (StringMatch("exact", "true"), "/p", False),
    (StringMatch("exact", ""), "/p?debug", True),
    (StringMatch("exact", "a%20b"), "/p?debug=a%20b", True),  # values are not URL-decoded
    (StringMatch("regex", "[0-9]+"), "/p?debug=42", True),
    (StringMatch("present"), "/p?x=1&debug=", True),
    (StringMatch("present"), "/p?x=1", False),
])
def test_query_params(condition, path, expected):
    assert _check(HTTPMatch(query_params=(("debug", condition),)), _ctx(path)) is expected


def test_conditions_of_one_match_are_anded():
    match = HTTPMatch(uri=StringMatch("prefix", "/api"), method=StringMatch("exact", "POST"),
                      headers=(("x-user", StringMatch("exact", "bob")),))
    predicate, text = compile_match(match)
    assert text == "uri prefix '/api' && method exact 'POST' && header x-user exact 'bob'"
    assert predicate(_ctx("/api/x", "POST", {"x-user": "bob"})) is True
    assert predicate(_ctx("/api/x", "GET", {"x-user": "bob"})) is False
    assert predicate(_ctx("/api/x", "POST", {})) is False
    assert predicate(_ctx("/web", "POST", {"x-user": "bob"})) is False


def test_matches_of_a_list_are_ored():
    predicate, text = compile_matches([HTTPMatch(uri=StringMatch("prefix", "/a")),
                                       HTTPMatch(headers=(("x-b", StringMatch("present")),))])
    assert text == "(uri prefix '/a') || (header x-b present)"
    assert predicate(_ctx("/a/1")) is True
    assert predicate(_ctx("/b", headers={"x-b": "1"})) is True
    assert predicate(_ctx("/b")) is False


def test_empty_matches_accept_everything():
    assert compile_matches([]) == (None, "*")
    assert compile_match(HTTPMatch()) == (None, "*")
    # one catch-all entry makes the whole OR accept everything
    assert compile_matches([HTTPMatch(uri=StringMatch("exact", "/a")), HTTPMatch()]) == (None, "*")


# -- regexes are RE2's (Istio's syntax, Envoy's engine), not Python's ------------------------------

@pytest.mark.parametrize("regex,path,expected", [
    ("/id/[[:digit:]]+", "/id/123", True),      # a POSIX class: RE2's [0-9] (Python: a set, and a warning)
    ("/a{,2}", "/a{,2}", True),                 # '{,2}' is a literal in RE2 (Python: {0,2})
    ("/a{,2}", "/aa", False),
    ("/a{,2}", "/", False),
    (r"/\pN+", "/42", True),                    # RE2's one-letter Unicode class
    (r"/(?U)a+", "/aaa", True),                 # (?U) is RE2's ungreedy flag (Python: Unicode), same match
])
def test_uri_regex_is_re2(regex, path, expected):
    assert _check(HTTPMatch(uri=StringMatch("regex", regex)), _ctx(path)) is expected


@pytest.mark.parametrize("regex,value,expected", [
    (r"\d+", "\u0663\u0664", False),            # RE2's \d is ASCII only (Python's is any Unicode digit)
    (r"\w+", "caf\u00e9", False),               # so is \w
    (r"\s", "\u00a0", False),                   # and \s (U+00A0, no-break space)
    ("caf\u00e9", "caf\u00c3\u00a9", True),     # the bytes as received ('é' in UTF-8) are read as UTF-8
    ("caf.", "caf\u00c3\u00a9", True),          # ... so '.' is one character, as in Envoy
    ("caf..", "caf\u00c3\u00a9", False),
])
def test_header_regex_is_re2_on_the_bytes_received(regex, value, expected):
    match = HTTPMatch(headers=(("x-n", StringMatch("regex", regex)),))
    assert _check(match, _ctx(headers={"x-n": value})) is expected


def test_query_and_authority_regexes_are_re2():
    assert _check(HTTPMatch(query_params=(("id", StringMatch("regex", "[[:digit:]]+")),)), _ctx("/p?id=7")) is True
    match = HTTPMatch(authority=StringMatch("regex", r"web(:[[:digit:]]{,5})?"))
    assert _check(match, _ctx(host="web:8{,5}")) is True
    assert _check(match, _ctx(host="web:8080")) is False
