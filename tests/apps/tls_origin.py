"""An HTTPS server outside the mesh that tells each caller what its TLS handshake carried (egress TLS tests).

::

    python tests/apps/tls_origin.py --cert PEM --key PEM --port P [--mutual-port P2 --client-ca PEM]
                                    [--address 127.0.0.1]

Every request gets ``200`` with a JSON body: ``sni`` (the server name the client sent, or null),
``client`` (the common name of the client certificate, or null), ``alpn``, ``reused`` (whether
the connection resumed a TLS session) and ``path``; a path ending in ``/close`` closes the
connection after the response.  On
``--mutual-port`` a client certificate signed by ``--client-ca`` is required.  It prints
``serving`` once both ports listen, and runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl


def _context(options, mutual: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(options.cert, options.key)
    context.set_alpn_protocols(["http/1.1"])
    if mutual:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(options.client_ca)

    def remember_sni(ssl_object, server_name, _context):
        ssl_object.sni = server_name

    context.sni_callback = remember_sni
    return context


def _common_name(certificate) -> str | None:
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


async def _serve_connection(reader, writer):
    tls = writer.get_extra_info("ssl_object")
    facts = {"sni": getattr(tls, "sni", None), "client": _common_name(tls.getpeercert()),
             "alpn": tls.selected_alpn_protocol(), "reused": tls.session_reused}
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            body = json.dumps({**facts, "path": path}).encode()
            close = path.endswith("/close")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
                         % (len(body), b"connection: close\r\n" if close else b"", body))
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def main(options) -> None:
    servers = [await asyncio.start_server(_serve_connection, options.address, options.port,
                                          ssl=_context(options, mutual=False))]
    if options.mutual_port:
        servers.append(await asyncio.start_server(_serve_connection, options.address, options.mutual_port,
                                                  ssl=_context(options, mutual=True)))
    print("serving", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mutual-port", type=int)
    parser.add_argument("--client-ca")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    asyncio.run(main(parser.parse_args()))
