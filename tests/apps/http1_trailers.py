"""An HTTP/1.1 app whose every response is chunked and ends with trailers, for the upstream codec tests.

::

    python tests/apps/http1_trailers.py --port PORT [--address A]

Each request (keep-alive) gets ``200`` with the body ``request N`` (N counts the requests of the
connection) in one chunk, then the trailer ``x-trailer: N``.
"""

from __future__ import annotations

import argparse
import asyncio


async def _serve_connection(reader, writer):
    count = 0
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            count += 1
            body = b"request %d" % count
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-trailer\r\n\r\n"
                         b"%x\r\n%s\r\n0\r\nx-trailer: %d\r\n\r\n" % (len(body), body, count))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(options):
    server = await asyncio.start_server(_serve_connection, options.address, options.port)
    print(f"http1 trailers app listening on {options.address}:{options.port}", flush=True)
    async with server:
        await server.serve_forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
