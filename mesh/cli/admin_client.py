"""HTTP clients of the admin ports (sidecars', control plane's), and plain-text tables, for meshctl."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


class AdminError(Exception):
    """An admin port could not be read; the message says what to do."""


def parse_address(text: str, default_port: int) -> tuple:
    """``HOST:PORT``, ``:PORT``, ``PORT`` or ``HOST`` -> ``(host, port)``."""
    host, _, port = text.rpartition(":") if ":" in text else ("", "", text)
    if not port.isdigit():
        host, port = text, str(default_port)
    return (host.strip("[]") or "127.0.0.1"), int(port)


def fetch_json(host: str, port: int, path: str, what: str, hint: str, timeout: float = 5.0,
               statuses: tuple = (200,)):
    """GET ``http://host:port/path`` and parse JSON; :class:`AdminError` with ``hint`` on failure.

    ``statuses``: the statuses whose JSON body is the answer (``/ready`` of a control plane that is not
    ready answers 503 with the same document).
    """
    url = f"http://{host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        if error.code not in statuses:
            raise AdminError(f"{what} at {url} answered {error.code} {error.reason}; {hint}") from None
        body = error.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise AdminError(f"cannot reach {what} at {url}: {reason}; {hint}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise AdminError(f"{what} at {url} did not answer JSON; is that the right port? {hint}") from None


def table(headers, rows) -> str:
    """A plain-text table: columns as wide as their widest cell, two spaces apart."""
    rows = [[("-" if cell is None or cell == "" else str(cell)) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [list(headers)] + rows]
    return "\n".join(lines)
