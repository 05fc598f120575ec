"""The app probes a sidecar runs for the kubelet: ``--app-probers`` (or ``$TXMESH_APP_PROBERS``) parsed.

The injector (``mesh.control.inject.probes``) rewrites an app container's probe to
``httpGet :15021/app-health/<container>/<livez|readyz|startupz>`` and records
the original as JSON, in Istio's ``ISTIO_KUBE_APP_PROBERS`` format: an object
from that path to ``{"httpGet": {"path", "port", "scheme", "httpHeaders"},
"timeoutSeconds"}`` or ``{"tcpSocket": {"port"}, "timeoutSeconds"}``.
:func:`parse_app_probers` checks it whole and turns it into :class:`AppProbe`
values; these paths are all the health port will probe (it is no proxy for
anything else).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from mesh.sidecar_contract import APP_HEALTH_PREFIX, DEFAULT_TIMEOUT_SECONDS, PROBE_KINDS

_PATH = re.compile(r"/app-health/[a-z0-9]([-a-z0-9]*[a-z0-9])?/(" + "|".join(PROBE_KINDS.values()) + ")")
_TARGET = re.compile(r"/[\x21-\x7e]*")  # printable ASCII, no spaces: a request target as the kubelet sends it
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True)
class AppProbe:
    """One recorded probe: an HTTP(S) GET (``path`` set) or a TCP connect (``path`` None) to the app's ``port``."""

    port: int
    timeout: float
    path: str | None = None
    scheme: str = "http"
    headers: tuple = ()  # ((name, value), ...), in order

    @property
    def kind(self) -> str:
        """``http``, ``https`` or ``tcp``."""
        return "tcp" if self.path is None else self.scheme


def parse_app_probers(text: str) -> dict:
    """``{"/app-health/<container>/<kind>": AppProbe}`` from the JSON; ``""`` gives ``{}``.

    Raises ValueError naming the probe and the field that is wrong.
    """
    if not text or not text.strip():
        return {}
    try:
        document = json.loads(text)
    except ValueError as error:
        raise ValueError(f"not JSON ({error})") from None
    if not isinstance(document, dict):
        raise ValueError(f"want a JSON object from {APP_HEALTH_PREFIX}<container>/<livez|readyz|startupz> "
                         "to a probe")
    return {path: _probe(path, spec) for path, spec in document.items()}


def _probe(path: str, spec) -> AppProbe:
    if not _PATH.fullmatch(path):
        raise ValueError(f"{path!r}: a probe's key is {APP_HEALTH_PREFIX}<container>/<livez|readyz|startupz>")
    if not isinstance(spec, dict) or ("httpGet" in spec) == ("tcpSocket" in spec):
        raise ValueError(f"{path}: want an object with either httpGet or tcpSocket (and timeoutSeconds)")
    timeout = spec.get("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"{path}: timeoutSeconds must be a positive number, got {timeout!r}")
    check = spec.get("httpGet", spec.get("tcpSocket"))
    if not isinstance(check, dict):
        raise ValueError(f"{path}: httpGet/tcpSocket must be an object")
    port = check.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{path}: port must be a number (1-65535), got {port!r}; named ports are resolved "
                         "by the injector")
    if "tcpSocket" in spec:
        return AppProbe(port=port, timeout=float(timeout))
    target = check.get("path") or "/"
    if not target.startswith("/"):
        target = "/" + target  # as the kubelet does
    if not _TARGET.fullmatch(target):
        raise ValueError(f"{path}: httpGet.path {target!r} must be printable ASCII without spaces")
    scheme = str(check.get("scheme") or "HTTP").lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"{path}: httpGet.scheme must be HTTP or HTTPS, got {check.get('scheme')!r}")
    return AppProbe(port=port, timeout=float(timeout), path=target, scheme=scheme,
                    headers=tuple(_header(path, header) for header in check.get("httpHeaders") or ()))


def _header(path: str, header) -> tuple:
    name = header.get("name") if isinstance(header, dict) else None
    value = header.get("value", "") if isinstance(header, dict) else None
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name) or not isinstance(value, str) \
            or any(c in value for c in "\r\n\0"):
        raise ValueError(f"{path}: httpHeaders wants {{\"name\": TOKEN, \"value\": TEXT}} items, got {header!r}")
    return name, value
