"""The real ``curl`` binary as an HTTP client for tests."""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class CurlResult:
    """What one curl run returned.

    ``status`` is 0 when no response arrived; then ``exit_code`` and ``error``
    say why (curl's exit code and its stderr). ``headers`` has lower-case names,
    repeated headers joined with ", ". ``info`` is curl's ``--write-out %{json}``
    (``http_version``, ``time_total``, ``num_connects``, ...).
    """

    status: int
    headers: dict[str, str]
    body: bytes
    exit_code: int
    error: str
    info: dict = field(repr=False)

    def json(self):
        """The body parsed as JSON."""
        return json.loads(self.body)


def curl(url: str, *, method: str | None = None, host: str | None = None, headers=None,
         data: bytes | str | Path | None = None, output: Path | None = None, timeout: float = 10.0,
         extra_args=()) -> CurlResult:
    """Run ``curl -sS`` on *url* and return its :class:`CurlResult`; never raises for HTTP or network errors.

    :param host: sent as the ``Host`` header (the outbound listener routes by it).
    :param headers: a mapping or (name, value) pairs.
    :param data: request body: bytes or str, or a Path to send the file's contents.
    :param output: write the response body to this file instead of ``result.body`` (for big bodies).
    :param extra_args: more curl arguments, e.g. ``["-T", path]`` to stream an upload,
        ``["--http2-prior-knowledge"]``.
    """
    with tempfile.TemporaryDirectory(prefix="txmesh-curl-") as tmp:
        body_path = Path(output) if output else Path(tmp) / "body"
        argv = ["curl", "-sS", "--max-time", str(timeout), "-o", str(body_path), "-w", "%{json}\n%{header_json}"]
        if method:
            argv += ["-X", method]
        if host:
            argv += ["-H", f"Host: {host}"]
        pairs = headers.items() if hasattr(headers, "items") else (headers or ())
        for name, value in pairs:
            argv += ["-H", f"{name}: {value}"]
        if data is not None:
            if not isinstance(data, Path):
                Path(tmp, "request").write_bytes(data.encode() if isinstance(data, str) else data)
                data = Path(tmp, "request")
            argv += ["--data-binary", f"@{data}"]
        argv += [*map(str, extra_args), url]
        proc = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout + 5)
        body = b"" if output or not body_path.exists() else body_path.read_bytes()
    decoder = json.JSONDecoder()
    text = proc.stdout.decode("utf-8", "replace")
    info, end = decoder.raw_decode(text)
    raw_headers = decoder.raw_decode(text[end:].lstrip())[0] if text[end:].strip() else {}
    return CurlResult(
        status=int(info.get("http_code") or 0),
        headers={name.lower(): ", ".join(values) for name, values in raw_headers.items()},
        body=body,
        exit_code=proc.returncode,
        error=proc.stderr.decode("utf-8", "replace").strip(),
        info=info,
    )
