"""CA worker processes: CSR checks and built-in signing on every core (``mesh-control --ca-workers N``).

Two thirds of a CSR's cost is in ``cryptography``: verifying the CSR's signature (the caller's
proof that it holds the key) and signing the certificate.  ``cryptography`` holds the GIL while it
does either, so threads do not help.  With ``--ca-workers N`` the control plane starts N worker
processes (``python -m mesh.identity.ca_workers``); the control plane keeps TLS, HTTP, the
credential check and the answer, and a worker does the two costly steps:

- ``check``: :func:`mesh.identity.csr.check_csr` (signature, key type, the SAN the credential
  proves), for the CSRs an external CA signs;
- ``sign``: the checks of :func:`~mesh.identity.csr.check_csr` on the CSR's DER
  (:func:`~mesh.identity.csr.check_loaded_csr`), then :meth:`mesh.identity.ca.CertificateAuthority.sign`
  with the built-in CA: one trip to a worker per CSR (the control plane then only parses the CSR,
  :func:`mesh.identity.csr.load_csr`, and sends its DER: no second PEM parse).

Each worker reads the CA from the same files as the control plane (the state directory, or
``--ca-cert/--ca-key/--ca-chain``), with the same checks (the key must be mode 0600): the key is
never sent over a pipe, and never logged.  A request goes to the worker with the fewest requests
outstanding.  A worker that exits fails its outstanding requests with
:class:`mesh.api.CAUnavailable` (503 and ``Retry-After: 1``: the agent retries) and is started
again a second later; while no worker runs, the built-in CA reports itself not ready.

The pipe protocol (stdin/stdout of the worker): frames of a 4-byte big-endian length and a payload.
A request is ``op`` (one byte: ``c`` check, ``s`` sign), a 4-byte id and its fields; an answer is the
id, one status byte (``+`` done, ``-`` CSR rejected, ``!`` error) and its fields.  A field is a
4-byte length and its bytes.
"""

from __future__ import annotations

import argparse
import os
import signal
import struct
import sys
import traceback

from cryptography.hazmat.primitives import serialization
from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from mesh.api import CAUnavailable, SignedCertificate
from mesh.identity.csr import CSRRejected, check_csr, check_loaded_csr, load_csr

log = Logger()

#: Seconds before a worker that exited is started again (and the Retry-After of the CSRs it held).
RESTART_DELAY = 1.0
#: Seconds a worker has to exit once the control plane stops, before it is killed.
STOP_GRACE = 5.0
_LENGTH = struct.Struct(">I")
_CHECK, _SIGN = b"c", b"s"
_DONE, _REJECTED, _FAILED = b"+", b"-", b"!"


def encode_fields(*fields: bytes) -> bytes:
    """``fields`` as one byte string, each as its 4-byte length and its bytes."""
    return b"".join(_LENGTH.pack(len(field)) + field for field in fields)


def decode_fields(data: bytes) -> list:
    """The fields :func:`encode_fields` made ``data`` of."""
    fields, offset = [], 0
    while offset < len(data):
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        fields.append(data[offset:offset + length])
        offset += length
    return fields


# -- the worker process ------------------------------------------------------------------------
def answer(ca, payload: bytes) -> bytes:
    """The answer of the worker holding ``ca`` to one request ``payload``."""
    op, request_id, fields = payload[:1], payload[1:5], decode_fields(payload[5:])
    try:
        if op == _CHECK:
            check_csr(fields[0], fields[1].decode())
            return request_id + _DONE
        if op == _SIGN:
            uri = fields[1].decode()
            cert_pem, _ = ca.sign(check_loaded_csr(load_csr(fields[0], der=True), uri), uri, float(fields[2]))
            return request_id + _DONE + encode_fields(cert_pem)
        raise ValueError(f"unknown request {op!r}")
    except CSRRejected as rejected:
        return request_id + _REJECTED + str(rejected).encode()
    except Exception as failure:  # a bug: its traceback goes to the control plane's log through stderr
        traceback.print_exc(file=sys.stderr)
        return request_id + _FAILED + f"{type(failure).__name__}: {failure}".encode()


def serve(reader, writer, ca) -> None:
    """Answer the framed requests of ``reader`` on ``writer`` until ``reader`` ends (the control plane left)."""
    while True:
        header = reader.read(4)
        if len(header) < 4:
            return
        payload = reader.read(_LENGTH.unpack(header)[0])
        reply = answer(ca, payload)
        writer.write(_LENGTH.pack(len(reply)) + reply)
        writer.flush()


def main(argv=None) -> int:
    """``python -m mesh.identity.ca_workers --state-dir DIR --trust-domain TD [--ca-cert ...]``: one worker."""
    from mesh.identity.ca import CAError, CertificateAuthority

    parser = argparse.ArgumentParser(prog="python -m mesh.identity.ca_workers", description=main.__doc__)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--trust-domain", required=True)
    parser.add_argument("--ca-cert")
    parser.add_argument("--ca-key")
    parser.add_argument("--ca-chain")
    options = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C reaches the process group: the control plane stops us
    try:
        ca = CertificateAuthority.load(options.state_dir, options.trust_domain, options.ca_cert, options.ca_key,
                                       options.ca_chain)
    except CAError as failure:
        sys.stderr.write(f"CA worker cannot load the CA: {failure}\n")
        return 1
    serve(sys.stdin.buffer, sys.stdout.buffer, ca)
    return 0


# -- the control plane's side ------------------------------------------------------------------
class _Worker(protocol.ProcessProtocol):
    """One worker process: its outstanding requests (id -> Deferred) and the bytes of a partial answer."""

    def __init__(self, pool, number: int):
        self.pool = pool
        self.number = number
        self.pending = {}
        self.buffer = b""
        self.ended = defer.Deferred()
        self.alive = True

    def send(self, request_id: int, op: bytes, fields: bytes) -> defer.Deferred:
        d = self.pending[request_id] = defer.Deferred()
        payload = op + _LENGTH.pack(request_id) + fields
        self.transport.write(_LENGTH.pack(len(payload)) + payload)
        return d

    def outReceived(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        offset, size = 0, len(buffer)
        while size - offset >= 4:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if size - offset - 4 < length:
                break
            reply = buffer[offset + 4:offset + 4 + length]
            offset += 4 + length
            self._answered(reply)
        self.buffer = buffer[offset:]

    def _answered(self, reply: bytes) -> None:
        d = self.pending.pop(_LENGTH.unpack_from(reply)[0], None)
        if d is None:
            return
        status, rest = reply[4:5], reply[5:]
        if status == _DONE:
            d.callback(rest)
        elif status == _REJECTED:
            d.errback(CSRRejected(rest.decode()))
        else:
            d.errback(RuntimeError(f"CA worker {self.number} failed: {rest.decode(errors='replace')}"))

    def errReceived(self, data: bytes) -> None:
        for line in data.decode(errors="replace").splitlines():
            log.error("CA worker {number}: {line}", number=self.number, line=line)

    def processEnded(self, reason) -> None:
        self.alive = False
        how = "exited" if reason.check(error.ProcessDone, error.ProcessTerminated) else "ended"
        detail = reason.getErrorMessage()
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(CAUnavailable(f"CA worker {self.number} {how} ({detail}) while signing; retry",
                                    RESTART_DELAY))
        self.ended.callback(None)
        self.pool.worker_ended(self, f"{how} ({detail})")


class CAWorkers(service.Service):
    """``size`` CA worker processes, started with the service and stopped with it.

    :param argv: the command that starts one worker (:func:`worker_argv`).
    :param chain_pem: the chain the built-in CA's certificates come with (the CA's ``chain_pem()``).
    """

    def __init__(self, reactor, argv: list, size: int, chain_pem: bytes, env=None):
        self.reactor = reactor
        self.argv = argv
        self.size = size
        self.chain_pem = chain_pem
        self.env = dict(os.environ if env is None else env)
        self.workers = []
        self._next_id = 0
        self._restarts = {}

    def startService(self):
        super().startService()
        self.workers = [self._spawn(number) for number in range(self.size)]

    def stopService(self):
        super().stopService()
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        alive = [worker for worker in self.workers if worker.alive]
        for worker in alive:
            worker.transport.closeStdin()  # the worker's read ends: it exits
        # one that does not (stopped, wedged) is killed, so that mesh-control's shutdown never hangs on it
        kill = self.reactor.callLater(STOP_GRACE, self._kill, alive)
        done = defer.DeferredList([worker.ended for worker in alive])
        done.addBoth(lambda result: kill.cancel() if kill.active() else None)
        return done

    @staticmethod
    def _kill(workers) -> None:
        for worker in workers:
            if worker.alive:
                log.warn("CA worker {number} did not exit within {grace:g} s of the control plane's stop; "
                         "killing it", number=worker.number, grace=STOP_GRACE)
                worker.transport.signalProcess("KILL")

    def _spawn(self, number: int) -> _Worker:
        worker = _Worker(self, number)
        self.reactor.spawnProcess(worker, self.argv[0], self.argv, env=self.env)
        return worker

    def worker_ended(self, worker: _Worker, how: str) -> None:
        """A worker process ended: start it again after :data:`RESTART_DELAY` while the service runs."""
        if not self.running:
            return
        log.error("CA worker {number} {how}; starting it again in {delay:g} s", number=worker.number, how=how,
                  delay=RESTART_DELAY)
        self._restarts[worker.number] = self.reactor.callLater(RESTART_DELAY, self._restart, worker.number)

    def _restart(self, number: int) -> None:
        del self._restarts[number]
        self.workers[number] = self._spawn(number)

    def ready(self) -> bool:
        """Whether a worker runs, or will as the service starts (else every CSR would be answered 503)."""
        return not self.workers or any(worker.alive for worker in self.workers)

    def _call(self, op: bytes, *fields: bytes) -> defer.Deferred:
        alive = [worker for worker in self.workers if worker.alive]
        if not alive:
            return defer.fail(CAUnavailable("no CA worker is running (they are being started again)",
                                            RESTART_DELAY))
        worker = min(alive, key=lambda candidate: len(candidate.pending))
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        return worker.send(self._next_id, op, encode_fields(*fields))

    def csr_check(self, builtin_selected: bool):
        """The ``check`` of :class:`mesh.control.csr_api.CSRResource`: with the built-in CA selected only
        :func:`~mesh.identity.csr.load_csr` (:meth:`sign` checks in the worker), else :meth:`check`."""
        return _parse_only if builtin_selected else self.check

    def check(self, pem: bytes, expected_uri: str) -> defer.Deferred:
        """:func:`mesh.identity.csr.check_csr` in a worker: a Deferred of the CSR, or failing with CSRRejected."""
        d = self._call(_CHECK, pem, expected_uri.encode())
        d.addCallback(lambda _: load_csr(pem))
        return d

    def sign(self, csr, spiffe_uri: str, ttl: float) -> defer.Deferred:
        """The checks of :func:`~mesh.identity.csr.check_csr` on ``csr`` for ``spiffe_uri``, then the built-in CA's
        :meth:`~mesh.identity.ca.CertificateAuthority.sign`, in a worker: a Deferred of
        :class:`mesh.api.SignedCertificate`, or failing with CSRRejected."""
        d = self._call(_SIGN, csr.public_bytes(serialization.Encoding.DER), spiffe_uri.encode(), repr(ttl).encode())
        d.addCallback(lambda fields: SignedCertificate(decode_fields(fields)[0], self.chain_pem))
        return d


def _parse_only(pem: bytes, expected_uri: str):
    return load_csr(pem)


def worker_argv(state_dir: str, trust_domain: str, ca_cert=None, ca_key=None, ca_chain=None) -> list:
    """The command that starts one CA worker for the CA of these files (paths, never key material)."""
    argv = [sys.executable, "-m", "mesh.identity.ca_workers", "--state-dir", os.path.abspath(state_dir),
            "--trust-domain", trust_domain]
    for flag, path in (("--ca-cert", ca_cert), ("--ca-key", ca_key), ("--ca-chain", ca_chain)):
        if path:
            argv += [flag, os.path.abspath(path)]
    return argv


if __name__ == "__main__":
    sys.exit(main())
