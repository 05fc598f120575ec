"""How ``mesh_response_headers`` results are applied to a response's headers (``exchange._rewritten``).

The single-pair case (the metadata exchange's, on every mTLS response) has a path of its own; both
must give what the hook's contract says: each pair replaces every header of its name, whatever the
case the upstream used, and a None value only removes.
"""

from __future__ import annotations

import pytest

from mesh.proxy.exchange import _rewritten

HEADERS = [(b"Server", b"nginx"), (b"X-Envoy-Peer-Metadata", b"theirs"), (b"Content-Length", b"5"),
           (b"x-envoy-peer-metadata", b"again"), (b"X-Other", b"1")]


@pytest.mark.parametrize("results, expected", [
    ([], HEADERS),
    ([[(b"x-envoy-peer-metadata", None)]],
     [(b"Server", b"nginx"), (b"Content-Length", b"5"), (b"X-Other", b"1")]),
    ([[(b"x-envoy-peer-metadata", b"ours")]],
     [(b"Server", b"nginx"), (b"Content-Length", b"5"), (b"X-Other", b"1"), (b"x-envoy-peer-metadata", b"ours")]),
    ([[(b"x-other", b"2")]],  # same length as no other name: only its own header goes
     [(b"Server", b"nginx"), (b"X-Envoy-Peer-Metadata", b"theirs"), (b"Content-Length", b"5"),
      (b"x-envoy-peer-metadata", b"again"), (b"x-other", b"2")]),
    ([[(b"server", b"mesh")], [(b"x-other", None)]],  # several results: the general path
     [(b"X-Envoy-Peer-Metadata", b"theirs"), (b"Content-Length", b"5"), (b"x-envoy-peer-metadata", b"again"),
      (b"server", b"mesh")]),
    ([[(b"server", b"mesh"), (b"x-new", b"1")]],
     [(b"X-Envoy-Peer-Metadata", b"theirs"), (b"Content-Length", b"5"), (b"x-envoy-peer-metadata", b"again"),
      (b"X-Other", b"1"), (b"server", b"mesh"), (b"x-new", b"1")]),
])
def test_each_pair_replaces_every_header_of_its_name(results, expected):
    assert list(_rewritten(HEADERS, results)) == expected


def test_a_result_that_is_not_a_list_still_applies():
    """The hook's contract says a list; a tuple or a generator from a plugin works as it always did."""
    expected = [(b"Server", b"nginx"), (b"Content-Length", b"5"), (b"X-Other", b"1")]
    assert _rewritten(HEADERS, [((b"x-envoy-peer-metadata", None),)]) == expected
    assert _rewritten(HEADERS, [(pair for pair in [(b"x-envoy-peer-metadata", None)])]) == expected
