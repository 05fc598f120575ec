"""The demo's gRPC workload: a greeter service on grpcio, behind its sidecar like the HTTP apps.

Run it with ``python -m mesh.demo.grpc_app --name NAME --address A --port N``.  It serves
``demo.Greeter/SayHello`` in plaintext HTTP/2 (its sidecar does the mTLS): the request is a name
(UTF-8 bytes, no protobuf: the service uses grpcio's generic handlers), the answer
``hello NAME, from WORKLOAD; you are CALLER`` where CALLER is the ``URI=`` of the
``x-forwarded-client-cert`` its sidecar adds (the verified identity of the caller).

grpcio is not a dependency of the sidecar: ``pip install 'txmesh[demo]'`` adds it; without it,
``meshctl demo`` leaves this workload out (:func:`available`).
"""

from __future__ import annotations

import argparse
import importlib.util

SERVICE = "demo.Greeter"
#: The one method, as a gRPC client names it (the ``:path`` of the call).
SAY_HELLO = f"/{SERVICE}/SayHello"


def available() -> bool:
    """Whether grpcio is installed (the demo runs its gRPC workload only then)."""
    return importlib.util.find_spec("grpc") is not None


def caller_of(metadata) -> str:
    """The caller's SPIFFE id from the ``x-forwarded-client-cert`` in a call's ``metadata``, or ``unknown``."""
    for name, value in metadata:
        if name == "x-forwarded-client-cert":
            for part in value.split(";"):
                key, _, text = part.partition("=")
                if key.strip() == "URI":
                    return text.strip()
    return "unknown"


def serve(name: str, address: str, port: int) -> None:
    """Serve the greeter until the process is stopped."""
    from concurrent import futures

    import grpc

    def say_hello(request: bytes, context) -> bytes:
        who = request.decode("utf-8", "replace") or "stranger"
        return f"hello {who}, from {name}; you are {caller_of(context.invocation_metadata())}".encode()

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "SayHello": grpc.unary_unary_rpc_method_handler(say_hello),  # no (de)serializers: bytes in, bytes out
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{address}:{port}")
    server.start()
    print(f"{name}: gRPC {SERVICE} on {address}:{port}", flush=True)
    server.wait_for_termination()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the workload name the answers carry")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if not available():
        parser.exit(2, "grpcio is not installed: pip install 'txmesh[demo]' (or grpcio) to run the gRPC demo app\n")
    try:
        serve(args.name, args.address, args.port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
