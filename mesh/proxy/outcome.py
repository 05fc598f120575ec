"""Small value objects describing how a try or a request ended."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional


@dataclass(frozen=True, slots=True)
class TryOutcome:
    """How one try failed, as seen by ``mesh_retry_decision``.

    ``kind`` is ``"status"`` (the upstream answered ``status``),
    ``"connect-failure"``, ``"reset"`` (the connection broke before a
    response) or ``"timeout"`` (the per-try timeout fired).
    """

    kind: str
    status: Optional[int] = None
    detail: str = ""


class RequestOutcome(NamedTuple):
    """How a whole request ended, as seen by ``mesh_request_complete``.

    Made once per request, so it is a NamedTuple: as immutable as a frozen
    dataclass, and cheaper to build (about 1.4% of a small request).

    ``status`` is what the downstream got (0 if the connection was cut before
    any response), ``local`` is True when the proxy generated the response,
    ``duration`` is seconds from the parsed head to the last byte sent.
    ``detail`` is Envoy's ``%RESPONSE_CODE_DETAILS%``: why the response is what
    it is, for operators only (the caller gets just the flags): ``via_upstream``
    when the upstream answered, else e.g. ``route_not_found``,
    ``rbac_access_denied_matched_policy[shop/deny-batch]`` or
    ``plugin_error{NAME,HOOK}``.
    """

    status: int
    flags: str
    local: bool
    duration: float
    detail: str = ""


class LocalReply(Exception):
    """Raised on the request path to answer with a proxy-generated response.

    ``status`` is the HTTP status, ``flag`` an Envoy-style response flag
    (``NR``, ``UH``, ``NC``, ...) and ``message`` tells the user what was
    wrong and what to do: both go to the caller.  ``details`` is Envoy's
    response code details (:attr:`RequestOutcome.detail`), which may name
    what the caller must not learn, such as the deciding policy: it goes to
    the access log only.
    """

    def __init__(self, status: int, flag: str, message: str, details: str = ""):
        super().__init__(message)
        self.status = status
        self.flag = flag
        self.message = message
        self.details = details
