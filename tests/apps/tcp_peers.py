"""Plain TCP and TLS peers for the passthrough tests: servers the mesh does not know, and a client.

::

    python tests/apps/tcp_peers.py serve [--address A] [--echo PORT] [--banner PORT] [--name NAME]
                                         [--tls PORT --cert PEM --key PEM]
    python tests/apps/tcp_peers.py call HOST PORT [--send TEXT] [--shut] [--timeout S]

``serve`` runs until killed:

- ``--echo``: echoes what it reads; when the client half-closes, answers ``[eof]`` and closes
  (so a client that sees ``[eof]`` knows its FIN went through); a read that holds ``[shut]``
  makes it half-close first instead (after echoing what came before), read to the end and print
  ``{"after_shut": TEXT}`` (what came after its FIN);
- ``--banner``: a server-first protocol (as SMTP, MySQL): sends ``220 ready\\r\\n`` at once
  (``220 NAME ready`` with ``--name``, to tell servers apart), then echoes as ``--echo``;
- ``--tls``: TLS with the given certificate, answering any HTTP request with ``200 tls ok``.

``call`` connects (no proxy settings: an unmodified client), sends ``--send``, half-closes
with ``--shut``, reads until the server closes (or ``--timeout``) and prints one JSON object:
``received`` (text), ``first_byte_s`` (seconds from connect to the first byte, or null),
``seconds`` (total), ``eof`` (the server closed), ``error`` (connect/reset error, or null).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import sys
import time

#: What makes the echo server half-close first (see ``--echo``).
SHUT = b"[shut]"


async def _echo(reader, writer, banner=b""):
    if banner:
        writer.write(banner)
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                writer.write(b"[eof]")
                break
            if SHUT in data:
                writer.write(data[:data.index(SHUT)])
                writer.write_eof()
                rest = data[data.index(SHUT) + len(SHUT):]
                while chunk := await reader.read(65536):
                    rest += chunk
                print(json.dumps({"after_shut": rest.decode("latin-1")}), flush=True)
                break
            writer.write(data)
            await writer.drain()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _tls_http(reader, writer):
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\ntls ok\n")
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def serve(args) -> None:
    servers = []
    if args.echo:
        servers.append(await asyncio.start_server(_echo, args.address, args.echo))
    if args.banner:
        banner = f"220 {args.name} ready\r\n" if args.name else "220 ready\r\n"
        servers.append(await asyncio.start_server(lambda r, w: _echo(r, w, banner.encode()),
                                                  args.address, args.banner))
    if args.tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
        servers.append(await asyncio.start_server(_tls_http, args.address, args.tls, ssl=context))
    print("serving", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


def call(args) -> dict:
    result = {"received": "", "first_byte_s": None, "seconds": None, "eof": False, "error": None}
    started = time.monotonic()
    received = b""
    try:
        with socket.create_connection((args.host, args.port), timeout=args.timeout) as sock:
            if args.send:
                sock.sendall(args.send.encode())
            if args.shut:
                sock.shutdown(socket.SHUT_WR)
            while True:
                data = sock.recv(65536)
                if not data:
                    result["eof"] = True
                    break
                if result["first_byte_s"] is None:
                    result["first_byte_s"] = time.monotonic() - started
                received += data
    except OSError as error:
        result["error"] = f"{type(error).__name__}: {error}"
    result["received"] = received.decode("latin-1")
    result["seconds"] = time.monotonic() - started
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve")
    server.add_argument("--address", default="0.0.0.0")
    server.add_argument("--echo", type=int)
    server.add_argument("--banner", type=int)
    server.add_argument("--name")
    server.add_argument("--tls", type=int)
    server.add_argument("--cert")
    server.add_argument("--key")
    client = commands.add_parser("call")
    client.add_argument("host")
    client.add_argument("port", type=int)
    client.add_argument("--send", default="")
    client.add_argument("--shut", action="store_true")
    client.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(serve(args))
        return 0
    print(json.dumps(call(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
