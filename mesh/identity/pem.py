"""The DER inside PEM armor, read with binascii.

cryptography's ``load_pem_x509_*`` find the block with a parser that walks the text byte by byte:
on mesh-control's CSR path that was 40 to 70 K instructions per PEM, more than parsing the DER
itself.  Removing the armor here and loading the DER costs a fraction of it.  The base64 is decoded
strictly (whitespace aside), as cryptography does.
"""

from __future__ import annotations

import binascii


def pem_der(pem: bytes, labels: tuple[bytes, ...]) -> bytes:
    """The DER of the first ``-----BEGIN <label>-----`` block of ``pem``, for the first of ``labels`` found.

    Raises ValueError when no block has one of ``labels``, or its base64 is malformed.
    """
    for label in labels:
        begin = pem.find(b"-----BEGIN " + label + b"-----")
        if begin >= 0:
            start = begin + len(label) + 16
            end = pem.index(b"-----END " + label + b"-----", start)
            return binascii.a2b_base64(b"".join(pem[start:end].split()), strict_mode=True)
    raise ValueError(f"no PEM block {' or '.join(label.decode() for label in labels)}")
