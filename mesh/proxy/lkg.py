"""The last-known-good snapshot of a sidecar, persisted in ``--state-dir``.

After every snapshot it applied (and ACKed), the proxy writes it to
``STATE/lkg-snapshot.json`` (written to a temporary file, then renamed: a crash
never leaves half a file).  At start, a proxy that gets its config from the
control plane loads this file first, so it can serve while the control plane
is down.  The file holds config and the trust bundle, no key: mode 0644.
"""

from __future__ import annotations

import json
import os

FILE_NAME = "lkg-snapshot.json"
FORMAT = 1


def path_in(state_dir) -> str:
    return os.path.join(os.fspath(state_dir), FILE_NAME)


def save(state_dir, snapshot: dict) -> str:
    """Write ``snapshot`` (a SNAPSHOT message: version, resources, trust_bundle) atomically."""
    os.makedirs(state_dir, exist_ok=True)
    path = path_in(state_dir)
    document = {"format": FORMAT, "version": snapshot["version"], "resources": snapshot["resources"],
                "trust_bundle": snapshot.get("trust_bundle", "")}
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(document, handle, separators=(",", ":"), default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)
    return path


def load(state_dir):
    """The saved snapshot ``{"version", "resources", "trust_bundle"}``, or None if there is none.

    Raises ValueError when the file exists but cannot be used.
    """
    path = path_in(state_dir)
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the last-known-good snapshot {path}: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT \
            or not isinstance(document.get("version"), str) or not isinstance(document.get("resources"), list):
        raise ValueError(f"{path} is not a txmesh snapshot (format {FORMAT}); delete it")
    return document
