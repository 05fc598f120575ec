"""Protocol detection on a captured connection: HTTP/1.x or anything else.

Istio's outbound listener sniffs the first bytes of a connection it captured
to tell HTTP from other TCP traffic (a TLS ClientHello, a database protocol).
txmesh does the same, once per connection and only for connections that
iptables redirected (the app did not call the sidecar itself):

- :func:`classify` looks at the bytes received so far.  A complete first
  line ``TOKEN SP TARGET SP HTTP/1.d`` is HTTP; bytes that cannot start such
  a line (``0x16`` of a TLS handshake, ``*3\\r\\n`` of Redis, a binary
  packet, the HTTP/2 preface ``PRI * HTTP/2.0``) are TCP at once; a prefix
  that still could be a request line needs more bytes.
- :func:`classify_at_timeout` decides when the detection timeout passes first:
  a client that sent nothing speaks a server-first protocol (MySQL, SMTP:
  the server talks first), which is TCP; a client that has sent a method and
  a space is a slow HTTP client.
"""

from __future__ import annotations

import re

HTTP, TCP = "http", "tcp"

#: A request line this long without its end is left to the HTTP codec (and its head limits).
MAX_SNIFF_BYTES = 16 * 1024

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_TARGET = rb"[^\x00-\x20\x7f]"
_REQUEST_LINE = re.compile(rb"%s+ %s+ HTTP/1\.[0-9]\r?\n" % (_TOKEN, _TARGET))
#: Every prefix of a request line: the method (as long as any method llhttp knows, with room), then
#: optionally a space, the target, a space and the start of ``HTTP/1.d``.
_LINE_PREFIX = re.compile(rb"%s{1,24}(?: (?:%s+(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?)?)?)?"
                          % (_TOKEN, _TARGET))
_METHOD_SPACE = re.compile(rb"%s{1,24} " % _TOKEN)


def classify(data: bytes):
    """:data:`HTTP`, :data:`TCP`, or None when ``data`` (the first bytes of a connection) cannot tell yet."""
    if not data:
        return None
    end = data.find(b"\n")
    if end >= 0:
        return HTTP if _REQUEST_LINE.fullmatch(data, 0, end + 1) else TCP
    if not _LINE_PREFIX.fullmatch(data):
        return TCP
    if len(data) >= MAX_SNIFF_BYTES:
        return HTTP  # a huge request target: the codec answers 414/431 as for any client
    return None


def classify_at_timeout(data: bytes) -> str:
    """The decision when the detection timeout passed before :func:`classify` could make one."""
    return HTTP if _METHOD_SPACE.match(data) else TCP
