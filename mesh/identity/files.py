"""Writing secrets and certificates to disk with the right modes."""

from __future__ import annotations

import os


def write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only (0600), atomically.

    The file is created 0600 from the start (never world-readable, not even
    for a moment) and renamed into place.
    """
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_public(path: str, data: bytes) -> None:
    """Write a public file (certificates, bundles) with mode 0644, atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
