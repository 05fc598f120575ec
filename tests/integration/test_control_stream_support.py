"""Shared helpers of the hostile config-stream tests (tests/integration/test_control_stream_*.py); no tests here.

- :func:`mesh_certificate`: a real workload certificate from the control plane's CSR API (join token + CSR),
  written to files, as any holder of a join token can get one
- :class:`RawStream`: a config-stream client speaking the wire format by hand (docs/protocol.md) over mutual
  TLS with such a certificate: it sends whatever a test wants, valid or not
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.integration.test_identity_support import spiffe
from tests.unit.test_identity_csr import build_csr

MAGIC = b"TXM1"


def _server_context(control) -> ssl.SSLContext:
    """Trusts the mesh root; the control plane is named by a SPIFFE URI SAN, not a host name."""
    context = ssl.create_default_context(cafile=str(control.root_cert))
    context.check_hostname = False
    return context


def mesh_certificate(control, namespace: str, service_account: str, directory: Path) -> tuple[Path, Path]:
    """``(cert_chain_path, key_path)`` of a certificate for ``spiffe://.../ns/NS/sa/SA`` signed by ``control``."""
    key = ec.generate_private_key(ec.SECP256R1())
    body = json.dumps({"credential": control.token(namespace, service_account),
                       "csr": build_csr(key, sans=(spiffe(namespace, service_account),)).decode()}).encode()
    conn = http.client.HTTPSConnection("127.0.0.1", control.port, context=_server_context(control), timeout=20)
    try:
        conn.request("POST", "/v1/csr", body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        answer = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise AssertionError(f"CSR for {namespace}/{service_account} answered {response.status}: {answer[:300]!r}")
    doc = json.loads(answer)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{namespace}-{service_account}.pem"
    key_path = directory / f"{namespace}-{service_account}-key.pem"
    cert_path.write_text(doc["certificate"] + doc["chain"])
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class RawStream:
    """One config stream opened by hand: TLS with a client certificate, the magic, then frames.

    ``send(kind, **fields)`` writes a well-formed frame; ``send_raw(data)`` writes any bytes.
    ``read_frame()`` returns the next frame from the control plane as a dict, or None once it closed
    the stream.
    """

    def __init__(self, control, certificate: tuple[Path, Path], timeout: float = 10.0):
        context = _server_context(control)
        context.load_cert_chain(*map(str, certificate))
        raw = socket.create_connection(("127.0.0.1", control.port), timeout=timeout)
        self.sock = context.wrap_socket(raw)
        self.sock.sendall(MAGIC)
        self._buffer = b""

    def send(self, kind: str, **fields) -> None:
        body = json.dumps({"type": kind, "v": 1, **fields}).encode()
        self.send_raw(len(body).to_bytes(4, "big") + body)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_until_closed(self, data: bytes, chunk: int = 256 * 1024) -> int:
        """Write ``data`` in chunks until all is sent or the control plane closed the stream; bytes sent."""
        sent = 0
        try:
            for start in range(0, len(data), chunk):
                self.sock.sendall(data[start:start + chunk])
                sent += len(data[start:start + chunk])
        except (ssl.SSLError, OSError):
            pass
        return sent

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
            return b""

    def read_frame(self):
        """The next frame (a dict), or None when the stream is closed."""
        while True:
            if len(self._buffer) >= 4:
                size = int.from_bytes(self._buffer[:4], "big")
                if len(self._buffer) >= 4 + size:
                    body, self._buffer = self._buffer[4:4 + size], self._buffer[4 + size:]
                    return json.loads(body)
            data = self._recv()
            if not data:
                return None
            self._buffer += data

    def frames_until_closed(self, timeout: float = 10.0) -> tuple[list, bool]:
        """``(frames, closed)``: what the control plane sent until it closed the stream (``closed``) or
        ``timeout`` seconds passed (PINGs included)."""
        deadline = time.monotonic() + timeout
        frames = []
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                frame = self.read_frame()
            except TimeoutError:
                break
            if frame is None:
                return frames, True
            frames.append(frame)
        return frames, False

    def refusal(self, timeout: float = 10.0) -> str:
        """The reason of the ERROR frame the control plane closed the stream with (AssertionError if none)."""
        frames, closed = self.frames_until_closed(timeout)
        errors = [frame["reason"] for frame in frames if frame.get("type") == "ERROR"]
        assert closed and errors, f"expected an ERROR frame and the stream closed; closed={closed}, frames={frames}"
        return errors[0]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
