"""SpiffeId.parse: exactly spiffe://<td>/ns/<ns>/sa/<sa>, nothing before or after."""

from __future__ import annotations

import pytest

from mesh.identity.spiffe import InvalidSpiffeId, SpiffeId


def test_parse_round_trip():
    spiffe = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/frontend")
    assert spiffe == SpiffeId("cluster.local", "shop", "frontend")
    assert str(spiffe) == "spiffe://cluster.local/ns/shop/sa/frontend"


@pytest.mark.parametrize("uri", [
    "spiffe://cluster.local/ns/shop/sa/frontend\n",   # '$' alone would accept a trailing newline
    "spiffe://cluster.local/ns/shop/sa/frontend/x",
    " spiffe://cluster.local/ns/shop/sa/frontend",
    "spiffe://cluster.local/ns/Shop/sa/frontend",
    "spiffe://cluster.local/ns/shop/sa/",
])
def test_anything_else_is_refused(uri):
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.parse(uri)
