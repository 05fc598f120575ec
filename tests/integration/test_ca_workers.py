"""``mesh-control --ca-workers N``: CSRs checked and signed in worker processes (mesh.identity.ca_workers).

The answers are the ones the control plane gives without workers (same certificate shape, same
rejections); a worker that dies fails only the CSRs it held, with 503 and Retry-After, and is started
again; the workers end with the control plane; the CA key never appears on their command line.
"""

from __future__ import annotations

import fcntl
import os
import signal
import termios
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness import wait_for
from tests.integration.test_identity_csr_api import NS, csr_for, post, spiffe
from tests.integration.test_identity_support import assert_no_secrets_in_logs
from tests.unit.test_identity_ca import openssl_verify

WORKERS = 2


def worker_pids(control) -> list[int]:
    """The pids of the control plane's CA workers (its child processes running mesh.identity.ca_workers)."""
    pids = []
    with open(f"/proc/{control.pid}/task/{control.pid}/children") as children:
        for pid in map(int, children.read().split()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    argv = cmdline.read().split(b"\0")
            except FileNotFoundError:
                continue
            if b"mesh.identity.ca_workers" in argv:
                pids.append(pid)
    return pids


@pytest.fixture(scope="module")
def control(control_factory):
    return control_factory(workload_cert_ttl="1h", extra_args=["--ca-workers", str(WORKERS)])


@pytest.fixture(scope="module")
def token(control):
    return control.token(NS, "teller")


def test_workers_sign_istio_shaped_certificates(control, token, tmp_path):
    assert len(worker_pids(control)) == WORKERS
    key = ec.generate_private_key(ec.SECP256R1())
    answer = post(control, {"credential": token, "csr": csr_for("teller", key), "ttl": 600})
    assert answer.status == 200, answer
    doc = answer.json()
    cert = x509.load_pem_x509_certificate(doc["certificate"].encode())
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(spiffe(NS, "teller"))]
    assert doc["trust_bundle"] == control.root_cert.read_text()
    verified = openssl_verify(tmp_path, doc["certificate"].encode(), doc["trust_bundle"].encode(),
                              doc["chain"].encode())
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_workers_reject_as_the_control_plane_does(control, token):
    other = post(control, {"credential": token, "csr": csr_for("auditor")})
    assert other.status == 403, other
    assert other.json()["error"] == (f"CSR rejected: CSR asks for [{spiffe(NS, 'auditor')}] but the credential "
                                     f"proves {spiffe(NS, 'teller')}")
    garbage = post(control, {"credential": token, "csr": "not a CSR"})
    assert garbage.status == 400, garbage
    assert "malformed CSR" in garbage.json()["error"]


def test_the_key_is_never_on_a_worker_command_line(control):
    key = (control.state_dir / "ca-key.pem").read_bytes()
    for pid in worker_pids(control):
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read()
        assert b"PRIVATE KEY" not in argv and key not in argv
        assert os.fspath(control.state_dir).encode() in argv


def test_a_dead_worker_fails_only_what_it_held_and_is_started_again(control, token):
    workers = worker_pids(control)
    for pid in workers:  # stopped, so that the next CSR is held by a worker when it dies
        os.kill(pid, signal.SIGSTOP)
    held = {}
    request = threading.Thread(target=lambda: held.setdefault("answer", post(control, {
        "credential": token, "csr": csr_for("teller")})))
    request.start()
    try:
        wait_for(lambda: any(_in_pipe(pid) for pid in workers), timeout=10,
                 what="the CSR reaching a stopped worker")
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    request.join(20)
    answer = held["answer"]
    assert answer.status == 503, answer
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["error"].startswith("CA unavailable: CA worker ")
    wait_for(lambda: len(worker_pids(control)) == WORKERS and not set(worker_pids(control)) & set(workers),
             timeout=20, what="the CA workers started again")
    again = post(control, {"credential": token, "csr": csr_for("teller")})
    assert again.status == 200, again
    assert "CA worker 0 exited" in control.log_tail(200) or "CA worker 1 exited" in control.log_tail(200)
    assert_no_secrets_in_logs([control], tokens=[token], key_files=[control.state_dir / "ca-key.pem"])


def _in_pipe(pid: int) -> bool:
    """Whether bytes wait in the stdin pipe of process ``pid`` (a request the stopped worker holds)."""
    with open(f"/proc/{pid}/fd/0", "rb", buffering=0) as pipe:
        size = bytearray(4)
        fcntl.ioctl(pipe.fileno(), termios.FIONREAD, size)
    return int.from_bytes(size, "little") > 0


def test_the_workers_end_with_the_control_plane(control):
    """Last: it stops the module's control plane. A wedged worker (stopped here) is killed, not waited for."""
    workers = worker_pids(control)
    assert len(workers) == WORKERS
    os.kill(workers[0], signal.SIGSTOP)
    code = control.stop(timeout=20)  # SIGTERM; the harness kills it (-9) only if it does not end in 20 s
    assert code != -signal.SIGKILL, control.describe("mesh-control did not stop by itself")
    # the stopped one is the first child listed, whichever worker index it has (they restart in any order)
    tail = control.log_tail(20)
    assert any(f"CA worker {index} did not exit within 5 s of the control plane's stop; killing it" in tail
               for index in range(WORKERS)), tail
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), timeout=10,
             what="the CA worker ending with the control plane")
