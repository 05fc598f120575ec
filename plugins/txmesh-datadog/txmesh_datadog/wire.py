"""The DogStatsD wire format: tags, metric lines and datagrams.

A metric line is ``NAME:VALUE[:VALUE...]|TYPE[|@RATE][|#TAG,TAG...]``
(Datadog's "Datagram Format", protocol v1.1: several values of one
distribution packed in one line, for agents 6.25+/7.25+).  Lines are joined
with ``\\n`` into datagrams of at most ``max_bytes``: 1432 bytes over UDP (what
fits an Ethernet frame, the official clients' default) and 8192 over a Unix
socket (the agent's read buffer).

Everything here runs when a flush formats what was aggregated, never per
request.
"""

from __future__ import annotations

import re

#: Datagram sizes, as Datadog's own clients use them.
UDP_MAX_BYTES = 1432
UNIX_MAX_BYTES = 8192
#: Datadog truncates longer tags.
MAX_TAG_LENGTH = 200

_NOT_TAG_CHARACTER = re.compile(r"[^A-Za-z0-9_\-:./]")
_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_\-:./]*")


def tag(key: str, value) -> str:
    """``key:value`` with every character Datadog would not keep turned into ``_``, at most 200 characters.

    That is what Datadog does to such characters anyway; on the wire it also
    keeps ``,`` (Envoy's ``UF,URX`` response flags), ``|``, ``#`` and newlines
    from breaking the line.
    """
    return _NOT_TAG_CHARACTER.sub("_", f"{key}:{value}")[:MAX_TAG_LENGTH]


def parse_tags(text: str) -> tuple[str, ...]:
    """The tags of ``--datadog-tags`` (``env:prod,team:payments``); ValueError saying what to write."""
    tags = tuple(item.strip() for item in text.split(",") if item.strip())
    for item in tags:
        if not _TAG.fullmatch(item) or len(item) > MAX_TAG_LENGTH:
            raise ValueError(f"--datadog-tags: {item!r} is not a Datadog tag: write KEY:VALUE pairs of letters, "
                             "digits and _ - : . / (starting with a letter), separated by commas, "
                             "e.g. env:prod,team:payments")
    return tags


def count_line(name: str, value: int, tags: str) -> str:
    """A COUNT line; ``tags`` is the comma-separated tag text (may be empty)."""
    return f"{name}:{value}|c|#{tags}" if tags else f"{name}:{value}|c"


def distribution_lines(name: str, values: str, rate: float, tags: str, max_bytes: int) -> list[str]:
    """DISTRIBUTION lines carrying ``values`` (formatted numbers joined with ``:``), packed several to a
    line, each line at most ``max_bytes`` long (but at least one value per line).

    ``rate`` below 1 is the sample rate the values were kept at (``|@RATE``):
    the agent counts each value ``1/RATE`` times.
    """
    suffix = "|d"
    if rate < 1.0:
        suffix += "|@" + format_rate(rate)
    if tags:
        suffix += "|#" + tags
    budget = max(1, max_bytes - len(name) - 1 - len(suffix))
    lines = []
    while len(values) > budget:
        cut = values.rfind(":", 0, budget + 1)
        if cut <= 0:  # one value longer than the budget: alone on its line
            cut = values.find(":")
            if cut < 0:
                break
        lines.append(f"{name}:{values[:cut]}{suffix}")
        values = values[cut + 1:]
    lines.append(f"{name}:{values}{suffix}")
    return lines


def format_rate(rate: float) -> str:
    """A sample rate in fixed-point notation (``0.0125``, never ``1.25e-02``), at least ``0.00000001``."""
    return f"{max(rate, 1e-8):.8f}".rstrip("0")


def datagrams(lines: list[str], max_bytes: int) -> list[bytes]:
    """``lines`` joined with newlines into as few datagrams of at most ``max_bytes`` as they fit in.

    A line longer than ``max_bytes`` by itself (tags longer than the
    datagram) goes alone in its datagram.
    """
    out, current, size = [], [], 0
    for line in lines:
        data = line.encode("utf-8")
        if current and size + 1 + len(data) > max_bytes:
            out.append(b"\n".join(current))
            current, size = [], 0
        size += len(data) + (1 if current else 0)
        current.append(data)
    if current:
        out.append(b"\n".join(current))
    return out
