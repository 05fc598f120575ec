"""The sidecar's Kubernetes probes: ``python3 -m mesh.inject.probe [--port 15000] ready|live``.

The proxy's admin port (/ready) listens on 127.0.0.1 only, which the kubelet's
httpGet probes (sent to the pod IP) cannot reach, and the proxy has no :15021
health port yet.  So the injected probes are exec probes that run this inside
the sidecar container:

- ``ready``: exit 0 if ``GET /ready`` answers 200 (certificate and config in
  force, not draining), else 1.
- ``live``: exit 0 if the admin port answers HTTP at all (a 503 while waiting
  for the control plane is alive, not dead), else 1.

Kept to the standard library so that a probe costs one short Python start.
"""

from __future__ import annotations

import argparse
import http.client
import sys


def check(kind: str, port: int, timeout: float, host: str = "127.0.0.1") -> tuple[int, str]:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/ready")
        response = connection.getresponse()
        body = response.read(2048).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as error:
        return 1, f"admin port {host}:{port} does not answer: {error}"
    finally:
        connection.close()
    if kind == "live" or response.status == 200:
        return 0, f"{response.status} {body}"
    return 1, f"not ready: {response.status} {body}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m mesh.inject.probe")
    parser.add_argument("--port", type=int, default=15000, help="the proxy's admin port")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("kind", choices=("ready", "live"))
    args = parser.parse_args(argv)
    code, message = check(args.kind, args.port, args.timeout)
    print(message, file=sys.stdout if code == 0 else sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
