"""Session resumption by the sidecar's upstream mTLS client, and what keeps a resumed session bound to its peer.

The upstream endpoints are :mod:`tests.apps.tls_peer` processes: real mTLS servers (certificates from the
mesh CA, TLS 1.3 tickets on) that answer every request with how its connection was made (``reused``)
and which client certificate it is bound to.  Every DestinationRule caps connections at one request,
so every request is a new connection and a new handshake.

- The sidecar resumes the session of its previous connection to the same peer.
- A session is never offered for another expected identity: an endpoint expected to be someone else
  is refused (identity mismatch), whatever was resumed before.
- A session is not offered once the peer's certificate has expired (the full handshake then fails,
  as it must; the test peer itself would accept the old session).
- When the sidecar's own certificate rotates, its sessions go with it: the next handshake is a full
  one, with the new certificate.
"""

from __future__ import annotations

import datetime
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.harness import free_port
from tests.harness.processes import ManagedProcess
from tests.harness.waiting import wait_for
from tests.integration.test_identity_support import issue_cert, mesh_ca, mesh_endpoint, spiffe
from tests.integration.test_proxy_support import destination_rule, service_entry, write_config

NS = "shop"
TLS_PEER = Path(__file__).resolve().parents[1] / "apps" / "tls_peer.py"
ONE_REQUEST_PER_CONNECTION = {"connectionPool": {"http": {"maxRequestsPerConnection": 1}}}


class TlsPeer(ManagedProcess):
    """``python tests/apps/tls_peer.py`` with a certificate for ``service_account``, issued by ``ca``."""

    kind = "tls-peer"

    def __init__(self, directory: Path, ca, bundle: Path, service_account: str, port: int, *, not_after=None):
        self.port = port
        cert, key = issue_cert(directory, f"peer-{service_account}-{port}", ca, spiffe(NS, service_account),
                               not_after=not_after)
        super().__init__(service_account, [sys.executable, TLS_PEER, "--port", port, "--cert", cert, "--key", key,
                                           "--ca", bundle], directory / f"tls-peer-{service_account}-{port}.log")

    def is_ready(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True


def routes(ports: dict) -> list:
    """A ServiceEntry (one endpoint: ``ports[name]``, expected service account ``name``) and a
    one-request-per-connection DestinationRule per name; ``impostor`` is ``ledger``'s port, expected as
    ``auditor``."""
    documents = []
    for name, port in ports.items():
        account = "auditor" if name == "impostor" else name
        documents += [service_entry(name, [mesh_endpoint(port, account)], namespace=NS),
                      destination_rule(name, name, namespace=NS, traffic_policy=ONE_REQUEST_PER_CONNECTION)]
    return documents


@pytest.fixture(scope="module")
def mesh(control_factory, proxy_factory, tmp_path_factory):
    """``(control, frontend sidecar, ports, work dir)``: the sidecar's config routes ``ledger``,
    ``impostor`` and ``short-lived`` (its peer is started by its test)."""
    control = control_factory()
    work = tmp_path_factory.mktemp("tls-resumption")
    ports = {"ledger": free_port(), "short-lived": free_port()}
    ports["impostor"] = ports["ledger"]
    frontend = proxy_factory(write_config(work / "config", *routes(ports)), "frontend", namespace=NS,
                             extra_args=control.proxy_args(NS, "frontend"))
    return control, frontend, ports, work


@pytest.fixture(scope="module")
def ledger(mesh):
    control, _, ports, work = mesh
    with TlsPeer(work, mesh_ca(control.state_dir), control.root_cert, "ledger", ports["ledger"]) as peer:
        yield peer.start()


def call(sidecar, host: str) -> dict:
    """One request through ``sidecar`` to ``host``: what the peer says about the connection."""
    result = sidecar.curl(host, "/")
    assert result.status == 200, result
    return result.json()


def resumed_pair(sidecar, host: str) -> tuple[dict, dict]:
    """Two requests in a row, the second resumed; retried while a certificate rotation falls between them."""
    def attempt():
        first, second = call(sidecar, host), call(sidecar, host)
        return (first, second) if second["reused"] and first["client_sha256"] == second["client_sha256"] else None
    return wait_for(attempt, timeout=20, what=f"a resumed connection to {host}")


def test_the_next_connection_resumes_the_session(mesh, ledger):
    _, frontend, _, _ = mesh
    first, second = call(frontend, "ledger"), call(frontend, "ledger")
    assert not first["reused"] and second["reused"], (first, second)
    assert second["connection"] > first["connection"], (first, second)
    assert second["client_sha256"] == first["client_sha256"]
    assert call(frontend, "ledger")["reused"]  # the resumed connection's own session is kept in turn


def test_a_session_is_not_offered_to_another_expected_identity(mesh, ledger):
    """``impostor`` is ledger's port, expected as sa/auditor: ledger's sessions must not make it pass."""
    _, frontend, _, _ = mesh
    resumed_pair(frontend, "ledger")
    for _ in range(3):
        result = frontend.curl("impostor", "/")
        assert result.status == 503 and "identity mismatch" in result.body.decode(), result
        assert spiffe(NS, "auditor") in result.body.decode() and spiffe(NS, "ledger") in result.body.decode()
    assert call(frontend, "ledger")["reused"]


def test_a_session_is_not_offered_past_the_peers_certificate(mesh):
    """Once the peer's certificate has expired, its session is not offered: the full handshake fails."""
    control, frontend, ports, work = mesh
    not_after = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) + datetime.timedelta(seconds=4)
    with TlsPeer(work, mesh_ca(control.state_dir), control.root_cert, "short-lived", ports["short-lived"],
                 not_after=not_after) as peer:
        peer.start()
        resumed_pair(frontend, "short-lived")
        wait_for(lambda: time.time() > not_after.timestamp() + 1, timeout=15, what="the peer certificate to expire")
        resumed_before = peer.log_path.read_text().count("reused=True")
        result = frontend.curl("short-lived", "/")
        assert result.status == 503 and "UF" in result.headers.get("x-mesh-flags", ""), result
        assert peer.log_path.read_text().count("reused=True") == resumed_before, peer.describe("resumed after expiry")


def test_sessions_go_with_the_sidecars_rotated_certificate(proxy_factory, mesh, ledger):
    control, _, ports, work = mesh
    rotating = proxy_factory(write_config(work / "rotating-config", *routes(ports)), "frontend", namespace=NS,
                             extra_args=control.proxy_args(NS, "frontend", cert_ttl="6s"))
    _, resumed = resumed_pair(rotating, "ledger")
    before = resumed["client_sha256"]
    serial = rotating.admin("/config_dump")["certificate"]["serial"]
    wait_for(lambda: rotating.admin("/config_dump")["certificate"]["serial"] != serial, timeout=20,
             what="the sidecar's certificate to rotate")
    after = call(rotating, "ledger")
    assert not after["reused"] and after["client_sha256"] != before, (resumed, after)
