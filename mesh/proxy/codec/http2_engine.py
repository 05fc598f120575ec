"""Which HTTP/2 engine the codecs' connections use (``mesh-proxy --http2-engine``).

``nghttp2``: libnghttp2's session (:mod:`mesh.proxy.codec.nghttp2_session`) with its callbacks in C
(the optional module ``_nghttp2_pump``; in Python through cffi when it is not built), or the ``h2``
library's connection when libnghttp2 cannot be loaded; ``nghttp2-cffi``: the same session with its
callbacks in Python always (to rule the C module out); ``h2``: the ``h2`` library's.  Kept
apart from the engines so that choosing one imports neither (a sidecar that never sees HTTP/2
never loads h2).
"""

from __future__ import annotations

#: The engines.
ENGINES = ("nghttp2", "nghttp2-cffi", "h2")
#: The engine of a sidecar started without ``--http2-engine``.
DEFAULT = "nghttp2"
_engine = DEFAULT


def use(engine: str) -> None:
    """Make ``engine`` (one of :data:`ENGINES`) the codecs' HTTP/2 engine for the connections made from now on."""
    global _engine
    if engine not in ENGINES:
        raise ValueError(f"unknown HTTP/2 engine {engine!r} (one of {', '.join(ENGINES)})")
    _engine = engine


def chosen() -> str:
    """The engine :func:`use` chose (``nghttp2`` may still fall back to h2: see ``nghttp2_session.enabled``)."""
    return _engine
