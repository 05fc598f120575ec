"""Bookinfo, small: Istio's sample application for tests, one service (and version) per process.

Istio's task pages (request routing, fault injection, traffic shifting, request timeouts) are written
for the Bookinfo sample; this is a stand-in with the same call graph, the same timeouts and the same
error texts, so that the pages' YAML and expected outcomes apply unchanged::

    productpage --> details
                \\-> reviews v1 (no ratings) | v2 (black stars) | v3 (red stars) --> ratings

    python tests/apps/bookinfo.py --service reviews --version v2 --port 8080 --sidecar 127.0.0.1:15001

Each app calls the others through its own sidecar's outbound listener (explicit mode: ``GET`` to
``--sidecar`` with ``Host: <service>:9080``), propagating the headers the real apps propagate: the trace
headers (``x-request-id``, ``traceparent``, ``tracestate``, ``b3``, ``x-b3-*``), ``user-agent``,
``cookie``, ``authorization`` and ``end-user``.  As the real productpage, the logged-in user (here the
``user`` cookie, the real app's session) becomes the ``end-user`` header of its calls.

Paths and answers (JSON; the shapes of the real services):

- productpage ``GET /productpage``: ``{"user", "details", "reviews"}``; a failed call becomes
  ``{"error": "Sorry, product reviews are currently unavailable for this book."}`` (details alike).
  It calls reviews with a 3 s timeout and tries twice, as the real productpage (the "bug" of the
  fault-injection task).  The header ``x-bookinfo-reviews`` names the reviews pod that answered
  (``reviews-v2``) or ``unavailable``.
- productpage ``GET /api/v1/products``: the list of books (one).
- details ``GET /details/0``; ratings ``GET /ratings/0``: fixed documents.
- reviews ``GET /reviews/0``: ``{"id", "podname", "reviews": [...]}``; v2/v3 add a ``rating`` to each
  review: ``{"stars", "color"}`` or ``{"error": "Ratings service is currently unavailable"}`` (timeouts
  10 s for v2, 2.5 s for v3, as the real reviews).
- ``GET /health`` on every service: 200.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.cookies import CookieError, SimpleCookie

from twisted.internet import defer, reactor
from twisted.python import log
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

SERVICE_PORT = 9080
PROPAGATED = ("x-request-id", "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid",
              "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "user-agent", "cookie", "authorization",
              "end-user")
DETAILS_UNAVAILABLE = "Sorry, product details are currently unavailable for this book."
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"
PRODUCTPAGE_TIMEOUT = 3.0  # seconds, for details and for each of the two tries of reviews
RATINGS_TIMEOUT = {"v2": 10.0, "v3": 2.5}
STAR_COLOR = {"v2": "black", "v3": "red"}
DETAILS = {"id": 0, "author": "William Shakespeare", "year": 1595, "type": "paperback", "pages": 200,
           "publisher": "PublisherA", "language": "English", "ISBN-10": "1234567890",
           "ISBN-13": "123-1234567890"}
PRODUCTS = [{"id": 0, "title": "The Comedy of Errors",
             "descriptionHtml": "<a href=\"https://en.wikipedia.org/wiki/The_Comedy_of_Errors\">Wikipedia "
                                "Summary</a>: The Comedy of Errors is one of <b>William Shakespeare's</b> early "
                                "plays."}]
RATINGS = {"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}
REVIEWS = (("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
           ("Reviewer2", "Absolutely fun and entertaining. The play lacks thematic depth when compared to "
                         "other plays by Shakespeare."))


class Bookinfo:
    """One Bookinfo service: :meth:`answer` maps ``(path, headers)`` to ``(status, document, extra headers)``."""

    def __init__(self, service: str, version: str, sidecar: str):
        self.service = service
        self.version = version
        self.podname = f"{service}-{version}"
        self.sidecar_url = f"http://{sidecar}".encode()
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=True))

    async def answer(self, path: str, headers: dict) -> tuple:
        """The service's answer to ``GET path`` with the (lower-case) request ``headers``."""
        if path == "/health":
            return 200, {"status": f"{self.podname} is healthy"}, {}
        if self.service == "productpage" and path == "/productpage":
            return await self.product_page(headers)
        if self.service == "productpage" and path == "/api/v1/products":
            return 200, PRODUCTS, {}
        if self.service == "details" and path.startswith("/details/"):
            return 200, DETAILS, {}
        if self.service == "ratings" and path.startswith("/ratings/"):
            return 200, RATINGS, {}
        if self.service == "reviews" and path.startswith("/reviews/"):
            return 200, await self.reviews(headers), {}
        return 404, {"error": f"{self.podname} has no page {path}"}, {}

    async def product_page(self, headers: dict) -> tuple:
        """The product page: details and reviews, each replaced by its error text when its call fails."""
        outgoing = forwarded(headers)
        outgoing.pop("end-user", None)  # the user is the session's, never a header a browser sent
        user = logged_in_user(headers)
        if user:
            outgoing["end-user"] = user
        status, details = await self.call("details", "/details/0", outgoing, PRODUCTPAGE_TIMEOUT)
        if status != 200:
            details = {"error": DETAILS_UNAVAILABLE}
        for _ in range(2):  # the real productpage's deliberate retry (see the fault-injection task)
            status, reviews = await self.call("reviews", "/reviews/0", outgoing, PRODUCTPAGE_TIMEOUT)
            if status == 200:
                break
        if status != 200:
            reviews = {"error": REVIEWS_UNAVAILABLE}
        pod = reviews.get("podname", "unavailable")
        return 200, {"user": user, "details": details, "reviews": reviews}, {"x-bookinfo-reviews": pod}

    async def reviews(self, headers: dict) -> dict:
        """The reviews document; v2 and v3 ask ratings for the stars."""
        rating = None
        if self.version in STAR_COLOR:
            status, ratings = await self.call("ratings", "/ratings/0", forwarded(headers),
                                              RATINGS_TIMEOUT[self.version])
            rating = ratings.get("ratings") if status == 200 else None
        reviews = []
        for reviewer, text in REVIEWS:
            review = {"reviewer": reviewer, "text": text}
            if self.version in STAR_COLOR:
                review["rating"] = ({"stars": rating[reviewer], "color": STAR_COLOR[self.version]} if rating
                                    else {"error": RATINGS_UNAVAILABLE})
            reviews.append(review)
        return {"id": "0", "podname": self.podname, "clustername": "null", "reviews": reviews}

    async def call(self, service: str, path: str, headers: dict, timeout: float) -> tuple:
        """``GET path`` of ``service`` through the sidecar: ``(status, its JSON document if 200, else {})``;
        ``(0, {})`` when the call failed or took longer than ``timeout`` seconds."""
        request_headers = Headers({b"host": [f"{service}:{SERVICE_PORT}".encode()]})
        for name, value in headers.items():
            request_headers.addRawHeader(name.encode(), value.encode())
        exchange = self.agent.request(b"GET", self.sidecar_url + path.encode(), request_headers)
        exchange.addCallback(lambda response: readBody(response).addCallback(lambda body: (response.code, body)))
        exchange.addTimeout(timeout, reactor)
        try:
            status, body = await exchange
            return status, (json.loads(body) if status == 200 else {})
        except Exception as error:  # a failed call is an answer of this app, as in the real Bookinfo
            log.msg(f"{self.podname}: GET {service}{path} failed: {error!r}")
            return 0, {}


def forwarded(headers: dict) -> dict:
    """The request headers the Bookinfo services propagate to the services they call."""
    return {name: headers[name] for name in PROPAGATED if name in headers}


def logged_in_user(headers: dict) -> str:
    """The ``user`` cookie (the real productpage's login session), or ``""``."""
    try:
        cookie = SimpleCookie(headers.get("cookie", ""))
    except CookieError:
        return ""
    return cookie["user"].value if "user" in cookie else ""


class Page(resource.Resource):
    """Every path of the service: asks :meth:`Bookinfo.answer` and writes its JSON."""

    isLeaf = True

    def __init__(self, app: Bookinfo):
        super().__init__()
        self.app = app

    def render_GET(self, request):
        headers = {name.decode().lower(): values[-1].decode()
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        answer = defer.ensureDeferred(self.app.answer(request.path.decode(), headers))
        gone = []

        def left(_):
            """The client left: nothing to answer, and the calls made for it can stop."""
            gone.append(True)
            answer.cancel()

        request.notifyFinish().addErrback(left)
        answer.addCallbacks(self._write, self._failed, callbackArgs=(request, gone), errbackArgs=(request, gone))
        return server.NOT_DONE_YET

    def _write(self, result, request, gone):
        if gone:
            return
        status, document, extra = result
        body = json.dumps(document).encode()
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-bookinfo-pod", self.app.podname.encode())
        for name, value in extra.items():
            request.setHeader(name.encode(), value.encode())
        request.write(body)
        request.finish()

    def _failed(self, failure, request, gone):
        if gone:
            return None
        log.err(failure, f"{self.app.podname}: answering {request.path!r}")
        request.setResponseCode(500)
        request.finish()
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service", required=True, choices=("productpage", "details", "reviews", "ratings"))
    parser.add_argument("--version", default="v1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--sidecar", default="127.0.0.1:15001", help="HOST:PORT of the sidecar's outbound listener")
    args = parser.parse_args(argv)
    log.startLogging(sys.stdout)
    app = Bookinfo(args.service, args.version, args.sidecar)
    site = server.Site(Page(app))
    site.noisy = False
    reactor.listenTCP(args.port, site, interface=args.address)
    print(f"bookinfo {app.podname} on {args.address}:{args.port} -> sidecar {args.sidecar}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
