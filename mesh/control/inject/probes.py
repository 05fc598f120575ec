"""App probe rewriting, as Istio does it: the kubelet probes the app through the sidecar's health port.

Inbound capture sends every connection to an app port, the kubelet's probes
included, to the sidecar's inbound listener (15006).  Under STRICT mTLS a
plaintext ``httpGet`` probe then fails, and a ``tcpSocket`` probe always
succeeds (the sidecar accepts the connection, whether the app listens or not).
So the injector rewrites each app container's ``httpGet`` and ``tcpSocket``
probe into ``httpGet :15021/app-health/<container>/<livez|readyz|startupz>``
and records the original in the sidecar's environment (``TXMESH_APP_PROBERS``,
Istio's ``ISTIO_KUBE_APP_PROBERS`` format)::

    {"/app-health/web/readyz": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP",
                                            "httpHeaders": [{"name": "x-probe", "value": "1"}]},
                                "timeoutSeconds": 1}}

The sidecar (``mesh.proxy.app_probes``) answers those paths by probing the app
on localhost, which capture does not touch.  Named ports are resolved against
the container's ports here, so the sidecar only ever sees numbers.

Left as they are: ``exec`` probes (they run inside the container and need
nothing), ``grpc`` probes (the sidecar does not speak the gRPC health
protocol: exclude their port from capture), and probes with a ``host`` (they
do not go to this pod).  Everything else of a probe (periods, thresholds,
the timeout) stays on the rewritten probe.
"""

from __future__ import annotations

from mesh.sidecar_contract import APP_HEALTH_PREFIX, DEFAULT_TIMEOUT_SECONDS, PROBE_KINDS

#: Istio's opt-out annotation: ``"false"`` leaves the app's probes as they are.
REWRITE_ANNOTATION = "sidecar.istio.io/rewriteAppHTTPProbers"


class ProbeError(ValueError):
    """A probe the injector cannot rewrite (a port it cannot resolve); the message says what to fix."""


def app_health_path(container: str, kind: str) -> str:
    """The health port's path for one probe: ``/app-health/<container>/<livez|readyz|startupz>``."""
    return f"{APP_HEALTH_PREFIX}{container}/{kind}"


def rewrite_app_probes(spec: dict, health_port: int) -> dict:
    """Rewrite the ``httpGet``/``tcpSocket`` probes of ``spec``'s app containers in place.

    Returns the originals for the sidecar, keyed by their ``/app-health/``
    path (empty when there is nothing to rewrite).  Raises
    :class:`ProbeError` for a named port the container does not declare.
    """
    probers = {}
    for container in spec.get("containers") or []:
        for field, kind in PROBE_KINDS.items():
            probe = container.get(field)
            original = _original(container, field, probe) if isinstance(probe, dict) else None
            if original is None:
                continue
            path = app_health_path(container.get("name"), kind)
            probers[path] = original
            rewritten = {key: value for key, value in probe.items() if key not in ("httpGet", "tcpSocket")}
            rewritten["httpGet"] = {"path": path, "port": health_port, "scheme": "HTTP"}
            container[field] = rewritten
    return probers


def _original(container: dict, field: str, probe: dict):
    """What the sidecar must send to the app for ``probe``, or None to leave the probe alone."""
    timeout = probe.get("timeoutSeconds") or DEFAULT_TIMEOUT_SECONDS
    get = probe.get("httpGet")
    if isinstance(get, dict) and not get.get("host"):
        check = {"path": get.get("path") or "/", "port": _port(container, field, get.get("port")),
                 "scheme": str(get.get("scheme") or "HTTP").upper()}
        if get.get("httpHeaders"):
            check["httpHeaders"] = [{"name": h.get("name"), "value": h.get("value")} for h in get["httpHeaders"]]
        return {"httpGet": check, "timeoutSeconds": timeout}
    socket = probe.get("tcpSocket")
    if isinstance(socket, dict) and not socket.get("host"):
        return {"tcpSocket": {"port": _port(container, field, socket.get("port"))}, "timeoutSeconds": timeout}
    return None


def _port(container: dict, field: str, port) -> int:
    """A probe's port as a number: an int, a numeric string, or the name of one of the container's ports."""
    if isinstance(port, int) and 1 <= port <= 65535:
        return port
    if isinstance(port, str) and port.isdigit() and 1 <= int(port) <= 65535:
        return int(port)
    for declared in container.get("ports") or []:
        if port and declared.get("name") == port and declared.get("containerPort"):
            return int(declared["containerPort"])
    names = [p["name"] for p in container.get("ports") or [] if p.get("name")]
    raise ProbeError(f"container {container.get('name')!r}: the {field}'s port {port!r} is neither a port number "
                     f"nor the name of one of the container's ports ({', '.join(names) or 'it names none'}); "
                     "give the number or name the containerPort")
