"""The servers of a gateway port as Istio has them, with real processes (a control plane and a gateway).

- Each HTTPS server of a port routes with its own table (Istio's route configuration
  ``https.PORT.NAME.GATEWAY.NAMESPACE``): port 443 has ``mutual.com`` (MUTUAL) and ``open.com``
  (SIMPLE), one certificate for both names; a client that reached open.com (by SNI) without a
  client certificate cannot reach mutual.com's routes by its Host header, over HTTP/1.1 or HTTP/2,
  nor by resuming its TLS session with SNI mutual.com.
- A server with ``tls.httpsRedirect`` redirects its hosts with no VirtualService bound (port 80).
- A match's ``port`` is the gateway server's port, not the Host header's (port 8081).
"""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.harness import curl, free_port
from tests.harness.certs import ScratchCA
from tests.integration.test_proxy_support import write_config

NS = "shop"
NET = "networking.istio.io/v1"
SECRET = b"secret behind mTLS"


def virtual_service(name, hosts, http) -> dict:
    return {"apiVersion": NET, "kind": "VirtualService", "metadata": {"name": name, "namespace": NS},
            "spec": {"hosts": hosts, "gateways": ["gw"], "http": http}}


def say(text, **match) -> dict:
    """An http route that answers 200 with ``text`` (a direct response: no backend needed)."""
    route = {"directResponse": {"status": 200, "body": {"string": text}}}
    if match:
        route["match"] = [match]
    return route


@pytest.fixture(scope="module")
def gateway(control_factory, proxy_factory, tmp_path_factory):
    pki = tmp_path_factory.mktemp("pki")
    ca = ScratchCA.create(pki)
    cert, key = ca.issue(pki, "server", ["mutual.com", "open.com"])
    files = {"serverCertificate": str(cert), "privateKey": str(key)}
    documents = [
        {"apiVersion": NET, "kind": "Gateway", "metadata": {"name": "gw", "namespace": NS},
         "spec": {"selector": {"istio": "ingressgateway"}, "servers": [
             {"port": {"number": 443, "name": "https-mutual", "protocol": "HTTPS"}, "hosts": ["mutual.com"],
              "tls": {"mode": "MUTUAL", **files, "caCertificates": str(ca.cert_path)}},
             {"port": {"number": 443, "name": "https-open", "protocol": "HTTPS"}, "hosts": ["open.com"],
              "tls": {"mode": "SIMPLE", **files}},
             {"port": {"number": 80, "name": "http-redirect", "protocol": "HTTP"}, "hosts": ["redirect.com"],
              "tls": {"httpsRedirect": True}},
             {"port": {"number": 8081, "name": "http-ports", "protocol": "HTTP"}, "hosts": ["ports.com"]},
         ]}},
        virtual_service("mutual", ["mutual.com"], [say(SECRET.decode())]),
        virtual_service("open", ["open.com"], [say("open")]),
        virtual_service("ports", ["ports.com"], [say("on 9999", port=9999), say("on 8081", port=8081),
                                                 say("no port matched")]),
    ]
    config = write_config(tmp_path_factory.mktemp("config"), *documents)
    control = control_factory(extra_args=["--config-dir", str(config)])
    local = {443: free_port(), 80: free_port(), 8081: free_port()}
    mapping = [arg for port, to in local.items() for arg in ("--gateway-port", f"{port}={to}")]
    proxy_factory(config, "ingressgateway", namespace=NS, labels={"istio": "ingressgateway"},
                  extra_args=["--gateway", "--gateway-address", "127.0.0.1", *mapping,
                              *control.proxy_args(NS, "ingressgateway")])
    return {"local": local, "ca": ca.cert_path, "client": ca.issue(pki, "client", client=True)}


def https(gateway, sni, host=None, *args):
    """curl to port 443 with the server name ``sni`` (resolved to loopback) and the Host ``host``."""
    port = gateway["local"][443]
    return curl(f"https://{sni}:{port}/", host=host, extra_args=[
        "--resolve", f"{sni}:{port}:127.0.0.1", "--cacert", str(gateway["ca"]), *args])


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_a_client_of_one_https_server_cannot_reach_another_servers_hosts(gateway, version):
    """SNI open.com, no client certificate, Host mutual.com: open.com's table has no mutual.com (404 NR)."""
    bypass = https(gateway, "open.com", "mutual.com", version)
    assert bypass.status == 404 and bypass.headers["x-mesh-flags"] == "NR", bypass
    assert bypass.info["http_version"] == version.removeprefix("--http")
    assert https(gateway, "open.com", None, version).body == b"open"
    refused = https(gateway, "mutual.com", None, version)  # MUTUAL: no client certificate, no handshake
    assert refused.status == 0 and refused.exit_code in (35, 55, 56), refused
    cert, key = gateway["client"]
    allowed = https(gateway, "mutual.com", None, version, "--cert", str(cert), "--key", str(key))
    assert allowed.status == 200 and allowed.body == SECRET, allowed


def test_a_client_without_sni_gets_the_first_server(gateway):
    """No SNI (an IP address): the first server's certificate, mode and table (mutual.com's)."""
    url = f"https://127.0.0.1:{gateway['local'][443]}/"
    assert curl(url, host="open.com", extra_args=["-k"]).status == 0  # MUTUAL: a client certificate is required
    cert, key = gateway["client"]
    with_cert = ["-k", "--cert", str(cert), "--key", str(key)]
    assert curl(url, host="mutual.com", extra_args=with_cert).body == SECRET
    assert curl(url, host="open.com", extra_args=with_cert).status == 404  # open.com's hosts are not in its table


def _get(client: ssl.SSLContext, port: int, sni: str, session=None) -> tuple:
    """``(response bytes or None when the handshake failed, the TLS socket's session, whether it resumed one)``
    of a GET of ``sni`` with the server name ``sni`` (TLS 1.3), offering ``session``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            tls = client.wrap_socket(raw, server_hostname=sni, session=session)
        except (ssl.SSLError, ConnectionError):
            return None, None, False
        with tls:
            response = b""
            try:
                tls.sendall(f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
                while chunk := tls.recv(65536):
                    response += chunk
            except (ssl.SSLError, ConnectionError):
                pass
            return response, tls.session, tls.session_reused


def test_a_session_resumed_from_another_server_gets_no_mutual_server_routes(gateway):
    """A TLS 1.3 session made with open.com (no client certificate), resumed with SNI mutual.com: OpenSSL
    resumes it with mutual.com's settings without asking for a certificate; the gateway closes it."""
    client = ssl.create_default_context(cafile=str(gateway["ca"]))
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    port = gateway["local"][443]
    response, session, _ = _get(client, port, "open.com")
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"open"), response
    assert session is not None and session.has_ticket
    resumed, _, reused = _get(client, port, "open.com", session)
    assert reused and resumed.endswith(b"open")  # the session resumes on its own server
    response, _, _ = _get(client, port, "mutual.com", session)
    assert not response, response  # refused: the handshake, or the connection right after it


def test_https_redirect_without_a_virtual_service(gateway):
    result = curl(f"http://127.0.0.1:{gateway['local'][80]}/x?y=1", host="redirect.com")
    assert result.status == 301 and result.headers["location"] == "https://redirect.com/x?y=1", result


@pytest.mark.parametrize("host", ["ports.com", "ports.com:9999"])
def test_match_port_is_the_gateway_server_port(gateway, host):
    """Istio decides a match's port by the server's port (8081 here), whatever the Host header says."""
    result = curl(f"http://127.0.0.1:{gateway['local'][8081]}/", host=host)
    assert result.status == 200 and result.body == b"on 8081", result
