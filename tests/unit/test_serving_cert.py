"""The control plane's serving certificate from a CA that may answer later or not at all, and the workload
agent's respect of Retry-After (mesh.control.serving_cert, mesh.identity.agent)."""

from __future__ import annotations

from cryptography import x509
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mesh.api import CAUnavailable
from mesh.control.serving_cert import ServingCertificate
from mesh.identity.agent import RenewError, WorkloadAgent, make_csr
from mesh.identity.ca import CertificateAuthority, generate_root, to_pem
from mesh.identity.tls import CredentialStore

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
