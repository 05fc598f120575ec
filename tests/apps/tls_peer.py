"""An mTLS HTTP/1.1 server that tells each caller how its TLS session was made (for the resumption tests).

::

    python tests/apps/tls_peer.py --port P --cert PEM --key PEM --ca PEM [--address 127.0.0.1]

It requires a client certificate signed by ``--ca`` and presents ``--cert``; TLS 1.3 session
tickets are on (the standard library's default).  Every request, on keep-alive connections,
gets ``200`` with a JSON body:

- ``reused``: whether this connection resumed a session (no certificate was exchanged);
- ``client_sha256``: sha256 of the client certificate the connection is bound to (on a resumed
  connection, the one of the session it resumed);
- ``connection``: the number of this connection (1, 2, ...); ``request``: of this request on it.

It runs until killed; each connection is also logged as one line (``connection N reused=...``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import ssl
import sys


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(ca)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    return context


async def serve(options) -> None:
    numbers = itertools.count(1)

    async def connection(reader, writer):
        number = next(numbers)
        tls = writer.get_extra_info("ssl_object")
        client = tls.getpeercert(binary_form=True)
        facts = {"reused": tls.session_reused, "client_sha256": hashlib.sha256(client).hexdigest() if client else None,
                 "connection": number}
        print(f"connection {number} reused={facts['reused']} client_sha256={facts['client_sha256']}", flush=True)
        try:
            for request in itertools.count(1):
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    break
                body = json.dumps({**facts, "request": request}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    asyncio.get_running_loop().set_exception_handler(
        lambda loop, context: print(f"error: {context.get('message')}: {context.get('exception')!r}", flush=True))
    server = await asyncio.start_server(connection, options.address, options.port,
                                        ssl=server_context(options.cert, options.key, options.ca))
    print(f"listening on {options.address}:{options.port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True, help="the root client certificates must chain to")
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
