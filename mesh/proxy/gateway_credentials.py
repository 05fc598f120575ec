"""The gateway's private copy of the Secrets the control plane sends it (``credentialName``).

A gateway proxy fed by ``mesh-control --kubernetes`` and started without
``--gateway-credentials-dir`` reads its Gateways' ``credentialName`` Secrets from
``STATE_DIR/gateway-credentials`` (:func:`private_dir`), laid out as a mounted Secret
(``NAME/tls.crt``, ``NAME/tls.key``, ``NAME/ca.crt``), so the compiler reads them as it
reads mounted ones (:mod:`mesh.config.gateway`).  :func:`write_credentials` makes that
directory hold exactly the Secrets of a snapshot: directories 0700, files 0600, each
file replaced atomically, a Secret no longer sent removed.  Nothing here logs a key.
"""

from __future__ import annotations

import os
import shutil

from mesh.protocol import CREDENTIAL_FILES

#: the directory of the state dir that holds the Secrets pushed to a gateway
DIRECTORY = "gateway-credentials"


def private_dir(state_dir) -> str:
    """Where a gateway with ``--state-dir state_dir`` keeps the Secrets pushed to it."""
    return os.path.join(os.fspath(state_dir), DIRECTORY)


def write_credentials(directory: str, secrets: dict) -> None:
    """Make ``directory`` hold exactly ``secrets`` (``{name: {file name: PEM}}``); raises OSError.

    Names and file names were checked (:func:`mesh.protocol.credentials_of`).
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    for name, files in secrets.items():
        secret_dir = os.path.join(directory, name)
        os.makedirs(secret_dir, mode=0o700, exist_ok=True)
        for file_name in CREDENTIAL_FILES:
            path = os.path.join(secret_dir, file_name)
            if file_name in files:
                _write_private(path, files[file_name].encode("ascii", "replace"))
            elif os.path.lexists(path):
                os.remove(path)
    for entry in os.listdir(directory):
        if entry not in secrets:
            path = os.path.join(directory, entry)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def _write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a 0600 temporary file renamed over it), unless it holds them."""
    try:
        with open(path, "rb") as handle:
            if handle.read() == data:
                return
    except FileNotFoundError:
        pass
    temporary = f"{path}.tmp-{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
