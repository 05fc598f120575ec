"""The control plane's serving certificate from a CA that may answer later or not at all, and the workload
agent's retry schedule: Retry-After respected, the certificate's expiry never passed
(mesh.control.serving_cert, mesh.identity.agent)."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mesh.api import CAUnavailable
from mesh.control.serving_cert import ServingCertificate
from mesh.identity.agent import RETRY_BEFORE_EXPIRY_MIN, RenewError, WorkloadAgent, make_csr
from mesh.identity.ca import CertificateAuthority, generate_root, to_pem
from mesh.identity.tls import CredentialStore, WorkloadCredentials

URI = "spiffe://cluster.local/ns/mesh-system/sa/mesh-control"
TTL = 3600.0


def new_ca(name="cluster.local") -> CertificateAuthority:
    key, cert = generate_root(name)
    return CertificateAuthority(key=key, cert=cert, chain=[], bundle=[cert], trust_domain="cluster.local")


def csr_of(key) -> x509.CertificateSigningRequest:
    return x509.load_pem_x509_csr(make_csr(key, URI))


class LaterCA:
    """A CA that answers each signature with a Deferred the test fires: a certificate, or CAUnavailable."""

    def __init__(self):
        self.ca = new_ca()
        self.pending = []

    def sign(self, key):
        answer = defer.Deferred()
        self.pending.append((key, answer))
        return answer

    def answer(self):
        key, answer = self.pending.pop(0)
        answer.callback(self.ca.sign(csr_of(key), URI, TTL))

    def refuse(self, reason="vault is sealed: unseal it"):
        _, answer = self.pending.pop(0)
        answer.errback(CAUnavailable(reason, 2.0))


def test_a_certificate_issued_later_is_installed_then_renewed_at_half_life():
    clock, ca = Clock(), LaterCA()
    serving = ServingCertificate(clock, ca.sign, ca.ca.bundle, TTL, "test certificate", issue_now=False)
    serving.startService()
    assert serving.credentials.current is None and not serving.issued.called
    ca.answer()
    assert serving.issued.called and serving.credentials.current.identity == URI
    first = serving.credentials.current
    clock.advance(TTL / 2)
    ca.answer()
    assert serving.credentials.current is not first
    serving.stopService()
    assert not clock.getDelayedCalls()


def test_an_unavailable_ca_is_asked_again_with_backoff_while_the_current_certificate_serves():
    clock, ca = Clock(), LaterCA()
    serving = ServingCertificate(clock, ca.sign, ca.ca.bundle, TTL, "test certificate", issue_now=False)
    serving.startService()
    ca.refuse()
    assert serving.credentials.current is None and not serving.issued.called
    delay, = [call.getTime() for call in clock.getDelayedCalls()]
    assert 0.8 <= delay <= 1.2  # the first step of the backoff
    clock.advance(delay)
    ca.answer()
    assert serving.issued.called
    current = serving.credentials.current
    clock.advance(TTL / 2)
    ca.refuse()
    assert serving.credentials.current is current  # still serving
    assert len(clock.getDelayedCalls()) == 1
    serving.stopService()


def test_a_new_bundle_keeps_key_and_certificate():
    ca = new_ca()
    serving = ServingCertificate(Clock(), lambda key: ca.sign(csr_of(key), URI, TTL), ca.bundle, TTL, "test")
    before = serving.credentials.current
    other = generate_root("other.example")[1]
    serving.set_bundle([ca.cert, other])
    after = serving.credentials.current
    assert after is not before and (after.key, after.chain) == (before.key, before.chain)
    assert set(after.bundle) == {ca.cert, other}
    serving.set_bundle([other, ca.cert])  # the same roots: nothing to rebuild
    assert serving.credentials.current is after


def test_the_agent_waits_at_least_the_retry_after_of_a_503():
    _, root = generate_root("cluster.local")
    clock = Clock()
    agent = WorkloadAgent(clock, ("127.0.0.1", 15012), to_pem([root]), None, None, "x", CredentialStore())
    agent.running = True
    agent._failed(Failure(RenewError("control plane refused the CSR (503): CA unavailable", retry_after=30.0)))
    assert [call.getTime() for call in clock.getDelayedCalls()] == [30.0]
    assert agent.last_error == "control plane refused the CSR (503): CA unavailable"


def test_the_agent_tries_again_before_its_certificate_expires():
    """However far the backoff has grown (and whatever Retry-After says), the next try comes within half the
    certificate's remaining life.  With 1.5 s left it once waited out the backoff: a control plane restarted
    twice in a row let a sidecar's short-lived certificate expire under traffic."""
    ca = new_ca()
    key = ec.generate_private_key(ec.SECP256R1())
    cert_pem, _ = ca.sign(csr_of(key), URI, 1.5)  # notAfter in whole seconds: 0.5 to 1.5 s from now
    leaf = x509.load_pem_x509_certificate(cert_pem)
    clock = Clock()
    agent = WorkloadAgent(clock, ("127.0.0.1", 15012), to_pem([ca.cert]), None, None, "x",
                          CredentialStore(WorkloadCredentials.build(key, [leaf], [ca.cert])))
    agent.running = True
    for _ in range(3):  # the backoff is now 8 s or so
        agent._backoff.next()
    agent._failed(Failure(RenewError("control plane unreachable", retry_after=30.0)))
    [retry] = clock.getDelayedCalls()
    assert RETRY_BEFORE_EXPIRY_MIN <= retry.getTime() <= 0.75
