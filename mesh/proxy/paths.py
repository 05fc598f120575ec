"""Request path normalization, applied by the codec before routing and authorization.

Istio's default (``BASE``) normalization: decode %-escaped unreserved
characters, turn ``\\`` into ``/`` and resolve ``.``/``..`` segments (RFC 3986).
The normalized path is what routes and AuthorizationPolicies see and what is
forwarded, so an app never receives a path other than the one a policy checked.
"""

from __future__ import annotations

import re

_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|3[0-9]|4[1-9a-fA-F]|5[0-9aA]|5[fF]|6[1-9a-fA-F]|7[0-9aA]|7[eE])")


def normalize_path(path: str) -> str:
    """Istio's ``BASE`` path normalization: decode %-escaped unreserved characters,
    turn ``\\`` into ``/`` and resolve ``.``/``..`` segments (RFC 3986)."""
    if "%" not in path and "\\" not in path and "/." not in path:
        return path
    path = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path).replace("\\", "/")
    if not path.startswith("/"):
        return path
    segments = path.split("/")[1:]
    out = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")
    return "/" + "/".join(out)
