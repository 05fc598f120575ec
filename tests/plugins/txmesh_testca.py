"""A CA plugin for tests: the CA ``testca``, that a test switches between ready, unavailable and broken.

It is loaded exactly as a third-party CA plugin is: through a ``mesh.plugins`` entry point of an
installed distribution (the test writes the distribution's metadata, ``txmesh_testca-1.0.dist-info``,
and puts it and this directory on mesh-control's ``PYTHONPATH``: see
tests/integration/test_external_ca.py).  ``mesh-control --ca testca`` selects it.

Its directory (``$TXMESH_TESTCA_DIR``) holds what the test controls:

- ``ca-key.pem``, ``ca-cert.pem``: the CA that signs (a root);
- ``state.json``: ``{"mode": "ready" | "unavailable" | "error", "reason": "...", "roots": ["a.pem", ...]}``,
  re-read on every call: ``unavailable`` makes ``mesh_ca_status`` say not ready (with ``reason``) and
  ``mesh_sign_csr`` fail with :class:`mesh.api.CAUnavailable` (Retry-After 1 s); ``error`` makes
  ``mesh_sign_csr`` raise a RuntimeError (a bug: a 500) -- for every CSR, or with ``"identity"`` only for
  that SPIFFE id's (the others are signed); ``roots`` are the files whose certificates are the CA's roots
  (during a rotation, old and new).

Signatures answer through a Deferred fired on the next reactor turn, as a CA behind a network
call would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer

from mesh import hookimpl
from mesh.api import CAStatus, CAUnavailable, SignedCertificate
from mesh.identity.ca import CertificateAuthority

NAME = "testca"


class SwitchableCA:
    """The ``testca`` CA; its state is the files of ``$TXMESH_TESTCA_DIR``."""

    def __init__(self):
        self.directory = Path(os.environ.get("TXMESH_TESTCA_DIR", "."))
        self.selected = False
        self.reactor = None
        self._ca = None

    def _state(self) -> dict:
        return json.loads((self.directory / "state.json").read_text())

    def _signer(self) -> CertificateAuthority:
        if self._ca is None:
            key = serialization.load_pem_private_key((self.directory / "ca-key.pem").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((self.directory / "ca-cert.pem").read_bytes())
            self._ca = CertificateAuthority(key=key, cert=cert, chain=[], bundle=[cert], trust_domain="cluster.local")
        return self._ca

    @hookimpl
    def mesh_configure(self, config):
        if config.role != "control":
            config.set_idle(self, "control plane only")
            return
        self.selected = config.option("ca") == NAME
        self.reactor = config.reactor

    @hookimpl
    def mesh_ca_status(self):
        state = self._state()
        ready = state["mode"] != "unavailable"
        roots = b"".join((self.directory / name).read_bytes() for name in state["roots"])
        return CAStatus(name=NAME, selected=self.selected, ready=ready,
                        reason="" if ready else state.get("reason", "unavailable"), roots_pem=roots,
                        issuer=f"testca {self.directory.name}")

    @hookimpl
    def mesh_sign_csr(self, csr, identity, ttl):
        if not self.selected:
            return None
        state = self._state()
        if state["mode"] == "error" and state.get("identity", identity) == identity:
            raise RuntimeError("txmesh_testca fails on purpose")
        answer = defer.Deferred()
        if state["mode"] == "unavailable":
            self.reactor.callLater(0, answer.errback, CAUnavailable(state.get("reason", "unavailable"), 1.0))
        else:
            self.reactor.callLater(0, answer.callback, SignedCertificate(*self._signer().sign(csr, identity, ttl)))
        return answer


plugin = SwitchableCA()
