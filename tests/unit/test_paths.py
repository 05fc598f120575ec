"""mesh.proxy.paths: Istio's path normalization options, and the paths refused with 400."""

from __future__ import annotations

import pytest
from twisted.python import usage

from mesh.proxy.outcome import LocalReply
from mesh.proxy.paths import NORMALIZATIONS, normalization_option, normalizer
from mesh.proxy.tap import Options

#: path -> result under NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES (400: refused).
TABLE = {
    "/a/b": ("/a/b",) * 4,
    "*": ("*",) * 4,
    "/a/./b/../c": ("/a/./b/../c", "/a/c", "/a/c", "/a/c"),
    "/a/b/..": ("/a/b/..", "/a/", "/a/", "/a/"),
    "/../../x": ("/../../x", "/x", "/x", "/x"),
    "/%2e%2E/x": ("/%2e%2E/x", "/x", "/x", "/x"),
    "/%41%7e%5F%2D": ("/%41%7e%5F%2D", "/A~_-", "/A~_-", "/A~_-"),
    "/%2541": ("/%2541", "/%2541", "/%2541", "/%2541"),  # decoded once: %25 stays
    "/a\\b": ("/a\\b", "/a/b", "/a/b", "/a/b"),
    "/a//b///c": ("/a//b///c", "/a//b///c", "/a/b/c", "/a/b/c"),
    "/a%2fb": ("/a%2fb", "/a%2fb", "/a%2fb", "/a/b"),
    "/a%2F%2Fb%5C..%5cc": ("/a%2F%2Fb%5C..%5cc", "/a%2F%2Fb%5C..%5cc", "/a%2F%2Fb%5C..%5cc", "/a/c"),
    "/.well-known/x": ("/.well-known/x",) * 4,
    "/a/...;/b": ("/a/...;/b",) * 4,  # not a dot segment
    "/a;p=1/../b": ("/a;p=1/../b", "/b", "/b", "/b"),
    "/public/..;/private": ("/public/..;/private", 400, 400, 400),
    "/public/..;x=1/private": ("/public/..;x=1/private", 400, 400, 400),
    "/public/.;/private": ("/public/.;/private", 400, 400, 400),
    "/public/%2E%2e;/private": ("/public/%2E%2e;/private", 400, 400, 400),
    "/a%00": (400, 400, 400, 400),
    "/a%00b/../c": (400, 400, 400, 400),
}


@pytest.mark.parametrize("path", TABLE)
@pytest.mark.parametrize("index, option", list(enumerate(NORMALIZATIONS)))
def test_normalization(path, index, option):
    expected = TABLE[path][index]
    normalize = normalizer(option)
    if expected == 400:
        with pytest.raises(LocalReply) as refused:
            normalize(path)
        assert (refused.value.status, refused.value.flag) == (400, "")
        assert "docs/operations.md" in refused.value.message
    else:
        assert normalize(path) == expected


def test_a_plain_path_is_returned_as_is():
    path = "/api/v1/items"
    assert all(normalizer(option)(path) is path for option in NORMALIZATIONS)


def test_the_refusal_names_the_segment():
    with pytest.raises(LocalReply) as refused:
        normalizer("BASE")("/public/..;jsessionid=1/private")
    assert "'..;jsessionid=1', a dot segment with parameters" in refused.value.message


def test_options_and_istio_default():
    assert [normalization_option(option) for option in NORMALIZATIONS] == list(NORMALIZATIONS)
    assert normalization_option("DEFAULT") == "BASE"
    with pytest.raises(ValueError, match="one of NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES .*got 'base'"):
        normalization_option("base")


def test_mesh_proxy_option():
    options = Options()
    options.parseOptions(["--workload", "w", "--config-dir", "/tmp"])
    assert options["path-normalization"] == "BASE"
    options = Options()
    options.parseOptions(["--workload", "w", "--config-dir", "/tmp", "--path-normalization", "DEFAULT"])
    assert options["path-normalization"] == "BASE"
    with pytest.raises(usage.UsageError, match="--path-normalization: path normalization is one of"):
        Options().parseOptions(["--workload", "w", "--config-dir", "/tmp", "--path-normalization", "SLASHES"])
