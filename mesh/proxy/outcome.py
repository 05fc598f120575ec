"""How a try or a request ended: the outcome types (defined in :mod:`mesh.api`, where plugins see them),
and :class:`LocalReply`, raised on the request path to answer from the proxy."""

from __future__ import annotations

from mesh.api import RequestOutcome, TryOutcome

__all__ = ["LocalReply", "Pending", "RequestOutcome", "TryOutcome"]


class LocalReply(Exception):
    """Raised on the request path to answer with a proxy-generated response.

    ``status`` is the HTTP status, ``flag`` an Envoy-style response flag
    (``NR``, ``UH``, ``NC``, ...) and ``message`` tells the user what was
    wrong and what to do: both go to the caller.  ``details`` is Envoy's
    response code details (:attr:`RequestOutcome.detail`), which may name
    what the caller must not learn, such as the deciding policy: it goes to
    the access log only.  ``headers`` are ``(name, value)`` bytes pairs the
    reply carries (a 401's ``www-authenticate``).
    """

    def __init__(self, status: int, flag: str, message: str, details: str = "", headers: tuple = ()):
        super().__init__(message)
        self.status = status
        self.flag = flag
        self.message = message
        self.details = details
        self.headers = headers


class Pending(Exception):
    """Raised on the request path when the request must wait, for a bounded time, for something the
    proxy is fetching (the key set of a JWT's issuer, :mod:`mesh.proxy.authn`).

    ``deferred`` fires (never fails) when the wait is over, whatever its outcome: the exchange then
    routes the request again, and the stage that raised decides without waiting a second time.
    """

    def __init__(self, deferred):
        super().__init__("waiting")
        self.deferred = deferred
