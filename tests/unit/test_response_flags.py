"""The one table of response flags (mesh.response_flags): complete for what the proxy emits, and parsing."""

from __future__ import annotations

import re
from pathlib import Path

from mesh import response_flags

PROXY = Path(__file__).parents[2] / "mesh" / "proxy"
#: Where the proxy sets a flag: add_flag("X"), local_reply(NNN, "X", ...), LocalReply(NNN, "X", ...),
#: LocalReply(NNN, f"X:..."), flag = "X", flag="X" (a passthrough Refusal), passthrough's _report(..., "X")
#: and a routed TCP connection's refuse("X", ...).
EMITTED = re.compile(r'(?:add_flag\(|local_reply\(\w+, |LocalReply\(\d+, f?|flag ?= ?|self\.cluster, |refuse\()'
                     r'"([A-Z]+)[:"]')


def emitted_flags() -> set:
    return {flag for path in PROXY.glob("*.py") for flag in EMITTED.findall(path.read_text())}


def test_every_flag_the_proxy_emits_is_explained():
    emitted = emitted_flags()
    assert {"NR", "NC", "UH", "UF", "UT", "URX", "DC", "UC", "UO", "RBAC"} <= emitted, emitted
    missing = {flag for flag in emitted if flag not in response_flags.FLAGS or not response_flags.FLAGS[flag].emitted}
    assert not missing, f"add these flags to mesh/response_flags.py (emitted=True): {sorted(missing)}"


def test_the_denying_policy_comes_from_the_flag_or_the_details():
    flags = response_flags.parse("UF,URX")
    assert [flag.name for flag in flags] == ["UpstreamConnectionFailure", "UpstreamRetryLimitExceeded"]
    [rbac] = response_flags.parse("RBAC:shop/deny-admin")
    assert rbac.code == "RBAC" and "AuthorizationPolicy" in rbac.meaning
    assert response_flags.denying_policy("UF,RBAC:shop/deny-admin") == "shop/deny-admin"
    assert response_flags.denying_policy("UF") is None
    assert response_flags.denying_policy("RBAC", "rbac_access_denied_matched_policy[shop/deny]") == "shop/deny"
    assert response_flags.denying_policy("RBAC", "rbac_access_denied_matched_policy[none]") == "allow-nothing-matched"
    assert response_flags.denying_policy("RBAC", "via_upstream") is None


def test_none_and_unknown_flags():
    assert response_flags.parse("-") == [] and response_flags.parse("") == [] and response_flags.parse(None) == []
    [unknown] = response_flags.parse("ZZ")
    assert unknown.code == "ZZ" and unknown.name == "unknown" and "RESPONSE_FLAGS" in unknown.what_to_do


def test_every_entry_says_what_to_do():
    for code, flag in response_flags.FLAGS.items():
        assert flag.code == code and flag.name and flag.meaning and flag.what_to_do


def test_flags_are_written_in_the_order_set_as_envoy_does():
    """Envoy 1.30+ (Istio 1.22+) joins its flags in the order they were set (StreamInfoImpl keeps them in a
    vector; toShortString does not sort): retries spent on a dead endpoint are ``URX,UF``, as the router
    sets URX before the last try's UF.  Envoy 1.29 and older sorted them by bit (``UF,URX``)."""
    from mesh.proxy.context import RequestContext

    ctx = RequestContext.for_test()
    ctx.add_flag("UF")
    assert ctx.response_flags == "UF"  # one flag: as it is
    ctx.add_flag("UF")
    assert ctx.response_flags == "UF"  # once
    ctx = RequestContext.for_test()
    for flag in ("DI", "URX", "UF", "URX"):
        ctx.add_flag(flag)
    assert ctx.response_flags == "DI,URX,UF"
