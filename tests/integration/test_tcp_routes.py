"""TCP and TLS routes through two sidecars with mTLS (issue #12, "TCP and TLS routes"), for real.

::

    this test (the app) ---> client sidecar, explicit TCP listeners (--outbound-tcp-port), one per service port
      ECHO (TCP)    VirtualService tcp: 20 % subset v1, 80 % v2 -> echo-v1 / echo-v2 sidecars (mTLS) -> banner servers
      TLS  (TLS)    by SNI: a.example.com -> tls-a sidecar (mTLS) -> TLS server (certificate for a.example.com)
                            b.example.com -> a TLS server outside the mesh (plaintext TCP to it: TLS end to end)
                            old.example.com -> VirtualService tls route to a.example.com; other names: closed (NR)
      VAULT (TCP)   vault sidecar -> echo server; its AuthorizationPolicies change per test (SIGHUP);
                    TCP keepalive on the client sidecar's connections to it (DestinationRule tcpKeepalive)
      DEAD (TCP)    an endpoint nobody listens on (UF); maxConnections 1
      FLAKY (TCP)   round robin over a dead endpoint and a live one (the v1 banner server, no sidecar):
                    outlier detection ejects the dead one after its connect failure
      IMPOSTOR (TCP) the vault sidecar, but expected to be sa/echo: the identity check fails (UF); maxConnections 1
      CAPPED (TCP)  the vault's echo server (no sidecar), with a DestinationRule maxConnections 2 (a third: UO)

The echo-v2 sidecar also has an explicit VAULT listener: a second caller, with identity sa/echo.
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness import ManagedProcess, connections_to, free_port, venv_bin, wait_for
from tests.integration.test_identity_support import (
    TLS_MODE_ISTIO,
    authorization_policy,
    issue_cert,
    make_ca,
    peer_authentication,
    spiffe,
    static_identity_args,
)
from tests.integration.test_proxy_support import write_config
from tests.integration.test_telemetry_support import total

NS = "shop"
NETWORKING = "networking.istio.io/v1"
PEERS = Path(__file__).resolve().parents[1] / "apps" / "tcp_peers.py"
# the service port numbers, which are also the client sidecar's explicit TCP listeners
ECHO, TLS, VAULT, DEAD, FLAKY, IMPOSTOR, CAPPED = (free_port() for _ in range(7))
WEIGHTS = {"v1": 20, "v2": 80}
SECOND_CALLER = "127.0.0.2"  # the echo-v2 sidecar's outbound address: its explicit VAULT listener


class TcpPeers(ManagedProcess):
    """``tests/apps/tcp_peers.py serve ...``: ready once it printed ``serving``."""

    kind = "tcp-peers"

    def __init__(self, name, *args, log_dir):
        super().__init__(name, [venv_bin("python"), PEERS, "serve", "--address", "127.0.0.1", *args],
                         Path(log_dir) / f"tcp-peers-{name}.log")

    def is_ready(self) -> bool:
        return self.log_path.exists() and "serving" in self.log_path.read_text()


def dns_cert(directory: Path, name: str, issuer, dns_name: str) -> tuple[Path, Path]:
    """A server certificate for ``dns_name`` signed by ``issuer`` = ``(key, cert)``; returns (cert, key) paths."""
    issuer_key, issuer_cert = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
            .issuer_name(issuer_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
            .sign(issuer_key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def service_entry(name, hosts, port, protocol, endpoints, location="MESH_INTERNAL") -> dict:
    return {"apiVersion": NETWORKING, "kind": "ServiceEntry", "metadata": {"name": name, "namespace": NS},
            "spec": {"hosts": hosts, "location": location, "resolution": "STATIC",
                     "ports": [{"number": port, "name": f"{protocol.lower()}-main", "protocol": protocol}],
                     "endpoints": endpoints}}


def sidecar_endpoint(proxy_port: int, account: str, protocol: str, **labels) -> dict:
    """An endpoint behind a sidecar: its inbound port, mTLS, the service account it must prove."""
    return {"address": "127.0.0.1", "ports": {f"{protocol.lower()}-main": proxy_port},
            "labels": {**TLS_MODE_ISTIO, **labels}, "serviceAccount": account}


def plain_endpoint(port: int, protocol: str) -> dict:
    """An endpoint without a sidecar (no tlsMode label: plaintext TCP to it)."""
    return {"address": "127.0.0.1", "ports": {f"{protocol.lower()}-main": port}}


def resource(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": NETWORKING, "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec}


@pytest.fixture(scope="module")
def mesh(proxy_factory, tmp_path_factory, process_log_dir):
    work = tmp_path_factory.mktemp("tcp-mesh")
    ca = make_ca("tcp test mesh")
    bundle = work / "ca.pem"
    bundle.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    apps = {name: free_port() for name in ("v1", "v2", "vault", "tls-a", "tls-b")}
    a_cert, a_key = dns_cert(work, "a", ca, "a.example.com")
    b_cert, b_key = dns_cert(work, "b", ca, "b.example.com")
    peers = [TcpPeers("one", "--banner", apps["v1"], "--name", "v1", "--echo", apps["vault"], "--tls", apps["tls-a"],
                      "--cert", a_cert, "--key", a_key, log_dir=process_log_dir),
             TcpPeers("two", "--banner", apps["v2"], "--name", "v2", "--tls", apps["tls-b"], "--cert", b_cert,
                      "--key", b_key, log_dir=process_log_dir)]
    for peer in peers:
        peer.start()
    inbound = {name: free_port() for name in ("echo-v1", "echo-v2", "tls-a", "vault")}
    dead = free_port()  # nobody listens here
    config = write_config(
        work / "config",
        service_entry("echo", ["echo"], ECHO, "TCP", [
            sidecar_endpoint(inbound["echo-v1"], "echo", "TCP", app="echo", version="v1"),
            sidecar_endpoint(inbound["echo-v2"], "echo", "TCP", app="echo", version="v2")]),
        resource("DestinationRule", "echo", {"host": "echo", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}),
        resource("VirtualService", "echo", {"hosts": ["echo"], "tcp": [
            {"match": [{"sourceLabels": {"app": "nobody"}}],  # never this proxy: left out for it
             "route": [{"destination": {"host": "echo", "subset": "v1"}}]},
            {"route": [{"destination": {"host": "echo", "subset": subset}, "weight": weight}
                       for subset, weight in WEIGHTS.items()]}]}),
        service_entry("tls-a", ["a.example.com"], TLS, "TLS", [sidecar_endpoint(inbound["tls-a"], "tls-a", "TLS",
                                                                                app="tls-a")]),
        service_entry("tls-b", ["b.example.com"], TLS, "TLS", [plain_endpoint(apps["tls-b"], "TLS")],
                      location="MESH_EXTERNAL"),
        service_entry("tls-old", ["old.example.com"], TLS, "TLS", [plain_endpoint(dead, "TLS")],
                      location="MESH_EXTERNAL"),
        resource("VirtualService", "tls-old", {"hosts": ["old.example.com"], "tls": [
            {"match": [{"sniHosts": ["old.example.com"]}], "route": [{"destination": {"host": "a.example.com"}}]}]}),
        service_entry("vault", ["vault"], VAULT, "TCP", [sidecar_endpoint(inbound["vault"], "vault", "TCP",
                                                                           app="vault")]),
        service_entry("dead", ["dead"], DEAD, "TCP", [plain_endpoint(dead, "TCP")]),
        service_entry("flaky", ["flaky"], FLAKY, "TCP", [plain_endpoint(port, "TCP") for port in (dead, apps["v1"])]),
        service_entry("impostor", ["impostor"], IMPOSTOR, "TCP", [sidecar_endpoint(inbound["vault"], "echo", "TCP")]),
        service_entry("capped", ["capped"], CAPPED, "TCP", [plain_endpoint(apps["vault"], "TCP")]),
        *(resource("DestinationRule", host, {"host": host, "trafficPolicy": {
            "connectionPool": {"tcp": {"maxConnections": limit}}}})
          for host, limit in (("capped", 2), ("dead", 1), ("impostor", 1))),
        resource("DestinationRule", "vault", {"host": "vault", "trafficPolicy": {"connectionPool": {"tcp": {
            "tcpKeepalive": {"time": "11s", "interval": "2s", "probes": 5}}}}}),
        resource("DestinationRule", "flaky", {"host": "flaky", "trafficPolicy": {
            "loadBalancer": {"simple": "ROUND_ROBIN"}, "connectionPool": {"tcp": {"connectTimeout": "2s"}},
            "outlierDetection": {"baseEjectionTime": "60s", "maxEjectionPercent": 50}}}),
    )
    certs = {name: issue_cert(work, name, ca, spiffe(NS, name)) for name in ("client", "echo", "tls-a", "vault")}

    def sidecar(workload, account, app_port=None, inbound_port=None, tcp_ports=(), outbound="127.0.0.1", **labels):
        args = static_identity_args(*certs[account], bundle, account, outbound, tcp_ports)
        return proxy_factory(config, workload, namespace=NS, app_port=app_port, inbound_port=inbound_port,
                             labels=labels, extra_args=args)

    proxies = {
        "client": sidecar("client", "client", tcp_ports=(ECHO, TLS, VAULT, DEAD, FLAKY, IMPOSTOR, CAPPED),
                          app="client"),
        "echo-v1": sidecar("echo-v1", "echo", apps["v1"], inbound["echo-v1"], app="echo", version="v1"),
        "echo-v2": sidecar("echo-v2", "echo", apps["v2"], inbound["echo-v2"], (VAULT,), SECOND_CALLER, app="echo",
                           version="v2"),
        "tls-a": sidecar("tls-a", "tls-a", apps["tls-a"], inbound["tls-a"], app="tls-a"),
        "vault": sidecar("vault", "vault", apps["vault"], inbound["vault"], app="vault"),
    }
    return {"proxies": proxies, "config": config, "ca": bundle, "work": work, "inbound": inbound, "peers": peers}


# -- helpers --------------------------------------------------------------------------------------------------

def exchange(port: int, send: bytes = b"", until: bytes = b"\n", timeout: float = 5.0, host="127.0.0.1") -> bytes:
    """Connect to ``host:port``, send ``send``, read until ``until`` is seen or the peer closes."""
    received = b""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if send:
            sock.sendall(send)
        while until not in received:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    return received


def tls_get(port: int, server_name: str, ca: Path, check_hostname: bool = True, alpn=None):
    """An HTTPS request with SNI ``server_name`` (and ALPN ``alpn``, a list) to ``port`` (a client sidecar's
    listener, or a server sidecar's inbound port): ``(certificate DNS names, response)``."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = check_hostname
    if alpn:
        context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as sock:
            names = [value for kind, value in sock.getpeercert()["subjectAltName"] if kind == "DNS"]
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            response = b""
            while data := sock.recv(65536):
                response += data
    return names, response


def apply_policies(mesh, *policies):
    """Replace the vault sidecar's policies (a config file of their own) and wait until it applied them."""
    proxy = mesh["proxies"]["vault"]
    before = proxy.admin("/ready")["version"]
    write_config(mesh["config"], *policies, name="policies.yaml")
    proxy.reload()
    wait_for(lambda: proxy.admin("/ready")["version"] != before, timeout=10, what="the vault sidecar's new config")


# -- TCP routes -----------------------------------------------------------------------------------------------

def test_weighted_tcp_route_splits_connections_by_subset(mesh):
    """VirtualService tcp weights 20/80 over subsets: count where N connections land (each a banner)."""
    counts = {"v1": 0, "v2": 0}
    deadline = time.monotonic() + 20
    while sum(counts.values()) < 100 and time.monotonic() < deadline:
        banner = exchange(ECHO)
        assert banner.startswith(b"220 v") and banner.endswith(b" ready\r\n"), banner
        counts[banner.split()[1].decode()] += 1
    n = sum(counts.values())
    assert n >= 60, f"only {n} connections in 20 s"
    # five standard deviations of a binomial(n, 0.2) either side of its mean: a wrong split (50/50) is far out
    mean, sd = n * 0.2, (n * 0.2 * 0.8) ** 0.5
    assert mean - 5 * sd <= counts["v1"] <= mean + 5 * sd, counts


def test_tcp_bytes_go_both_ways_through_mtls(mesh):
    payload = b"x" * 300_000 + b"\n"
    received = exchange(VAULT, payload, until=payload)
    assert received == payload
    server = mesh["proxies"]["vault"]
    wait_for(lambda: total(server, "istio_tcp_received_bytes_total", reporter="destination") >= len(payload),
             timeout=5, what="the vault sidecar's received bytes")


def test_tcp_keepalive_reaches_the_tcp_proxys_upstream_socket(mesh):
    """The vault DestinationRule's tcpKeepalive is set on the client sidecar's mTLS connection to the vault
    sidecar, read from that socket while a client connection holds it open."""
    with socket.create_connection(("127.0.0.1", VAULT), timeout=5) as sock:
        sock.sendall(b"held\n")
        assert sock.recv(100) == b"held\n"
        connections = connections_to(mesh["proxies"]["client"].pid, mesh["inbound"]["vault"])
    assert connections and all(connection["keepalive"] == {"time": 11, "interval": 2, "probes": 5}
                               for connection in connections), connections


def test_server_first_protocol_needs_no_client_byte(mesh):
    """An explicit TCP listener never waits to sniff: the banner arrives although the client sends nothing."""
    started = time.monotonic()
    assert exchange(ECHO).startswith(b"220 ")
    assert time.monotonic() - started < 2


# -- half-close over the mesh mTLS hop (TLS 1.3 close_notify) -----------------------------------------------

def _read_to_end(sock) -> bytes:
    received = b""
    while data := sock.recv(65536):
        received += data
    return received


def test_a_client_that_half_closes_still_reads_the_whole_answer(mesh):
    """send, shutdown(SHUT_WR), read: the FIN goes app -> sidecar -> mTLS -> sidecar -> echo server, whose
    answer to it (``[eof]``, after the echo) comes back whole; then the connection ends."""
    payload = b"y" * 200_000 + b"\n"
    with socket.create_connection(("127.0.0.1", VAULT), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert _read_to_end(sock) == payload + b"[eof]"


def test_the_server_half_closes_first_and_the_client_still_sends(mesh):
    """The echo server half-closes on ``[shut]``: the client reads to its FIN, then still sends, then closes."""
    late = "sent after the server's FIN\n"
    with socket.create_connection(("127.0.0.1", VAULT), timeout=5) as sock:
        sock.sendall(b"first\n[shut]")
        assert _read_to_end(sock) == b"first\n"
        sock.sendall(late.encode())
    wait_for(lambda: json.dumps({"after_shut": late}) in mesh["peers"][0].log_path.read_text(), timeout=5,
             what="the bytes sent after the server's FIN, read by the server")


def test_a_full_close_still_closes_both_sidecars_connections(mesh):
    client, vault = mesh["proxies"]["client"], mesh["proxies"]["vault"]

    def closed():  # the vault sidecar's inbound side names either service of its endpoint (vault, impostor)
        return [total(client, "istio_tcp_connections_closed_total", destination_service_name="vault"),
                total(vault, "istio_tcp_connections_closed_total", reporter="destination")]

    before = closed()
    with socket.create_connection(("127.0.0.1", VAULT), timeout=5) as sock:
        sock.sendall(b"ping\n")
        assert sock.recv(100) == b"ping\n"
    wait_for(lambda: closed() == [count + 1 for count in before], timeout=5,
             what="the connection closed on both sidecars")


# -- TLS routes by SNI ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("server_name", ["a.example.com", "b.example.com"])
def test_tls_is_routed_by_sni_without_termination(mesh, server_name):
    """The client verifies the server's certificate for the name it sent: the sidecars never terminated TLS."""
    names, response = tls_get(TLS, server_name, mesh["ca"])
    assert names == [server_name]
    assert response.endswith(b"tls ok\n"), response


def test_tls_route_of_a_virtual_service(mesh):
    names, response = tls_get(TLS, "old.example.com", mesh["ca"], check_hostname=False)
    assert names == ["a.example.com"] and response.endswith(b"tls ok\n")


def test_unknown_server_name_is_closed_with_nr(mesh):
    client = mesh["proxies"]["client"]
    before = total(client, "istio_tcp_connections_closed_total", response_flags="NR")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_get(TLS, "c.example.com", mesh["ca"], check_hostname=False)
    wait_for(lambda: total(client, "istio_tcp_connections_closed_total", response_flags="NR") == before + 1,
             timeout=5, what="a connection closed with NR")


# -- a client without a sidecar, to a TLS app port (PeerAuthentication) ----------------------------------------

@pytest.mark.parametrize("alpn", [None, ["h2", "http/1.1"]])
def test_a_client_without_a_sidecar_reaches_a_tls_app_under_permissive(mesh, alpn):
    """Its ClientHello has no mesh ALPN marker: the inbound sidecar passes it to the app, whose own
    certificate the client verifies (before, the sidecar took it for mesh mTLS and the handshake failed)."""
    names, response = tls_get(mesh["inbound"]["tls-a"], "a.example.com", mesh["ca"], alpn=alpn)
    assert names == ["a.example.com"]
    assert response.endswith(b"tls ok\n"), response


def test_under_strict_a_client_without_a_sidecar_is_refused_and_mesh_clients_are_not(mesh):
    proxy = mesh["proxies"]["tls-a"]
    strict = mesh["config"] / "strict.yaml"

    def reload():
        before = proxy.admin("/ready")["version"]
        proxy.reload()
        wait_for(lambda: proxy.admin("/ready")["version"] != before, timeout=10, what="the tls-a sidecar's new config")

    write_config(mesh["config"], peer_authentication("tls-a", NS, "STRICT", selector={"app": "tls-a"}),
                 name=strict.name)
    reload()
    try:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            tls_get(mesh["inbound"]["tls-a"], "a.example.com", mesh["ca"])
        names, response = tls_get(TLS, "a.example.com", mesh["ca"])  # through the client sidecar: mesh mTLS
        assert names == ["a.example.com"] and response.endswith(b"tls ok\n")
    finally:
        strict.unlink()
        reload()


# -- authorization ---------------------------------------------------------------------------------------------

def _vault_policy(action="ALLOW", **rule):
    return authorization_policy("vault-tcp", NS, selector={"app": "vault"}, action=action, rules=[rule])


def _reaches_vault(via: str = "127.0.0.1") -> bool:
    """Whether an echo through the explicit VAULT listener at ``via`` comes back (127.0.0.2: echo-v2's)."""
    return exchange(VAULT, b"ping\n", host=via) == b"ping\n"


def test_tcp_authorization_by_principal(mesh):
    vault = mesh["proxies"]["vault"]
    before = total(vault, "istio_tcp_connections_closed_total", response_flags="RBAC",
                   source_principal=spiffe(NS, "echo"))
    apply_policies(mesh, _vault_policy(**{"from": [{"source": {"principals": [f"cluster.local/ns/{NS}/sa/client"]}}]}))
    assert _reaches_vault()
    assert not _reaches_vault(SECOND_CALLER)
    wait_for(lambda: total(vault, "istio_tcp_connections_closed_total", response_flags="RBAC",
                           source_principal=spiffe(NS, "echo")) == before + 1, timeout=5,
             what="the denied connection, counted with flag RBAC")
    apply_policies(mesh, _vault_policy(**{"from": [{"source": {"namespaces": [NS]}}]}))
    assert _reaches_vault(SECOND_CALLER)


def test_tcp_authorization_by_port_and_http_only_fields(mesh):
    vault = mesh["proxies"]["vault"]
    app_port = vault.app_port
    apply_policies(mesh, _vault_policy(to=[{"operation": {"ports": [str(app_port)]}}]))
    assert _reaches_vault()
    apply_policies(mesh, _vault_policy(to=[{"operation": {"ports": [str(app_port + 1)]}}]))
    assert not _reaches_vault()
    # Istio's authz-tcp task: an ALLOW rule with an HTTP-only field never matches a TCP connection
    apply_policies(mesh, _vault_policy(to=[{"operation": {"methods": ["GET"], "ports": [str(app_port)]}}]))
    assert not _reaches_vault()
    # ... and a DENY rule is applied without its HTTP-only fields
    apply_policies(mesh, _vault_policy("DENY", to=[{"operation": {"methods": ["GET"], "ports": [str(app_port + 1)]}}]))
    assert _reaches_vault()
    apply_policies(mesh, _vault_policy("DENY", to=[{"operation": {"methods": ["GET"]}}]))
    assert not _reaches_vault()
    assert "HTTP-only fields (methods)" in vault.log_path.read_text()
    apply_policies(mesh)


def test_dead_upstream_closes_with_uf(mesh):
    client = mesh["proxies"]["client"]
    assert exchange(DEAD, b"hello\n") == b""
    wait_for(lambda: total(client, "istio_tcp_connections_closed_total", response_flags="UF",
                           destination_service_name="dead") >= 1, timeout=5, what="a connection closed with UF")


def test_the_peer_identity_is_checked_before_any_byte_goes_out(mesh):
    client = mesh["proxies"]["client"]
    assert exchange(IMPOSTOR, b"secret\n") == b""  # the vault app echoes: nothing came back, nothing went
    wait_for(lambda: f"peer identity mismatch: expected {spiffe(NS, 'echo')}, the endpoint presented "
                     f"{spiffe(NS, 'vault')}" in client.log_path.read_text(), timeout=5, what="the mismatch logged")
    assert total(client, "istio_tcp_connections_closed_total", response_flags="UF",
                 destination_service_name="impostor") == 1


def test_outlier_detection_ejects_an_endpoint_that_refuses_connections(mesh):
    """Round robin over a dead and a live endpoint: one connection fails (UF), then the dead one is ejected."""
    banners = [exchange(FLAKY) for _ in range(8)]
    assert banners.count(b"") <= 1 and banners.count(b"220 v1 ready\r\n") >= 7, banners
    clusters = mesh["proxies"]["client"].admin("/clusters")
    ejected = [e for e in clusters[f"outbound|{FLAKY}||flaky.{NS}.svc.cluster.local"]["endpoints"] if not e["healthy"]]
    assert len(ejected) == 1 and ejected[0]["total_failures"] == 1


def _breaker(client, port: int, host: str) -> dict:
    """The ``circuit_breaker`` counts of the client sidecar's cluster of ``host:port`` (admin ``/clusters``)."""
    return client.admin("/clusters")[f"outbound|{port}||{host}.{NS}.svc.cluster.local"]["circuit_breaker"]


def test_max_connections_closes_the_connection_beyond_it_with_uo(mesh):
    """maxConnections 2: two held-open connections work, a third is closed at once (UO), and a place freed by a
    close is taken again; as Envoy's tcp_proxy with the cluster's max_connections circuit breaker."""
    client = mesh["proxies"]["client"]
    held = [socket.create_connection(("127.0.0.1", CAPPED), timeout=5) for _ in range(2)]
    try:
        for number, sock in enumerate(held):
            sock.sendall(b"%d\n" % number)
            assert sock.recv(100) == b"%d\n" % number
        started = time.monotonic()
        assert exchange(CAPPED, b"hello\n") == b""  # closed at once: no echo
        assert time.monotonic() - started < 2
        cluster = f"outbound|{CAPPED}||capped.{NS}.svc.cluster.local"
        assert total(client, "mesh_upstream_cx_overflow_total", cluster=cluster) == 1
        wait_for(lambda: total(client, "istio_tcp_connections_opened_total", response_flags="UO",
                               destination_service_name="capped") == 1, timeout=5, what="a connection opened with UO")
        held[0].sendall(b"still here\n")
        assert held[0].recv(100) == b"still here\n"
        held.pop(0).close()
        wait_for(lambda: _breaker(client, CAPPED, "capped")["connections"] == 1, timeout=5,
                 what="the closed connection released")
        assert exchange(CAPPED, b"again\n") == b"again\n"
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: _breaker(client, CAPPED, "capped")["connections"] == 0, timeout=5, what="every place released")
    assert total(client, "mesh_upstream_cx_overflow_total", cluster=cluster) == 1


@pytest.mark.parametrize("port, host", [(DEAD, "dead"), (IMPOSTOR, "impostor")], ids=["dead", "impostor"])
def test_a_failed_connection_gives_its_place_back(mesh, port, host):
    """maxConnections 1: connections that fail one after another (refused; identity rejected) are each UF, never
    UO: a failure releases the place before the client's connection is closed."""
    client = mesh["proxies"]["client"]
    for _ in range(3):
        assert exchange(port, b"hello\n") == b""
    assert _breaker(client, port, host)["connections"] == 0
    assert total(client, "istio_tcp_connections_opened_total", response_flags="UO", destination_service_name=host) == 0


def test_tcp_metrics_carry_istios_labels_on_both_sidecars(mesh):
    exchange(ECHO)
    client, server = mesh["proxies"]["client"], mesh["proxies"]["echo-v1"]
    source = {"reporter": "source", "source_workload": "client", "source_workload_namespace": NS,
              "source_principal": spiffe(NS, "client"), "destination_service": f"echo.{NS}.svc.cluster.local",
              "destination_service_name": "echo", "destination_service_namespace": NS,
              "destination_workload_namespace": NS, "destination_principal": spiffe(NS, "echo"),
              "request_protocol": "tcp", "response_flags": "-", "connection_security_policy": "unknown"}
    destination = {**source, "reporter": "destination", "destination_workload": "echo-v1",
                   "destination_app": "echo", "destination_version": "v1", "connection_security_policy": "mutual_tls"}
    del destination["source_workload"]  # no metadata exchange on TCP: unknown
    for proxy, labels in ((client, source), (server, destination)):
        def counted(proxy=proxy, labels=labels):
            return all(total(proxy, name, **labels) > 0 for name in (
                "istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
                "istio_tcp_sent_bytes_total"))
        wait_for(counted, timeout=5, what=f"the TCP metrics of {proxy.workload} with {labels}")
    # both sides count the same bytes sent to the client: the banners, and the echo servers' ``[eof]`` answers to
    # the clients' FINs that came back before the client's connection was gone
    servers = [mesh["proxies"][name] for name in ("echo-v1", "echo-v2")]
    wait_for(lambda: total(client, "istio_tcp_sent_bytes_total", **source) == sum(
        total(proxy, "istio_tcp_sent_bytes_total", reporter="destination") for proxy in servers), timeout=5,
        what="the same bytes sent counted on both sides")


def test_an_invalid_tcp_route_is_rejected_naming_its_field_and_the_config_stays(mesh):
    proxy = mesh["proxies"]["vault"]
    bad = mesh["config"] / "bad.yaml"
    write_config(mesh["config"], resource("VirtualService", "bad", {"hosts": ["vault"], "tcp": [
        {"match": [{"sourceSubnet": "10.0.0.0/8"}], "route": [{"destination": {"host": "vault"}}]}]}), name="bad.yaml")
    try:
        proxy.reload()
        wait_for(lambda: "config rejected" in proxy.log_path.read_text(), timeout=10, what="the rejection")
        logged = next(line for line in proxy.log_path.read_text().splitlines() if "config rejected" in line)
        number = next(n for n, text in enumerate(bad.read_text().splitlines(), 1) if "sourceSubnet" in text)
        assert (f"{bad}:{number}: VirtualService/{NS}/bad: spec.tcp[0].match[0].sourceSubnet: 'sourceSubnet' is not "
                "supported by txmesh") in logged
        assert _reaches_vault()
    finally:
        bad.unlink()
