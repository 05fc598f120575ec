"""Request path normalization, applied by the codec before routing and authorization.

The options are Istio's ``meshConfig.pathNormalization.normalization``, set
per sidecar with ``mesh-proxy --path-normalization`` (docs/operations.md):

- ``NONE``: the path is used and forwarded as received.
- ``BASE`` (the default, as in Istio): Envoy's ``normalize_path``: decode
  %-escaped unreserved characters once (``%2e`` -> ``.``, ``%41`` -> ``A``),
  turn ``\\`` into ``/`` and resolve ``.`` and ``..`` segments (RFC 3986,
  section 5.2.4; ``..`` never climbs above ``/``).
- ``MERGE_SLASHES``: ``BASE``, then every run of slashes becomes one.
- ``DECODE_AND_MERGE_SLASHES``: ``%2F`` and ``%5C`` (either case) are decoded
  to ``/`` and ``\\`` first, then ``MERGE_SLASHES``.

The normalized path is what routes and AuthorizationPolicies see and what is
forwarded, so an app never receives a path other than the one a policy checked.

Two kinds of path are refused with 400 (:func:`rejected`):

- ``%00`` (an encoded NUL), in every mode, as Istio does;
- in every mode but ``NONE``, a dot segment with parameters (``/..;/``,
  ``/.;x/``, also spelt ``%2e%2e;``).  RFC 3986 reads ``..;`` as a plain name,
  so Envoy and Istio pass it on; Tomcat and Jetty drop the parameters and then
  resolve it as ``..``, which takes ``/public/..;/private`` past a rule that
  allows ``/public*`` (istio/istio#27409).  Neither reading is safe to pick
  for the app, so the proxy refuses the request, as Jetty 10 does with such
  ambiguous segments.

Each ``normalize_*`` function takes the path without its query and first tests
the few characters that can change anything, so a plain path costs a handful of
substring searches.
"""

from __future__ import annotations

import re

from mesh.proxy.outcome import LocalReply

NONE = "NONE"
BASE = "BASE"
MERGE_SLASHES = "MERGE_SLASHES"
DECODE_AND_MERGE_SLASHES = "DECODE_AND_MERGE_SLASHES"
#: Istio's option names, from the most lenient to the strictest.
NORMALIZATIONS = (NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
#: Istio's ``DEFAULT``, which means ``BASE``.
_ALIASES = {"DEFAULT": BASE}

_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|3[0-9]|4[1-9a-fA-F]|5[0-9aA]|5[fF]|6[1-9a-fA-F]|7[0-9aA]|7[eE])")
_SLASH_ESCAPE = re.compile(r"%(2[fF]|5[cC])")
_SLASH_RUN = re.compile(r"//+")


def _unescape(match) -> str:
    return chr(int(match.group(1), 16))


def rejected(why: str, fix: str) -> LocalReply:
    """The 400 answer to a path that is refused rather than normalized."""
    return LocalReply(400, "", f"the request path {why}, so it is refused: {fix} (see path normalization "
                               "in docs/operations.md)")


def _nul() -> LocalReply:
    return rejected("contains %00 (an encoded NUL byte)", "remove it")


def normalize_none(path: str) -> str:
    """``NONE``: the path as received (only ``%00`` is refused)."""
    if "%00" in path:
        raise _nul()
    return path


def normalize_base(path: str) -> str:
    """``BASE``: decode unreserved escapes, ``\\`` -> ``/``, resolve dot segments."""
    if "%" not in path and "\\" not in path and "/." not in path:
        return path
    return _base(path)


def normalize_merge_slashes(path: str) -> str:
    """``MERGE_SLASHES``: ``BASE``, then merge runs of slashes."""
    if "%" not in path and "\\" not in path and "/." not in path and "//" not in path:
        return path
    return _SLASH_RUN.sub("/", _base(path))


def normalize_decode_and_merge_slashes(path: str) -> str:
    """``DECODE_AND_MERGE_SLASHES``: decode ``%2F``/``%5C``, then ``MERGE_SLASHES``."""
    if "%" not in path and "\\" not in path and "/." not in path and "//" not in path:
        return path
    if "%" in path:
        path = _SLASH_ESCAPE.sub(_unescape, path)
    return _SLASH_RUN.sub("/", _base(path))


_NORMALIZERS = {
    NONE: normalize_none,
    BASE: normalize_base,
    MERGE_SLASHES: normalize_merge_slashes,
    DECODE_AND_MERGE_SLASHES: normalize_decode_and_merge_slashes,
}


def normalization_option(value: str) -> str:
    """The option name for ``value`` (Istio's ``DEFAULT`` is ``BASE``); ValueError saying the choices."""
    name = _ALIASES.get(value, value)
    if name not in _NORMALIZERS:
        raise ValueError(f"path normalization is one of {', '.join(NORMALIZATIONS)} (Istio's "
                         f"meshConfig.pathNormalization.normalization), got {value!r}")
    return name


def normalizer(option: str):
    """The ``path -> path`` function of a normalization option (see :func:`normalization_option`)."""
    return _NORMALIZERS[normalization_option(option)]


def _base(path: str) -> str:
    if "%" in path:
        if "%00" in path:
            raise _nul()
        path = _UNRESERVED_ESCAPE.sub(_unescape, path)
    path = path.replace("\\", "/")
    if not path.startswith("/"):
        return path
    segments = path.split("/")[1:]
    out = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment == ".":
            continue
        elif segment[:1] == "." and segment.partition(";")[0] in (".", ".."):
            raise rejected(f"has the segment {segment!r}, a dot segment with parameters, which servers such "
                           "as Tomcat resolve as '..' or '.'", "remove the parameters from that segment")
        else:
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")
    return "/" + "/".join(out)
